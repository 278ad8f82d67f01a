"""The generator: its engine with the real SmolLM2 on llama.cpp, and its gRPC contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.runtime.errors import InvalidArgument, ResourceExhausted, retry_after_of
from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.generator.backends.local import LlamaCppBackend
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine
from services.generator.prompting import SOURCES_PREAMBLE
from services.generator.servicer import GeneratorServicer
from tests.conftest import collect_generation, start_in_process, until
from tests.fakes.generators import GatedBackend


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
    await first_delta(stream)
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
        await first_delta(call)  # generation is under way
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
        await first_delta(call)
        await anext(aiter(call))
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


async def gated_engine(**settings: object) -> tuple[GenerationEngine, GatedBackend]:
    backend = GatedBackend()
    engine = GenerationEngine(GeneratorSettings(max_concurrent_generations=1, **settings), backend=backend)  # type: ignore[arg-type]
    await engine.start()
    return engine, backend


async def read_all(call: grpc.aio.StreamStreamCall) -> AsyncIterator[generator_pb2.GenerateResponse]:
    """The rest of a call read with read() (a call's iterator and read() may not be mixed)."""
    while (message := await call.read()) is not grpc.aio.EOF:
        yield message


async def first_delta(stream: AsyncIterator[generator_pb2.GenerateResponse]) -> list[str]:
    """Reads a generation's messages up to its first delta; returns the kinds read."""
    kinds = []
    async for message in stream:
        kinds.append(message.WhichOneof("event"))
        if kinds[-1] == "delta":
            return kinds
    raise AssertionError(f"no delta in {kinds}")


async def test_calls_wait_in_arrival_order_and_see_their_place_move() -> None:
    engine, backend = await gated_engine(max_queue_wait_s=600)
    running = engine.generate(request("first"))
    assert await first_delta(running) == ["queued", "started", "delta"]
    followers = [engine.generate(request(f"follower {n}")) for n in range(3)]
    standings = [await anext(follower) for follower in followers]
    assert [s.queued.position for s in standings] == [1, 2, 3]
    waits = [s.queued.estimated_wait_ms for s in standings]
    assert 0 < waits[0] < waits[1] < waits[2]
    # The first follower leaves the line: the others move up, and are told.
    await followers[0].aclose()
    assert engine.waiting == 2
    moved = [await anext(followers[1]), await anext(followers[2])]
    assert [m.queued.position for m in moved] == [1, 2]
    # The slot is handed on in arrival order.
    backend.release.set()
    await collect_generation(running)
    text, _ = await collect_generation(followers[1])
    await collect_generation(followers[2])
    assert [prompt[-1]["content"] for prompt in backend.prompts] == ["first", "follower 1", "follower 2"]
    assert (engine.running, engine.waiting) == (0, 0)


async def test_a_call_that_would_wait_too_long_is_refused_at_once_with_a_time_to_retry() -> None:
    engine, backend = await gated_engine(max_queue_wait_s=5)
    # Each generation is expected to hold the slot 2 s (the line's first guess): one running
    # and two waiting make a newcomer's wait 2 + 2 + 2 = 6 s > 5 s.
    running = engine.generate(request())
    await first_delta(running)
    waiting = [engine.generate(request()) for _ in range(2)]
    for call in waiting:
        await anext(call)
    with pytest.raises(ResourceExhausted) as refused:
        await anext(engine.generate(request()))
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    assert "generator: 3 generations are ahead" in refused.value.message
    assert "try again in about" in refused.value.message
    assert engine.refused == 1 and backend.started == 1  # the refused call never reached the model
    assert engine.waiting == 2  # and took no place
    # The caller's own deadline bounds the wait too: 3 s left is less than 4 s of waiting.
    await waiting[1].aclose()
    with pytest.raises(ResourceExhausted):
        engine.admit(deadline_s=3)
    engine.queue.leave(engine.admit(deadline_s=5))  # 4 s fits
    backend.release.set()
    await collect_generation(running)
    await collect_generation(waiting[0])
    await collect_generation(engine.generate(request()))  # room again


async def test_a_generation_that_ends_early_does_not_count_in_the_expected_slot_time() -> None:
    engine, backend = await gated_engine()
    mean = engine.queue.mean_slot_s
    call = engine.generate(request())
    await first_delta(call)
    await call.aclose()  # the caller left: its short time says nothing about generations
    assert engine.queue.mean_slot_s == mean and engine.running == 0
    backend.release.set()
    await collect_generation(engine.generate(request()))
    assert engine.queue.mean_slot_s < mean  # a finished one (here, instant) does


async def test_passages_are_placed_after_the_instructions_within_the_budget() -> None:
    engine, backend = await gated_engine()
    backend.release.set()
    generate = request("Which colour?")
    generate.passages.extend(
        [
            generator_pb2.ContextPassage(number=1, title="Long", text="word " * 50),
            generator_pb2.ContextPassage(number=2, title="Blue", text="The sky is blue."),
            generator_pb2.ContextPassage(number=3, title="Green", text="Grass is green."),
        ]
    )
    generate.context_token_budget = 20  # words, with GatedBackend's count: passage 1 cannot fit
    messages = [m async for m in engine.generate(generate)]
    started = next(m.started for m in messages if m.HasField("started"))
    assert list(started.passages_used) == [1, 2]
    system = backend.prompts[-1][0]
    assert system["role"] == "system" and system["content"].startswith(f"You are brief.\n\n{SOURCES_PREAMBLE}\n")
    assert "<source>\n[2] Blue\nThe sky is blue.\n</source>" in system["content"] and "[1]" not in system["content"]
    assert backend.prompts[-1][-1] == {"role": "user", "content": "Which colour?"}


async def test_refusal_over_grpc_carries_retry_pushback_and_admission_comes_before_the_prompt() -> None:
    engine, backend = await gated_engine(max_queue_wait_s=3)
    servicer = GeneratorServicer(engine)
    runner = await start_in_process(
        "generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            # Admitted with a free slot: the answer comes before any prompt is sent.
            holder = stub.AdmitAndGenerate()
            await holder.write(generator_pb2.AdmitAndGenerateRequest(admission=generator_pb2.Admission()))
            first = await holder.read()
            assert first.queued.position == 0 and engine.running == 1 and backend.started == 0
            # Second in line, also before its prompt.
            second = stub.AdmitAndGenerate()
            await second.write(generator_pb2.AdmitAndGenerateRequest(admission=generator_pb2.Admission()))
            assert (await second.read()).queued.position == 1
            # A third would wait about 4 s > 3 s: refused at once, with a pushback trailer.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect_generation(stub.Generate(request()))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_after_of(refused.value) is not None and retry_after_of(refused.value) > 0
            assert backend.started == 0
            # A caller's deadline shorter than the wait is refused too, not left to expire.
            with pytest.raises(grpc.aio.AioRpcError) as too_soon:
                await collect_generation(stub.Generate(request(), timeout=1.5))
            assert too_soon.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The holder sends its prompt: the slot it held waited for it.
            await holder.write(generator_pb2.AdmitAndGenerateRequest(generate=request("held")))
            await holder.done_writing()
            backend.release.set()
            text, done = await collect_generation(read_all(holder))
            assert text == "x" and done.finish_reason == common_pb2.FINISH_REASON_EOS
            # The second leaves while it waits: its place is given up.
            second.cancel()
            await until(lambda: engine.running + engine.waiting == 0, "the second call left the line")
            # A first message that is not an admission names the field.
            bad = stub.AdmitAndGenerate()
            await bad.write(generator_pb2.AdmitAndGenerateRequest(generate=request()))
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await bad.read()
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert invalid.value.details().startswith("admission: ")
    finally:
        await runner.stop()
        await engine.close()
