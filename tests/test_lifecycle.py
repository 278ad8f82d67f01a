"""Every service: NOT_SERVING until its warm-up succeeded, then SERVING; reflection lists it."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from askmesh.runtime.config import ServiceSettings
from askmesh.runtime.server import ServiceDefinition, ServiceRunner
from askmesh.v1 import embedder_pb2_grpc


async def test_not_serving_until_warm_then_serving_then_not_serving_on_stop() -> None:
    model_loaded = asyncio.Event()

    async def load_model() -> None:
        await model_loaded.wait()

    async def close() -> None:
        return None

    definition = ServiceDefinition(
        "embedder",
        ["askmesh.v1.Embedder"],
        lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(embedder_pb2_grpc.EmbedderServicer(), s),
        start=load_model,
        close=close,
    )
    settings = ServiceSettings(port=1, grace_period_s=1)
    settings.port = 0
    runner = ServiceRunner(definition, settings)
    await runner.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str = "") -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("askmesh.v1.Embedder") == health_pb2.HealthCheckResponse.NOT_SERVING
        model_loaded.set()
        assert runner.warm_up is not None
        await runner.warm_up
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        assert await status("askmesh.v1.Embedder") == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name async for reply in call for s in reply.list_services_response.service}
        assert {"askmesh.v1.Embedder", "grpc.health.v1.Health"} <= services

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(runner.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping


# -- draining on stop --------------------------------------------------------------------------

from collections.abc import AsyncIterator, Callable

import pytest

from askmesh.runtime.errors import streaming_rpc, unary_rpc
from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc


class TickingGenerator(generator_pb2_grpc.GeneratorServicer):
    """Streams `count` deltas 50 ms apart; records whether its stream was closed early."""

    def __init__(self) -> None:
        self.closed_early = asyncio.Event()

    @streaming_rpc(lambda error: generator_pb2.GenerateResponse(error=error))
    async def Generate(
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generator_pb2.GenerateResponse]:
        count = request.parameters.max_new_tokens
        finished = False
        try:
            for index in range(count):
                yield generator_pb2.GenerateResponse(delta=common_pb2.TokenDelta(text=f"{index} "))
                await asyncio.sleep(0.05)
            finished = True
            yield generator_pb2.GenerateResponse(
                done=generator_pb2.GenerateDone(finish_reason=common_pb2.FINISH_REASON_LENGTH)
            )
        finally:
            if not finished:
                self.closed_early.set()

    @unary_rpc
    async def GetModel(
        self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        """A unary call that takes far longer than any grace period here."""
        try:
            await asyncio.sleep(30)
        finally:
            self.closed_early.set()
        return common_pb2.ModelInfo(name="never")


async def start_ticking(grace_s: float) -> tuple[ServiceRunner, TickingGenerator]:
    servicer = TickingGenerator()

    async def nothing() -> None:
        return None

    definition = ServiceDefinition(
        "generator",
        ["askmesh.v1.Generator"],
        lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s),
        start=nothing,
        close=nothing,
        servicers=[servicer],
    )
    settings = ServiceSettings(port=1, grace_period_s=grace_s)
    settings.port = 0
    runner = ServiceRunner(definition, settings)
    await runner.start()
    assert runner.warm_up is not None
    await runner.warm_up
    return runner, servicer


async def first_refusal(
    call: Callable[[], AsyncIterator[generator_pb2.GenerateResponse]], timeout_s: float = 10.0
) -> grpc.aio.AioRpcError:
    """Makes the call again and again until the server refuses it with UNAVAILABLE; fails after
    `timeout_s`. A call that arrives just as grpc's own shutdown begins may be CANCELLED by it
    (a call received but not yet matched to a handler); once the shutdown is under way, every
    new call is UNAVAILABLE."""
    give_up = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < give_up:
        try:
            async for _ in call():
                pass
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                return error
        await asyncio.sleep(0.01)
    raise AssertionError(f"the server still took new calls {timeout_s} s after its stop began")


def ticks(count: int) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="go")],
        parameters=common_pb2.GenerationParameters(max_new_tokens=count),
    )


async def test_a_stream_in_flight_finishes_within_the_grace_period_and_new_calls_are_refused() -> None:
    runner, _ = await start_ticking(grace_s=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        call = stub.Generate(ticks(30))  # about 1.5 s
        first = await call.read()
        assert first.HasField("delta")
        assert runner.calls.total == 1
        stopping = asyncio.ensure_future(runner.stop())
        # New calls are refused once the stop has begun: until then one may still be taken.
        refused = await first_refusal(lambda: stub.Generate(ticks(1)))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        rest = []
        while (message := await call.read()) != grpc.aio.EOF:
            rest.append(message)
        assert rest[-1].HasField("done") and len(rest) == 30  # 29 more deltas, then done
        assert await call.code() == grpc.StatusCode.OK
        await stopping


async def test_a_stream_outlasting_the_grace_period_ends_with_a_final_error_not_a_reset() -> None:
    runner, servicer = await start_ticking(grace_s=0.5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        call = generator_pb2_grpc.GeneratorStub(channel).Generate(ticks(1000))
        first_message = await call.read()
        stopping = asyncio.ensure_future(runner.stop())
        messages = [first_message]
        try:
            while (message := await call.read()) != grpc.aio.EOF:
                messages.append(message)
        except grpc.aio.AioRpcError:
            pass
        await stopping
    assert messages[-1].WhichOneof("event") == "error"
    assert (messages[-1].error.code, messages[-1].error.message) == ("UNAVAILABLE", "server shutting down")
    assert await call.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.closed_early.is_set()  # the work behind the stream was stopped too


async def test_a_unary_call_outlasting_the_grace_period_ends_with_unavailable_and_its_work_stops() -> None:
    runner, servicer = await start_ticking(grace_s=0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        call = generator_pb2_grpc.GeneratorStub(channel).GetModel(common_pb2.GetModelRequest())
        while runner.calls.total == 0:
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(runner.stop())
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call
        await stopping
    assert (ended.value.code(), ended.value.details()) == (grpc.StatusCode.UNAVAILABLE, "server shutting down")
    assert servicer.closed_early.is_set()


async def test_a_stream_whose_caller_leaves_is_closed_and_counted_as_cancelled() -> None:
    runner, servicer = await start_ticking(grace_s=5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        call = generator_pb2_grpc.GeneratorStub(channel).Generate(ticks(1000))
        assert (await call.read()).HasField("delta")
        call.cancel()
        await asyncio.wait_for(servicer.closed_early.wait(), 10)
        while runner.calls.total:
            await asyncio.sleep(0.01)
        # The server keeps serving others: the cancellation was the caller's, not a drain's.
        again = generator_pb2_grpc.GeneratorStub(channel).Generate(ticks(2))
        assert [m.WhichOneof("event") async for m in again] == ["delta", "delta", "done"]
    await runner.stop()
