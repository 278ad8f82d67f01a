"""Typed errors raised by engines and mapped to gRPC status codes at the servicer edge.

Engines never import grpc.aio or touch a context: they raise one of these, and the
`unary_rpc` / `streaming_rpc` decorators turn it into the right status (and, for a stream that
already sent messages, a final StreamError message first, so the client can tell "finished"
from "cut off").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from askmesh.runtime.lifecycle import SHUTTING_DOWN, CallTracker
from askmesh.v1 import common_pb2

log = logging.getLogger(__name__)


# gRPC's trailer for "ask again after this many milliseconds" (the retry design's server
# pushback): grpc clients with a retry policy honour it, and others can read it.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


# How much of a caller's value an error message quotes: enough to recognise it, never so much
# that a hostile value makes the message long.
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted for an error message: non-printable characters escaped (as repr does),
    cut after `limit` characters with its length said."""
    text = str(value)
    quoted = repr(text[:limit])
    if len(text) <= limit:
        return quoted
    return f"{quoted[:-1]}…{quoted[-1]} ({len(text)} characters)"


class AskmeshError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # When asking again is likely to succeed (None: no advice); sent as retry pushback.
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return ((RETRY_PUSHBACK_KEY, str(max(int(self.retry_after_s * 1000), 1))),)


def retry_after_of(error: grpc.aio.AioRpcError | grpc.RpcError) -> float | None:
    """The retry pushback a failed call's trailers carry, in seconds (None: none)."""
    trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailers:
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(int(value), 0) / 1000
            except ValueError:
                return None
    return None


class InvalidArgument(AskmeshError):
    """A request field is wrong; the message always starts with the field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(AskmeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(AskmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AskmeshError):
    """Over capacity; `retry_after_s` says when to ask again, where it is known."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(AskmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AskmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(AskmeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AskmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(AskmeshError):
    code = grpc.StatusCode.INTERNAL


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Result = TypeVar("Result")


def unary_rpc(
    method: Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Servicer, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Maps AskmeshError (and unexpected exceptions) of a unary method to a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Request, context: grpc.aio.ServicerContext) -> Response:
        calls: CallTracker | None = getattr(self, "calls", None)
        try:
            if calls is None:
                return await method(self, request, context)
            with calls.track(method.__name__):
                expiry = _ExpiryCancel(calls.expired)
                try:
                    return await expiry.wait(lambda: method(self, request, context))
                finally:
                    expiry.close()
        except grpc.aio.AbortError:
            raise
        except AskmeshError as error:
            await context.abort(error.code, error.message, error.trailing_metadata())
        except Exception as error:  # a bug: keep serving, say so, never leak a traceback to clients
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


# Messages smaller than this go uncompressed even on a gzip stream: gzip makes a one-token delta
# bigger, and compressing and decompressing it per token costs every hop CPU for nothing.
MIN_COMPRESSED_MESSAGE_BYTES = 256


def streaming_rpc(
    error_message: Callable[[common_pb2.StreamError], Any],
) -> Callable[
    [Callable[[Servicer, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]],
    Callable[[Servicer, Request, grpc.aio.ServicerContext], AsyncIterator[Response]],
]:
    """Like unary_rpc for a server-streaming method.

    A failure before the first message is a plain status. A failure after it first sends
    `error_message(StreamError)` as the final message, then ends the call with the same status.
    """

    def decorate(
        method: Callable[[Servicer, Request, grpc.aio.ServicerContext], AsyncIterator[Response]],
    ) -> Callable[[Servicer, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]:
        @functools.wraps(method)
        async def wrapper(
            self: Servicer, request: Request, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Response]:
            started = False
            calls: CallTracker | None = getattr(self, "calls", None)
            try:
                messages = method(self, request, context)
                with calls.track(method.__name__) if calls is not None else contextlib.nullcontext():
                    async for message in messages if calls is None else _until_expired(messages, calls):
                        started = True
                        if message.ByteSize() < MIN_COMPRESSED_MESSAGE_BYTES:
                            context.disable_next_message_compression()
                        yield message
                return
            except grpc.aio.AbortError:
                raise
            except AskmeshError as error:
                code, text, trailers = error.code, error.message, error.trailing_metadata()
            except Exception as error:
                log.exception("unhandled error in %s", method.__qualname__)
                code, text, trailers = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}", ()
            if started:
                yield error_message(common_pb2.StreamError(code=code.name, message=text))
            await context.abort(code, text, trailers)

        return wrapper

    return decorate


class _ExpiryCancel:
    """Ends a call's wait when the server's drain runs out of time, at no cost per call or message.

    While `armed` (the call's task is awaiting the call's own work), the drain's expiry cancels
    the task: that await raises CancelledError, and `wait()` then tells an expiry (the
    cancellation is taken back, the call ends with UNAVAILABLE) from a caller that left. Racing
    each call or message against the expiry instead costs a task and an asyncio.wait each."""

    def __init__(self, expired: asyncio.Future[None]) -> None:
        self.expired = expired
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.armed = False
        self.fired = False
        expired.add_done_callback(self._on_expired)

    def _on_expired(self, _: asyncio.Future[None]) -> None:
        if self.armed:
            self.fired = True
            self.task.cancel()

    async def wait(self, work: Callable[[], Awaitable[Result]]) -> Result:
        """Awaits `work()`; Unavailable("server shutting down") if the drain expired before or
        during it (a caller that left still cancels it)."""
        if self.expired.done():
            raise Unavailable(SHUTTING_DOWN)
        self.armed = True
        try:
            return await work()
        except asyncio.CancelledError:
            if self.fired and self.task.uncancel() == 0:
                raise Unavailable(SHUTTING_DOWN) from None
            raise
        finally:
            self.armed = False

    def close(self) -> None:
        self.expired.remove_done_callback(self._on_expired)


async def _until_expired(messages: AsyncIterator[Response], calls: CallTracker) -> AsyncIterator[Response]:
    """The stream's messages, until the server's drain runs out of time: then it is closed (so
    its work upstream stops) and Unavailable("server shutting down") is raised in its place.
    An expiry while the stream is being written to its caller is seen at the next step."""
    expiry = _ExpiryCancel(calls.expired)
    iterator = messages.__aiter__()
    try:
        while True:
            try:
                message = await expiry.wait(iterator.__anext__)
            except StopAsyncIteration:
                return
            yield message
    finally:
        expiry.close()
        # The stream is not running now (a generator cannot be closed while it runs): close it,
        # so its work upstream stops, whether the drain expired or the caller left.
        await iterator.aclose()  # type: ignore[attr-defined]


def name_for_key(text: str, key: str, name: str) -> str:
    """`text` with an internal key (a collection's) replaced by the name a caller knows."""
    return text.replace(key, name) if key and key != name else text


def with_name_for_key(error: AskmeshError, key: str, name: str) -> AskmeshError:
    """`error` with an internal key (a collection's) replaced by the name a caller knows; the
    error itself when it does not mention the key."""
    renamed = name_for_key(error.message, key, name)
    if renamed == error.message:
        return error
    return AskmeshError(renamed, code=error.code, retry_after_s=error.retry_after_s)
