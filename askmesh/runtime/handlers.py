"""Wrapping a grpc.aio method handler's behaviour, whatever its kind (unary or streaming on
either side), for the server interceptors that check a call before its servicer runs."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from askmesh.runtime.errors import AskmeshError

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def replace(handler: grpc.RpcMethodHandler, **changes: Any) -> grpc.RpcMethodHandler:
    return handler._replace(**changes)  # type: ignore[attr-defined,no-any-return]


def wrapped(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
) -> grpc.RpcMethodHandler:
    """The handler with its behaviour wrapped: `streaming` for async generators (which yield
    their responses), `unary` for coroutines (which return one response, or write a stream's
    with context.write, as grpcio-health-checking's Watch does)."""

    def wrap(behaviour: Any) -> Any:
        return streaming(behaviour) if inspect.isasyncgenfunction(behaviour) else unary(behaviour)

    if handler.unary_unary:
        return replace(handler, unary_unary=wrap(handler.unary_unary))
    if handler.unary_stream:
        return replace(handler, unary_stream=wrap(handler.unary_stream))
    if handler.stream_unary:
        return replace(handler, stream_unary=wrap(handler.stream_unary))
    return replace(handler, stream_stream=wrap(handler.stream_stream))


def refusing(handler: grpc.RpcMethodHandler, error: AskmeshError) -> grpc.RpcMethodHandler:
    """A handler that ends every call with `error` before the servicer runs."""

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> Any:
        context.set_trailing_metadata(error.trailing_metadata())
        await context.abort(error.code, error.message)

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        context.set_trailing_metadata(error.trailing_metadata())
        await context.abort(error.code, error.message)
        yield  # pragma: no cover - makes this an async generator, as the handler kind needs

    return wrapped(handler, lambda _: refuse, lambda _: refuse_stream)
