"""One typed client of the mesh's tiers for the tiers that call others (the gateway, the
ingestor): one method per call, each taking the caller's deadline, with every failure mapped to a
status that names the tier. Speaks only the protos' API."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry import trace

from askmesh.runtime.auth import CALLER_HEADER, Caller, Role
from askmesh.runtime.channels import READY_LOG_INTERVAL_S, READY_POLL_INTERVAL_S, health_of, open_channel
from askmesh.runtime.errors import AskmeshError, FailedPrecondition, Unavailable, retry_after_of
from askmesh.tiers import BY_NAME
from askmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    reranker_pb2,
    reranker_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)

T = TypeVar("T")
log = logging.getLogger("askmesh.upstream")
# Statuses that describe the request itself: passed on as they are (their messages name the
# request field, and the field has the same name in the gateway's API).
_CALLER_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Statuses about capacity or time: kept, with the tier named.
_KEPT_STATUSES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def trace_reference() -> str:
    """What ties a caller's message to the log line with the details: the current trace id
    (`trace <32 hex>`), or where no span is recording one, a fresh request id."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return f"trace {trace.format_trace_id(context.trace_id)}"
    return f"request {secrets.token_hex(8)}"


def _mapped(tier: str, code: grpc.StatusCode, details: str, what: str, retry_after_s: float | None = None) -> AskmeshError:
    """The tier's failure for the gateway's caller. `what` says how it failed ("tier
    unavailable", "failed mid-stream"). A failure that is not the caller's keeps only the tier and
    the status: its details can name backend addresses or database errors, so they go to the log,
    with the same trace id as the message the caller gets."""
    if code in _CALLER_STATUSES:
        return AskmeshError(details, code=code)
    if code in _KEPT_STATUSES:
        # Named once: the tiers' own messages often start with their name already.
        named = details if details.startswith(f"{tier}:") else f"{tier}: {details}"
        return AskmeshError(named, code=code, retry_after_s=retry_after_s)
    reference = trace_reference()
    log.warning("[UPSTREAM] %s %s (%s): %s; %s", tier, what, code.name, details or "no details given", reference)
    return Unavailable(f"{tier} {what} ({code.name}); {reference}")


def upstream_error(tier: str, error: grpc.aio.AioRpcError, what: str = "tier unavailable") -> AskmeshError:
    """The tier's failure as the gateway's caller sees it; a retry pushback is passed on."""
    return _mapped(tier, error.code(), error.details() or "", what, retry_after_of(error))


# What a question that asks to be reranked hears when the embedder tier has no reranker: its
# Reranker service answers FAILED_PRECONDITION, or (an embedder from before rerankers, or a
# proxy without the route) UNIMPLEMENTED.
NO_RERANKER = (
    "rerank: no reranker is configured on the embedder tier "
    "(set ASKMESH_EMBEDDER_RERANKER_MODEL_PATH or ASKMESH_EMBEDDER_RERANKER_URL there, or ask without rerank)"
)


def stream_error(tier: str, error: common_pb2.StreamError) -> AskmeshError:
    code = grpc.StatusCode[error.code] if error.code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    return _mapped(tier, code, error.message, "failed mid-stream")


@dataclass
class Deadline:
    """The caller's remaining time (None: no deadline) and the per-call default."""

    remaining_s: float | None
    default_s: float

    def __post_init__(self) -> None:
        self._set_at = time.monotonic()

    def unary_timeout(self) -> float:
        if self.remaining_s is None:
            return self.default_s
        return max(self.remaining_s - (time.monotonic() - self._set_at), 0.001)

    def stream_timeout(self) -> float | None:
        return None if self.remaining_s is None else self.unary_timeout()


class _Tier:
    """One tier's channel, and its name for the statuses of its failures."""

    def __init__(self, name: str, address: str, credential: str | None) -> None:
        self.name = name
        self.address = address
        self.channel = open_channel(address, credential)

    async def call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise upstream_error(self.name, error) from error


