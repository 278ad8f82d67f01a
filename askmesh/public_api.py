"""One typed client of askmesh's public API for a tier that acts for its callers (the web tier):
every call carries the caller's own credentials, so the tiers behind apply that caller's keys,
roles, tenant and rate limit exactly as they do for a gRPC client. It never sends the mesh's
internal token: a call it makes can do nothing its caller could not do directly.

Failures are raised as AskmeshError with the status and message the public API answered
(its messages are written for callers: they name the field, and leak no address).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from askmesh.client import TERMINAL_TASK_STATES, status_of
from askmesh.runtime.auth import AUTHORIZATION_HEADER, TENANT_HEADER
from askmesh.runtime.channels import health_of, open_channel
from askmesh.runtime.errors import AskmeshError, retry_after_of
from askmesh.tiers import GATEWAY, INGESTOR
from askmesh.v1 import (
    embedder_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
)

T = TypeVar("T")


@dataclass(frozen=True)
class CallerCredentials:
    """What the caller sent: its `Authorization` header as it is ("Bearer <key>"; None: none),
    and the tenant an operator's key acts in (None: its default)."""

    authorization: str | None = None
    tenant: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        entries: list[tuple[str, str]] = []
        if self.authorization is not None:
            entries.append((AUTHORIZATION_HEADER, self.authorization))
        if self.tenant is not None:
            entries.append((TENANT_HEADER, self.tenant))
        return tuple(entries)


def api_error(error: grpc.aio.AioRpcError) -> AskmeshError:
    """The public API's answer as an AskmeshError, with its retry pushback (a stream that Envoy
    reset, its gateway replica gone, is UNAVAILABLE: see status_of)."""
    code = status_of(error)
    details = error.details() or code.name.lower().replace("_", " ")
    return AskmeshError(details, code=code, retry_after_s=retry_after_of(error))


async def _answered(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise api_error(error) from error


class AnswerStream:
    """One Ask: its messages in order (queued..., sources, deltas, then done); `close()` ends it
    if the caller leaves first. A failure, before the first message or after, raises."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def next(self) -> gateway_pb2.AskResponse | None:
        """The next message; None once the stream has ended well."""
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise api_error(error) from error
        if message is grpc.aio.EOF:
            return None
        if message.WhichOneof("event") == "error":
            code = message.error.code
            status = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
            raise AskmeshError(message.error.message, code=status)
        return message  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self._call.done():
            self._call.cancel()


class PublicApi:
    """The public API at the gateway's and the ingestor's addresses (both Envoy's internal
    listener in the local mesh, which routes each public method to its tier)."""

    def __init__(self, gateway_address: str, ingestor_address: str) -> None:
        self._gateway = open_channel(gateway_address)
        self._ingestor = self._gateway if ingestor_address == gateway_address else open_channel(ingestor_address)

    # -- gateway -----------------------------------------------------------------------------
    def ask(self, request: gateway_pb2.AskRequest, caller: CallerCredentials, timeout_s: float | None) -> AnswerStream:
        stub = gateway_pb2_grpc.GatewayStub(self._gateway)
        return AnswerStream(stub.Ask(request, timeout=timeout_s, metadata=caller.metadata()))

    async def embed(
        self, request: gateway_pb2.EmbedTextsRequest, caller: CallerCredentials, timeout_s: float
    ) -> embedder_pb2.EmbedResponse:
        stub = gateway_pb2_grpc.GatewayStub(self._gateway)
        return await _answered(stub.Embed(request, timeout=timeout_s, metadata=caller.metadata()))

    # -- ingestor ----------------------------------------------------------------------------
    async def knowledge_bases(self, caller: CallerCredentials, timeout_s: float) -> list[knowledge_pb2.KnowledgeBase]:
        stub = knowledge_pb2_grpc.KnowledgeBasesStub(self._ingestor)
        request = knowledge_pb2.ListKnowledgeBasesRequest()
        reply = await _answered(stub.ListKnowledgeBases(request, timeout=timeout_s, metadata=caller.metadata()))
        return list(reply.knowledge_bases)

    async def upload_file(
        self,
        header: ingestion_pb2.UploadFileHeader,
        parts: AsyncIterator[bytes],
        caller: CallerCredentials,
        timeout_s: float,
    ) -> ingestion_pb2.Task:
        """Streams the file's parts after its header; the task that will ingest it."""

        async def requests() -> AsyncIterator[ingestion_pb2.UploadFileRequest]:
            yield ingestion_pb2.UploadFileRequest(header=header)
            async for part in parts:
                if part:
                    yield ingestion_pb2.UploadFileRequest(data=part)

        stub = ingestion_pb2_grpc.IngestionStub(self._ingestor)
        return await _answered(stub.UploadFile(requests(), timeout=timeout_s, metadata=caller.metadata()))

    async def task(self, task_id: str, caller: CallerCredentials, timeout_s: float) -> ingestion_pb2.Task:
        stub = ingestion_pb2_grpc.IngestionStub(self._ingestor)
        request = ingestion_pb2.GetTaskRequest(id=task_id)
        return await _answered(stub.GetTask(request, timeout=timeout_s, metadata=caller.metadata()))

    async def watch_task(self, task_id: str, caller: CallerCredentials) -> AsyncIterator[ingestion_pb2.Task]:
        """The task now, then each time it changes, until it ends."""
        stub = ingestion_pb2_grpc.IngestionStub(self._ingestor)
        call = stub.WatchTask(ingestion_pb2.WatchTaskRequest(id=task_id), metadata=caller.metadata())
        try:
            async for task in call:
                if not task.id:  # the error message a failing stream ends with; its status follows
                    continue
                yield task
                if task.state in TERMINAL_TASK_STATES:
                    return
        except grpc.aio.AioRpcError as error:
            raise api_error(error) from error
        finally:
            if not call.done():
                call.cancel()

    # -- readiness ---------------------------------------------------------------------------
    async def health(self) -> dict[str, str]:
        """Each tier's health as one word ("SERVING") or why it did not answer; health is open,
        so no caller's credentials are needed."""
        return {
            tier.name: await health_of(channel, tier.health_service)
            for tier, channel in ((GATEWAY, self._gateway), (INGESTOR, self._ingestor))
        }

    async def close(self) -> None:
        await self._gateway.close()
        if self._ingestor is not self._gateway:
            await self._ingestor.close()
