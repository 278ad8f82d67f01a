"""The generator: its engine with the real SmolLM2 on llama.cpp, and its gRPC contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.runtime.errors import InvalidArgument
from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.generator.backends.local import LlamaCppBackend
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer
from tests.conftest import collect_generation, start_in_process


def request(content: str = "List three colours.", **parameters: object) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="You are brief."),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content),
        ],
        parameters=common_pb2.GenerationParameters(**parameters),  # type: ignore[arg-type]
    )


async def test_tokens_stream_then_done(generation_engine: GenerationEngine) -> None:
    text, done = await collect_generation(generation_engine.generate(request(max_new_tokens=8, temperature=0)))
    assert text.strip()
    assert done.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)
    assert 0 < done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens > 10
    assert done.model == "SmolLM2-135M-Instruct.Q4_1"
    assert 0 < done.timings.time_to_first_token_ms <= done.timings.total_ms


async def test_greedy_decoding_is_deterministic(generation_engine: GenerationEngine) -> None:
    first, _ = await collect_generation(generation_engine.generate(request(max_new_tokens=12, temperature=0)))
    second, _ = await collect_generation(generation_engine.generate(request(max_new_tokens=12, temperature=0)))
    assert first == second


async def test_a_stop_sequence_ends_the_answer_before_it(generation_engine: GenerationEngine) -> None:
    text, done = await collect_generation(
        generation_engine.generate(request("Count from 1 to 20, one number per line.", max_new_tokens=80, temperature=0, stop=["5"]))
    )
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    assert "5" not in text and "4" in text


async def test_a_prompt_longer_than_the_context_is_refused(generation_engine: GenerationEngine) -> None:
    with pytest.raises(InvalidArgument, match="^messages: the prompt has .* tokens; the model's context holds 4096"):
        await collect_generation(generation_engine.generate(request("word " * 6000)))


async def test_closing_the_stream_stops_generation(generation_engine: GenerationEngine) -> None:
    backend = generation_engine.backend
    assert isinstance(backend, LlamaCppBackend)
    stopped_before = backend.stopped_early_count
    stream = generation_engine.generate(request("Write a very long story about a ship.", max_new_tokens=400, temperature=0.8))
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    # The next generation queues behind the stopped one on the llama thread, so once it has
    # finished, the stopped one has reported how far it got.
    await collect_generation(generation_engine.generate(request(max_new_tokens=2)))
    assert backend.stopped_early_count == stopped_before + 1


# -- over gRPC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def generator_address(generation_engine: GenerationEngine) -> AsyncIterator[str]:
    servicer = GeneratorServicer(generation_engine)
    runner = await start_in_process(
        "generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s)
    )
    yield f"127.0.0.1:{runner.port}"
    await runner.stop()


async def test_generate_over_grpc(generator_address: str) -> None:
    async with grpc.aio.insecure_channel(generator_address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        text, done = await collect_generation(stub.Generate(request(max_new_tokens=6, temperature=0)))
    assert text and done.usage.completion_tokens <= 6


async def test_health_answers_while_tokens_are_generated(generator_address: str) -> None:
    async with grpc.aio.insecure_channel(generator_address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.Generate(request("Write a long poem.", max_new_tokens=200, temperature=0.7))
        await call.read()  # generation is under way
        reply = await health.Check(health_pb2.HealthCheckRequest(service="askmesh.v1.Generator"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert not call.done(), "the health check was answered only after the generation ended"
        call.cancel()


async def test_a_cancelled_call_stops_generation_upstream(generator_address: str, generation_engine: GenerationEngine) -> None:
    backend = generation_engine.backend
    assert isinstance(backend, LlamaCppBackend)
    stopped_before = backend.stopped_early_count
    async with grpc.aio.insecure_channel(generator_address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        call = stub.Generate(request("Write a very long story.", max_new_tokens=400, temperature=0.8))
        await call.read()
        await call.read()
        call.cancel()
    for _ in range(100):
        if backend.stopped_early_count > stopped_before:
            break
        await asyncio.sleep(0.1)
    assert backend.stopped_early_count == stopped_before + 1
    assert backend.last_completion_tokens < 400


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (generator_pb2.GenerateRequest(), "messages: must contain at least 1"),
        (generator_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(content="hi")]), "messages[0].role: must be"),
        (generator_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER)]), "messages[0].content: is empty"),
        (request(max_new_tokens=0), "parameters.max_new_tokens: 0 is out of range 1..2048"),
        (request(temperature=3), "parameters.temperature: 3 is out of range 0..2"),
        (request(top_p=0), "parameters.top_p: 0 is out of range (0, 1]"),
        (request(stop=["a", "b", "c", "d", "e"]), "parameters.stop: 5 stop sequences exceed the limit of 4"),
        (request(stop=[""]), "parameters.stop[0]: must be 1 to 64 characters"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    generator_address: str, bad: generator_pb2.GenerateRequest, message: str
) -> None:
    async with grpc.aio.insecure_channel(generator_address) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect_generation(stub.Generate(bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(message), raised.value.details()


# -- admission control -------------------------------------------------------------------------


class GatedBackend:
    """A backend whose generations wait for the test to let them finish (admission logic only)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(self, request: object) -> AsyncIterator[object]:
        from services.generator.backends.base import FinishEvent, TokenEvent

        self.started += 1
        yield TokenEvent("x")
        await self.release.wait()
        yield FinishEvent(reason=common_pb2.FINISH_REASON_EOS, completion_tokens=1)


async def test_beyond_the_slots_and_the_queue_calls_are_refused_at_once() -> None:
    from askmesh.runtime.errors import ResourceExhausted
    from services.generator.config import GeneratorSettings

    backend = GatedBackend()
    engine = GenerationEngine(GeneratorSettings(max_concurrent_generations=1, max_queued_generations=1), backend=backend)
    await engine.start()
    running = engine.generate(request())
    await anext(running)  # holds the only slot
    queued = asyncio.ensure_future(collect_generation(engine.generate(request())))
    for _ in range(100):
        if engine.waiting == 1:
            break
        await asyncio.sleep(0.01)
    assert (engine.running, engine.waiting) == (1, 1)
    with pytest.raises(ResourceExhausted, match="1 generations running and 1 waiting"):
        await anext(engine.generate(request()))
    assert engine.refused == 1 and backend.started == 1  # the refused call never reached the model
    backend.release.set()
    await collect_generation(running)
    await queued
    assert (engine.running, engine.waiting) == (0, 0)
    await collect_generation(engine.generate(request()))  # room again


async def test_overflow_over_grpc_is_resource_exhausted_with_the_real_model() -> None:
    from services.generator.config import GeneratorSettings

    engine = GenerationEngine(GeneratorSettings(max_queued_generations=0))
    await engine.start()
    servicer = GeneratorServicer(engine)
    runner = await start_in_process(
        "generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            long_call = stub.Generate(request("Write a very long story.", max_new_tokens=300, temperature=0.8))
            await long_call.read()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect_generation(stub.Generate(request(max_new_tokens=4)))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "try another replica" in refused.value.details()
            long_call.cancel()
    finally:
        await runner.stop()
        await engine.close()