class Upstreams:
    """The tiers at `addresses` (tier name -> host:port); a method of a tier not given raises
    KeyError when called, which is a wiring mistake, not a caller's."""

    def __init__(self, addresses: dict[str, str], credential: str | None = None) -> None:
        """`credential`: the mesh's internal token, sent on every call (None: none is sent)."""
        self._tiers = {name: _Tier(name, address, credential) for name, address in addresses.items()}

    def _channel(self, tier: str) -> grpc.aio.Channel:
        return self._tiers[tier].channel

    # -- embedder ----------------------------------------------------------------------------
    async def embed(self, texts: list[str], deadline: Deadline) -> embedder_pb2.EmbedResponse:
        stub = embedder_pb2_grpc.EmbedderStub(self._channel("embedder"))
        request = embedder_pb2.EmbedRequest(texts=texts)
        return await self._tiers["embedder"].call(stub.Embed(request, timeout=deadline.unary_timeout()))

    # -- reranker (served by the embedder tier) ----------------------------------------------
    async def rerank(
        self, query: str, texts: list[str], top_n: int, deadline: Deadline
    ) -> reranker_pb2.RerankResponse:
        """The best `top_n` of `texts` for `query`, best first. FailedPrecondition when the tier
        has no reranker; a reranker refusing the texts is not the caller's doing, so it is
        FailedPrecondition too, with the reranker's reason."""
        stub = reranker_pb2_grpc.RerankerStub(self._channel("embedder"))
        request = reranker_pb2.RerankRequest(query=query, texts=texts, top_n=top_n)
        try:
            return await stub.Rerank(request, timeout=deadline.unary_timeout())  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise FailedPrecondition(NO_RERANKER) from error
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise FailedPrecondition(f"rerank: the reranker refused the retrieved passages ({error.details()})") from error
            raise upstream_error("embedder", error, "tier unavailable while reranking") from error

    async def reranker_model(self, deadline: Deadline) -> common_pb2.ModelInfo | None:
        """The embedder tier's reranker; None when it has none."""
        stub = reranker_pb2_grpc.RerankerStub(self._channel("embedder"))
        try:
            return await stub.GetModel(common_pb2.GetModelRequest(), timeout=deadline.unary_timeout())  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                return None
            raise upstream_error("embedder", error) from error

    # -- retriever ---------------------------------------------------------------------------
    def _retriever(self) -> retriever_pb2_grpc.RetrieverStub:
        return retriever_pb2_grpc.RetrieverStub(self._channel("retriever"))

    async def search(self, request: retriever_pb2.SearchRequest, deadline: Deadline) -> retriever_pb2.SearchResponse:
        return await self._tiers["retriever"].call(self._retriever().Search(request, timeout=deadline.unary_timeout()))

    async def upsert(self, request: retriever_pb2.UpsertRequest, deadline: Deadline) -> retriever_pb2.UpsertResponse:
        return await self._tiers["retriever"].call(self._retriever().Upsert(request, timeout=deadline.unary_timeout()))

    async def delete_chunks(self, request: retriever_pb2.DeleteRequest, deadline: Deadline) -> retriever_pb2.DeleteResponse:
        return await self._tiers["retriever"].call(self._retriever().Delete(request, timeout=deadline.unary_timeout()))

    async def create_collection(
        self, request: retriever_pb2.CreateCollectionRequest, deadline: Deadline
    ) -> retriever_pb2.CollectionInfo:
        call = self._retriever().CreateCollection(request, timeout=deadline.unary_timeout())
        return await self._tiers["retriever"].call(call)

    async def describe_collection(
        self, request: retriever_pb2.DescribeCollectionRequest, deadline: Deadline
    ) -> retriever_pb2.CollectionInfo:
        call = self._retriever().DescribeCollection(request, timeout=deadline.unary_timeout())
        return await self._tiers["retriever"].call(call)

    async def switch_generation(
        self, request: retriever_pb2.SwitchGenerationRequest, deadline: Deadline
    ) -> retriever_pb2.CollectionInfo:
        call = self._retriever().SwitchGeneration(request, timeout=deadline.unary_timeout())
        return await self._tiers["retriever"].call(call)

    async def drop_knowledge_base(
        self, request: retriever_pb2.DropKnowledgeBaseRequest, deadline: Deadline
    ) -> retriever_pb2.DropKnowledgeBaseResponse:
        call = self._retriever().DropKnowledgeBase(request, timeout=deadline.unary_timeout())
        return await self._tiers["retriever"].call(call)

    # -- ingestor ----------------------------------------------------------------------------
    async def search_view(self, knowledge_base: str, tenant: str, deadline: Deadline) -> catalog_pb2.SearchView:
        stub = catalog_pb2_grpc.CatalogStub(self._channel("ingestor"))
        request = catalog_pb2.GetSearchViewRequest(knowledge_base=knowledge_base, tenant=tenant)
        return await self._tiers["ingestor"].call(stub.GetSearchView(request, timeout=deadline.unary_timeout()))

    async def authenticate(self, key_hash: str, timeout_s: float = 5.0) -> Caller | None:
        """Who the key with this hash belongs to (None: no valid key has it)."""
        stub = catalog_pb2_grpc.CatalogStub(self._channel("ingestor"))
        try:
            found = await stub.Authenticate(catalog_pb2.AuthenticateRequest(key_hash=key_hash), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise upstream_error("ingestor", error) from error
        return Caller(tenant=found.tenant, role=Role.parse(found.role), key_id=found.key_id)

    # -- generator ---------------------------------------------------------------------------
    async def generator_load(self, deadline: Deadline) -> generator_pb2.GeneratorLoad:
        stub = generator_pb2_grpc.GeneratorStub(self._channel("generator"))
        return await self._tiers["generator"].call(stub.GetLoad(generator_pb2.GetLoadRequest(), timeout=deadline.unary_timeout()))

    async def admit_generation(self, deadline: Deadline, caller_id: str = "") -> GenerationSession:
        """A place in a generator's line, before any work is spent on the prompt; raises
        ResourceExhausted (with the generator's time to retry after) when none would serve it
        within its longest wait, on any replica Envoy tried. `caller_id` (a key id) is whose
        question it is: the generator keeps each caller to its share of the line."""
        stub = generator_pb2_grpc.GeneratorStub(self._channel("generator"))
        call = stub.AdmitAndGenerate(timeout=deadline.stream_timeout(), metadata=[(CALLER_HEADER, caller_id)])
        session = GenerationSession(call)
        try:
            await call.write(generator_pb2.AdmitAndGenerateRequest(admission=generator_pb2.Admission()))
            first = await session.read()
        except grpc.aio.AioRpcError as error:
            session.close()
            raise upstream_error("generator", error) from error
        except BaseException:
            session.close()
            raise
        if first is None or first.WhichOneof("event") != "queued":
            session.close()
            raise Unavailable("generator tier unavailable: the admission was not answered")
        session.standing = first.queued
        return session

    # -- readiness ---------------------------------------------------------------------------
    async def wait_until_serving(self, tiers: list[str] | None = None) -> None:
        """Returns once every tier of `tiers` (None: every tier given) has answered SERVING to a
        health check (with its service name), each at least once since this call began; logs
        which it still waits for.

        Called once, at start: a tier that calls others is ready when it could answer a call.
        After that its readiness does not follow theirs (see the README's operating notes).
        """
        waiting = {name: BY_NAME[name].health_service for name in (self._tiers if tiers is None else tiers)}
        last_answer = {tier: "no answer yet" for tier in waiting}
        started = next_log = time.monotonic()
        while waiting:
            for tier, service in list(waiting.items()):
                answer = await health_of(self._channel(tier), service)
                if answer == "SERVING":
                    del waiting[tier]
                    log.info("[UPSTREAM] %s tier at %s is SERVING", tier, self._tiers[tier].address)
                else:
                    last_answer[tier] = answer
            if not waiting:
                return
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + READY_LOG_INTERVAL_S
                log.info(
                    "[UPSTREAM] not ready after %.0f s: waiting for %s",
                    time.monotonic() - started,
                    "; ".join(f"{tier} at {self._tiers[tier].address} ({last_answer[tier]})" for tier in waiting),
                )
            await asyncio.sleep(READY_POLL_INTERVAL_S)

    async def close(self) -> None:
        for tier in self._tiers.values():
            await tier.channel.close()


class GenerationSession:
    """One AdmitAndGenerate call: admitted first (`standing` is where it stands then), the
    prompt sent once built, then the generator's messages read to the end."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self.standing = common_pb2.QueueStatus()

    async def send_prompt(self, request: generator_pb2.GenerateRequest) -> None:
        try:
            await self._call.write(generator_pb2.AdmitAndGenerateRequest(generate=request))
            await self._call.done_writing()
        except grpc.aio.AioRpcError as error:
            raise upstream_error("generator", error) from error
        except asyncio.InvalidStateError:
            # What grpc raises when the call has already ended (the generator went away while
            # the question was embedded and searched): the call's own status says why.
            code, details = await self._call.code(), await self._call.details() or ""
            raise _mapped("generator", code, details, "tier unavailable") from None

    async def read(self) -> generator_pb2.GenerateResponse | None:
        """The next message; None at the stream's end. A message carrying an error, or a
        failed call, raises the error as the gateway's caller should see it."""
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise upstream_error("generator", error) from error
        if message is grpc.aio.EOF:
            return None
        if message.WhichOneof("event") == "error":
            raise stream_error("generator", message.error)
        return message  # type: ignore[no-any-return]

    async def finish(self) -> None:
        """Lets a call that ended well end with the generator's own OK status: cancelling it
        now would reset a stream that finished well."""
        await self._call.code()

    def close(self) -> None:
        """Gives the place (or the generation) up if the call is still open."""
        if not self._call.done():
            self._call.cancel()
