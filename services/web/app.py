"""The web tier's HTTP edge (Starlette): parses and validates requests, passes each caller's own
credentials on, and answers in OpenAI's shapes with the right HTTP status. The translation is
engine.py's; the calls are askmesh.public_api's.

    POST /v1/chat/completions        OpenAI Chat Completions (streamed or not)
    GET  /v1/models, /v1/models/{id} the caller's knowledge bases, as models
    POST /v1/embeddings              OpenAI Embeddings
    POST /api/knowledge-bases/{kb}/files?name=FILE   the request body is the file: its task
    GET  /api/tasks/{id}             an ingestion task
    GET  /api/tasks/{id}/events      the task as Server-Sent Events, each time it changes, to its end
    GET  /healthz                    200 once the gateway and the ingestor have answered
    GET  /                           the chat page (static files)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from askmesh.public_api import CallerCredentials, PublicApi
from askmesh.runtime.auth import AUTHORIZATION_HEADER, TENANT_HEADER
from askmesh.runtime.channels import READY_LOG_INTERVAL_S, READY_POLL_INTERVAL_S
from askmesh.runtime.errors import AskmeshError, InvalidArgument, NotFound, Unauthenticated, Unavailable
from askmesh.v1 import gateway_pb2, ingestion_pb2
from services.web import engine
from services.web.config import WebSettings
from services.web.errors import error_body, http_status, retry_headers
from services.web.schemas import ChatCompletionRequest, EmbeddingsRequest, problem

log = logging.getLogger("askmesh.web")
STATIC_DIR = Path(__file__).resolve().parent / "static"
Body = TypeVar("Body", bound=BaseModel)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The page loads its own script and style only; nothing may frame it.
PAGE_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def failure(error: AskmeshError, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(error, code), status_code=http_status(error.code).status, headers=retry_headers(error))


def credentials(request: Request) -> CallerCredentials:
    """The caller's own credentials, passed on as they came. A header that gRPC metadata cannot
    carry (not printable ASCII) is refused here."""
    authorization = request.headers.get(AUTHORIZATION_HEADER)
    tenant = request.headers.get(TENANT_HEADER)
    for name, value in ((AUTHORIZATION_HEADER, authorization), (TENANT_HEADER, tenant)):
        if value is not None and not (value.isascii() and value.isprintable()):
            raise Unauthenticated(f"{name}: holds characters no key or tenant has")
    return CallerCredentials(authorization=authorization, tenant=tenant)


async def parsed(request: Request, model: type[Body], limit: int) -> Body:
    """The JSON body as `model`; InvalidArgument naming the field (or the body) when it is not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidArgument("body", f"{int(declared)} bytes exceed the limit of {limit}")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise InvalidArgument("body", f"exceeds the limit of {limit} bytes")
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as error:
        raise InvalidArgument("body", f"is not UTF-8 (at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise InvalidArgument("body", f"is not valid JSON ({error.msg.lower()} at character {error.pos})") from None
    if not isinstance(value, dict):
        raise InvalidArgument("body", "must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as error:
        field, message = problem(error)
        raise InvalidArgument(field, message.removeprefix(f"{field}: ")) from None


Handler = Callable[[Request], Awaitable[Response]]


def answering(handler: Handler) -> Handler:
    """Every failure as OpenAI's error response with its status: AskmeshError by its code, a
    caller gone mid-upload as nothing, anything else as a 500 that names no internals."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except AskmeshError as error:
            return failure(error)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:
            log.exception("[WEB] %s %s failed", request.method, request.url.path)
            return failure(AskmeshError("internal error; the web tier's log has the details"))

    return run


class SecurityHeaders:
    """Adds PAGE_HEADERS to every response (a pure ASGI middleware: streams pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *PAGE_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class WebTier:
    """The routes, over one PublicApi."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self._api: PublicApi | None = None
        self.ready = False
        self._readiness: asyncio.Task[None] | None = None
        self.limits = engine.HistoryLimits(settings.max_history_messages, settings.max_history_chars)

    # -- lifecycle ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        log.info("[STARTUP] web on %s", self.settings.listen_address)
        started = time.monotonic()
        # Made inside the server's event loop: grpc.aio channels belong to the loop they start in.
        self._api = PublicApi(self.settings.gateway_address, self.settings.ingestor_address)
        self._readiness = asyncio.create_task(self._become_ready(started))
        try:
            yield
        finally:
            log.info("[SHUTDOWN] web")
            self._readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness
            await self.api.close()
            log.info("[CLEANUP] web: channels closed")

    @property
    def api(self) -> PublicApi:
        assert self._api is not None, "the API is opened by the server's lifespan"
        return self._api

    async def _become_ready(self, started: float) -> None:
        """Ready once the gateway and the ingestor have each answered SERVING: then a request
        could be answered. After that readiness stays (a tier behind that fails later is each
        request's 503, not every web replica leaving Envoy), as the gateway's does."""
        next_log = started
        while True:
            answers = await self.api.health()
            if all(answer == "SERVING" for answer in answers.values()):
                self.ready = True
                log.info("[READY] web in %.1f s: gateway and ingestor are SERVING", time.monotonic() - started)
                return
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + READY_LOG_INTERVAL_S
                log.info("[UPSTREAM] waiting for %s", "; ".join(f"{tier} ({answer})" for tier, answer in answers.items()))
            await asyncio.sleep(READY_POLL_INTERVAL_S)

    async def healthz(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "starting: waiting for the gateway and the ingestor"}, status_code=503)

    # -- OpenAI ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await parsed(request, ChatCompletionRequest, self.settings.max_body_bytes)
        caller = credentials(request)
        translation = engine.ask_request(body, self.limits)
        stream = self.api.ask(translation.request, caller, timeout_s=None)
        answer = engine.Answer(body.model, body.include_usage)

        def named(error: AskmeshError) -> tuple[AskmeshError, str | None]:
            return engine.for_caller(error, body.model, translation.fields)

        try:
            # Read before answering: a refusal (a bad key, an unknown model, a full line) is then
            # an HTTP status, not an event inside a 200.
            first = await stream.next()
            if first is None:
                raise Unavailable("the answer stream ended before it began")
            if not body.stream:
                message: gateway_pb2.AskResponse | None = first
                while message is not None:
                    answer.events(message)
                    message = await stream.next()
                if answer.done is None:
                    raise Unavailable("the answer stream ended before it was done")
                return JSONResponse(answer.completion())
        except AskmeshError as error:
            stream.close()
            return failure(*named(error))
        except BaseException:
            stream.close()
            raise
        finally:
            if not body.stream:
                stream.close()

        async def events() -> AsyncIterator[bytes]:
            try:
                message: gateway_pb2.AskResponse | None = first
                while message is not None:
                    for event in answer.events(message):
                        yield event
                    message = await stream.next()
                if answer.done is None:
                    raise Unavailable("the answer stream ended before it was done")
            except AskmeshError as error:
                yield engine.error_event(*named(error))
            finally:
                stream.close()  # the caller left, or the answer ended

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def models(self, request: Request) -> Response:
        knowledge_bases = await self.api.knowledge_bases(credentials(request), self.settings.upstream_timeout_s)
        return JSONResponse(engine.models_json(knowledge_bases))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        knowledge_bases = await self.api.knowledge_bases(credentials(request), self.settings.upstream_timeout_s)
        for knowledge_base in knowledge_bases:
            if knowledge_base.name == name:
                return JSONResponse(engine.model_json(knowledge_base))
        error, code = engine.for_caller(NotFound(f"knowledge_base: {name!r} does not exist"), name)
        return failure(error, code)

    async def embeddings(self, request: Request) -> Response:
        body = await parsed(request, EmbeddingsRequest, self.settings.max_body_bytes)
        try:
            response = await self.api.embed(engine.embed_request(body), credentials(request), self.settings.upstream_timeout_s)
        except AskmeshError as error:
            return failure(*engine.for_caller(error, body.model))
        return JSONResponse(engine.embeddings_json(body, response))

    # -- the page's own JSON -----------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        """The request's body is the file (sent as it is: no multipart form to parse); its
        name, a label only, is the `name` query parameter."""
        file_name = request.query_params.get("name", "")
        if not file_name:
            raise InvalidArgument("name", "is required: the file's name, as ?name=handbook.pdf")
        # A browser sends a type it knows (application/pdf) or a generic one: then the ingestor
        # tells the format from the file's name.
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        header = ingestion_pb2.UploadFileHeader(
            knowledge_base=request.path_params["knowledge_base"],
            file_name=file_name,
            title=request.query_params.get("title", ""),
            content_type="" if content_type in ("", "application/octet-stream") else content_type,
        )
        task = await self.api.upload_file(header, self._parts(request), credentials(request), self.settings.upstream_timeout_s)
        return JSONResponse({"task": engine.task_json(task)}, status_code=202)

    async def _parts(self, request: Request) -> AsyncIterator[bytes]:
        """The body in parts of upload_part_bytes, as it arrives."""
        size = self.settings.upload_part_bytes
        pending = bytearray()
        async for piece in request.stream():
            pending += piece
            while len(pending) >= size:
                yield bytes(pending[:size])
                del pending[:size]
        if pending:
            yield bytes(pending)

    async def task(self, request: Request) -> Response:
        task = await self.api.task(request.path_params["task_id"], credentials(request), self.settings.upstream_timeout_s)
        return JSONResponse({"task": engine.task_json(task)})

    async def task_events(self, request: Request) -> Response:
        caller = credentials(request)
        task_id = request.path_params["task_id"]
        # The task now, checked before the stream begins: an unknown task is a 404.
        first = await self.api.task(task_id, caller, self.settings.upstream_timeout_s)

        async def events() -> AsyncIterator[bytes]:
            yield engine.sse({"task": engine.task_json(first)})
            if engine.task_json(first)["ended"]:
                return
            try:
                async for task in self.api.watch_task(task_id, caller):
                    yield engine.sse({"task": engine.task_json(task)})
            except AskmeshError as error:
                yield engine.sse(error_body(error))

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def unknown(self, request: Request) -> Response:
        return failure(NotFound(f"path: {request.url.path} is not an endpoint of this API"), "unknown_url")

    def app(self) -> Starlette:
        routes = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/v1/chat/completions", answering(self.chat_completions), methods=["POST"]),
            Route("/v1/models", answering(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", answering(self.model), methods=["GET"]),
            Route("/v1/embeddings", answering(self.embeddings), methods=["POST"]),
            Route("/api/knowledge-bases/{knowledge_base}/files", answering(self.upload), methods=["POST"]),
            Route("/api/tasks/{task_id}", answering(self.task), methods=["GET"]),
            Route("/api/tasks/{task_id}/events", answering(self.task_events), methods=["GET"]),
            Route("/v1/{rest:path}", self.unknown),
            Route("/api/{rest:path}", self.unknown),
            Mount("/", StaticFiles(directory=STATIC_DIR, html=True)),
        ]
        app = Starlette(routes=routes, lifespan=self.lifespan)
        app.add_middleware(SecurityHeaders)
        return app
