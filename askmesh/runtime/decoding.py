"""Requests that do not parse are INVALID_ARGUMENT with one sentence.

grpc-python answers a request its deserializer cannot parse (random bytes, a string field that
is not UTF-8, messages nested past protobuf's limit) with UNKNOWN and the repr of the parser's
exception. This interceptor gives each handler a deserializer that cannot raise: a request
that does not parse becomes an `Undecodable`, which the wrapped behaviour refuses before the
servicer sees it (for client streams, when the iterator reaches it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from askmesh.runtime.handlers import Streaming, Unary, replace, wrapped

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    type_name: str

    def message(self) -> str:
        return (
            f"request: not a valid {self.type_name} message (malformed, a text field that is not UTF-8, "
            "or nested too deeply)"
        )


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    type_name = _type_name(deserializer)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        # DecodeError, and RecursionError from the pure-Python parser: whatever the parser
        # raises on hostile bytes is the caller's error, not the server's.
        except Exception:
            log.info("a %s request did not parse (%d bytes)", type_name, len(data))
            return Undecodable(type_name)

    return decode


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())


def _checked_unary(behaviour: Unary) -> Unary:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        elif _is_iterator(request):
            request = _checked_iterator(request, context)
        return await behaviour(request, context)

    return run


def _checked_streaming(behaviour: Streaming) -> Streaming:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        elif _is_iterator(request):
            request = _checked_iterator(request, context)
        async for response in behaviour(request, context):
            yield response

    return run


def _is_iterator(request: Any) -> bool:
    return hasattr(request, "__aiter__")


async def _checked_iterator(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        yield request


class RequestDecoding(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        safe = replace(handler, request_deserializer=_safe(handler.request_deserializer))
        return wrapped(safe, _checked_unary, _checked_streaming)
