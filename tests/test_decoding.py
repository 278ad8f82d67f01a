"""A request that does not parse is INVALID_ARGUMENT with one sentence, on every server, for
unary calls and streams alike (grpc-python alone answers UNKNOWN with the parser's repr)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from askmesh.runtime.server import ServiceRunner
from tests.conftest import start_in_process

NOT_UTF8 = b"\x0a\x03\xff\xfe\xc0"  # field 1 (HealthCheckRequest.service, a string): invalid UTF-8
TRUNCATED = b"\x0a\x7f"  # field 1 says 127 bytes follow; none do


@pytest.fixture
async def server() -> AsyncIterator[ServiceRunner]:
    runner = await start_in_process("plain", "askmesh.test.Plain", lambda _: None)
    yield runner
    await runner.stop()


@pytest.mark.parametrize("payload", [NOT_UTF8, TRUNCATED])
async def test_a_unary_request_that_does_not_parse_is_invalid_argument(server: ServiceRunner, payload: bytes) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary("/grpc.health.v1.Health/Check")(payload, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        "request: not a valid grpc.health.v1.HealthCheckRequest message (malformed, a text field that is not UTF-8, "
        "or nested too deeply)"
    )


async def test_a_streamed_request_that_does_not_parse_is_invalid_argument(server: ServiceRunner) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reflection = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        call = reflection(iter([b"\x0a\x03\xff\xfe\xc0"]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid grpc.reflection.v1alpha.ServerReflectionRequest message" in (refused.value.details() or "")


async def test_a_request_that_parses_is_served(server: ServiceRunner) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert reply == b"\x08\x01"  # status: SERVING
