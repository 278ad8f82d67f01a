"""The gateway's clients of the other tiers, with their failures mapped to statuses that name
the tier, and the caller's deadline carried to every hop."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from askmesh.runtime.channels import open_channel
from askmesh.runtime.errors import AskmeshError, Unavailable
from askmesh.v1 import common_pb2, embedder_pb2_grpc, generator_pb2_grpc, retriever_pb2_grpc
from services.gateway.config import GatewaySettings

T = TypeVar("T")

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


def _mapped(tier: str, code: grpc.StatusCode, details: str, unavailable: str) -> AskmeshError:
    if code in _CALLER_STATUSES:
        return AskmeshError(details, code=code)
    if code in _KEPT_STATUSES:
        # Named once: the tiers' own messages often start with their name already.
        named = details if details.startswith(f"{tier}:") else f"{tier}: {details}"
        return AskmeshError(named, code=code)
    return Unavailable(unavailable)


def upstream_error(tier: str, error: grpc.aio.AioRpcError) -> AskmeshError:
    code, details = error.code(), error.details() or ""
    return _mapped(tier, code, details, f"{tier} tier unavailable: {code.name}: {details}")


def stream_error(tier: str, error: common_pb2.StreamError) -> AskmeshError:
    code = grpc.StatusCode[error.code] if error.code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    return _mapped(tier, code, error.message, f"{tier} failed mid-stream: {error.code}: {error.message}")


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


class Upstreams:
    def __init__(self, settings: GatewaySettings) -> None:
        self._channels = [
            open_channel(settings.embedder_address),
            open_channel(settings.retriever_address),
            open_channel(settings.generator_address),
        ]
        self.embedder = embedder_pb2_grpc.EmbedderStub(self._channels[0])
        self.retriever = retriever_pb2_grpc.RetrieverStub(self._channels[1])
        self.generator = generator_pb2_grpc.GeneratorStub(self._channels[2])

    async def call(self, tier: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise upstream_error(tier, error) from error

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
