"""The TGI and OpenAI-compatible generation backends against loopback fakes of those servers.

The fakes (tests/fakes) speak the servers' streaming wire formats; these tests check what the
backends send, how they turn the streams into events, how they map failures to askmesh errors,
and that abandoning a generation hangs up on the server.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import huggingface_hub.constants
import pytest

from askmesh.runtime.errors import AskmeshError, InvalidArgument, ResourceExhausted, Unavailable
from askmesh.v1 import common_pb2
from services.generator.backends.base import (
    BackendEvent,
    FinishEvent,
    GenerationInput,
    TokenEvent,
    chatml_prompt,
)
from services.generator.backends.openai_compatible import OpenAICompatibleBackend
from services.generator.backends.tgi import TgiBackend
from services.generator.config import GeneratorSettings
from tests.fakes.openai_server import FakeOpenAIServer, OpenAIScript
from tests.fakes.tgi_server import EOS_TEXT, FakeTgiServer, TgiScript

MESSAGES = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "What is askmesh?"},
]


def make_request(**overrides: object) -> GenerationInput:
    fields: dict[str, object] = {
        "messages": MESSAGES,
        "max_new_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": [],
        "seed": None,
    }
    fields.update(overrides)
    return GenerationInput(**fields)  # type: ignore[arg-type]


async def collect(events: AsyncIterator[BackendEvent]) -> tuple[list[BackendEvent], AskmeshError | None]:
    """Every event, and the error that ended the stream (None when it finished)."""
    seen: list[BackendEvent] = []
    try:
        async for event in events:
            seen.append(event)
    except AskmeshError as error:
        return seen, error
    return seen, None


def texts(events: list[BackendEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, TokenEvent)]


def finish(events: list[BackendEvent]) -> FinishEvent:
    finishes = [event for event in events if isinstance(event, FinishEvent)]
    assert len(finishes) == 1 and events[-1] is finishes[0], events
    return finishes[0]


def unused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: nothing listens there


# --- TGI -------------------------------------------------------------------------------------


@pytest.fixture
def tgi() -> Iterator[FakeTgiServer]:
    with FakeTgiServer() as server:
        yield server


@pytest.fixture
async def tgi_backend(tgi: FakeTgiServer) -> AsyncIterator[TgiBackend]:
    backend = TgiBackend(GeneratorSettings(backend="tgi", url=tgi.url, port=1, request_timeout_s=10))
    yield backend
    await backend.close()


async def test_tgi_streams_tokens_in_order(tgi: FakeTgiServer, tgi_backend: TgiBackend) -> None:
    tgi.script = TgiScript(tokens=["Ask", "mesh", " is", " a", " RAG", " service", "."], input_length=40)

    events, error = await collect(tgi_backend.generate(make_request()))

    assert error is None
    assert texts(events) == ["Ask", "mesh", " is", " a", " RAG", " service", "."]
    assert "".join(texts(events)) == "Askmesh is a RAG service."
    done = finish(events)
    assert (done.completion_tokens, done.prompt_tokens) == (7, 40)


@pytest.mark.parametrize(
    ("finish_reason", "tokens", "stop", "expected_text", "expected_reason"),
    [
        ("length", ["a", "b", "c"], [], "abc", common_pb2.FINISH_REASON_LENGTH),
        # The fake ends with TGI's special end-of-sequence token, whose text must not show.
        ("eos_token", ["a", "b"], [], "ab", common_pb2.FINISH_REASON_EOS),
        # TGI streams the tokens of the stop sequence; they are cut from the output.
        ("stop_sequence", ["a", "b", "\n", "\n"], ["\n\n"], "ab", common_pb2.FINISH_REASON_STOP_SEQUENCE),
        # The ChatML end-of-turn marker we add ourselves is the model finishing, not a stop.
        ("stop_sequence", ["OK", "<|im_", "end|>"], [], "OK", common_pb2.FINISH_REASON_EOS),
    ],
)
async def test_tgi_finish_reasons(
    tgi: FakeTgiServer,
    tgi_backend: TgiBackend,
    finish_reason: str,
    tokens: list[str],
    stop: list[str],
    expected_text: str,
    expected_reason: int,
) -> None:
    tgi.script = TgiScript(tokens=tokens, finish_reason=finish_reason)

    events, error = await collect(tgi_backend.generate(make_request(stop=stop)))

    assert error is None
    assert "".join(texts(events)) == expected_text
    assert EOS_TEXT not in "".join(texts(events))
    assert finish(events).reason == expected_reason


async def test_tgi_request_carries_chatml_prompt_and_parameters(tgi: FakeTgiServer, tgi_backend: TgiBackend) -> None:
    await collect(tgi_backend.generate(make_request(max_new_tokens=64, stop=["###"], seed=7)))

    [request] = tgi.requests
    assert (request.method, request.path) == ("POST", "/generate_stream")
    assert request.body is not None
    assert request.body["inputs"] == chatml_prompt(MESSAGES)
    assert request.body["inputs"].startswith("<|im_start|>system\nAnswer from the context.<|im_end|>\n")
    assert request.body["inputs"].endswith("<|im_start|>assistant\n")
    assert request.body["stream"] is True
    parameters = request.body["parameters"]
    assert parameters["max_new_tokens"] == 64
    assert parameters["do_sample"] is True
    assert parameters["temperature"] == pytest.approx(0.7)
    assert parameters["top_p"] == pytest.approx(0.9)
    assert parameters["stop"] == ["###", "<|im_end|>"]
    assert parameters["seed"] == 7
    assert parameters["details"] is True


async def test_tgi_temperature_zero_is_greedy(tgi: FakeTgiServer, tgi_backend: TgiBackend) -> None:
    await collect(tgi_backend.generate(make_request(temperature=0.0, top_p=0.9)))

    parameters = tgi.requests[0].body["parameters"]  # type: ignore[index]
    assert parameters["do_sample"] is False
    # TGI rejects temperature 0, and top_p would turn sampling back on.
    assert "temperature" not in parameters
    assert "top_p" not in parameters


async def test_tgi_top_p_one_is_left_out(tgi: FakeTgiServer, tgi_backend: TgiBackend) -> None:
    await collect(tgi_backend.generate(make_request(temperature=0.5, top_p=1.0)))

    parameters = tgi.requests[0].body["parameters"]  # type: ignore[index]
    assert parameters["temperature"] == pytest.approx(0.5)
    assert "top_p" not in parameters  # TGI answers 422 to top_p == 1.0


@pytest.mark.parametrize(
    ("error_after", "error_type", "expected"),
    [
        (2, "generation", Unavailable),
        (3, "incomplete_generation", Unavailable),
        # TGI runs its validation and queue checks inside the stream: errors at event 0.
        (0, "overloaded", ResourceExhausted),
        (0, "validation", InvalidArgument),
    ],
)
async def test_tgi_error_event_after_the_tokens_before_it(
    tgi: FakeTgiServer, tgi_backend: TgiBackend, error_after: int, error_type: str, expected: type[AskmeshError]
) -> None:
    tgi.script = TgiScript(
        tokens=["one", " two", " three", " four"], error_after_tokens=error_after, error_type=error_type
    )

    events, error = await collect(tgi_backend.generate(make_request()))

    assert texts(events) == ["one", " two", " three", " four"][:error_after]
    assert not any(isinstance(event, FinishEvent) for event in events)
    assert type(error) is expected
    prefix = "parameters: " if expected is InvalidArgument else "generator: TGI"
    assert error is not None and error.message.startswith(prefix)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, None, ResourceExhausted),
        (429, b"rate limited by the proxy", ResourceExhausted),
        (422, None, InvalidArgument),
        (400, b"bad request", InvalidArgument),
        (500, None, Unavailable),
        (503, b"no healthy upstream", Unavailable),
    ],
)
async def test_tgi_http_errors(
    tgi: FakeTgiServer, tgi_backend: TgiBackend, status: int, body: bytes | None, expected: type[AskmeshError]
) -> None:
    tgi.script = TgiScript(http_status=status, http_body=body, error_message="Model is overloaded")

    events, error = await collect(tgi_backend.generate(make_request()))

    assert events == []
    assert type(error) is expected
    if expected is ResourceExhausted:
        assert error is not None and error.message.startswith("generator: TGI is overloaded: ")
    if expected is InvalidArgument:
        assert isinstance(error, InvalidArgument) and error.field == "parameters"


async def test_tgi_server_down_is_unavailable() -> None:
    backend = TgiBackend(GeneratorSettings(backend="tgi", url=unused_url(), port=1, request_timeout_s=5))

    with pytest.raises(Unavailable, match="generator: TGI"):
        await backend.start()
    _, error = await collect(backend.generate(make_request()))
    assert isinstance(error, Unavailable)


async def test_tgi_works_with_hf_hub_offline(
    tgi: FakeTgiServer, tgi_backend: TgiBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mesh sets HF_HUB_OFFLINE=1 for every service; huggingface_hub's own HTTP client would
    # then refuse to reach even a self-hosted TGI.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    events, error = await collect(tgi_backend.generate(make_request()))

    assert error is None
    assert "".join(texts(events)) == "Hello, world!"


async def test_tgi_start_runs_a_one_token_warm_up(tgi: FakeTgiServer, tgi_backend: TgiBackend) -> None:
    await tgi_backend.start()

    [request] = tgi.requests
    assert request.body is not None and request.body["parameters"]["max_new_tokens"] == 1
    assert tgi.stream_finished.wait(5) and tgi.tokens_sent == 1


async def test_tgi_closing_early_hangs_up_on_the_server(tgi: FakeTgiServer, tgi_backend: TgiBackend) -> None:
    tgi.script = TgiScript(tokens=[f" t{i}" for i in range(100)], token_delay_s=0.02)
    events = tgi_backend.generate(make_request(max_new_tokens=100))

    first = [await anext(events), await anext(events)]
    await events.aclose()

    assert texts(first) == [" t0", " t1"]
    # Waits without yielding to the event loop on purpose: the connection must be closed by
    # aclose() itself, not later by a task the loop runs when it finalizes abandoned generators.
    assert tgi.disconnected.wait(5), "TGI never saw the client go"
    assert tgi.tokens_sent < 100


# --- OpenAI-compatible -----------------------------------------------------------------------


@pytest.fixture
def vllm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
async def openai_backend(vllm: FakeOpenAIServer) -> AsyncIterator[OpenAICompatibleBackend]:
    settings = GeneratorSettings(
        backend="openai", url=vllm.url + "/", port=1, remote_model="HuggingFaceTB/SmolLM2-1.7B-Instruct",
        request_timeout_s=10,
    )
    backend = OpenAICompatibleBackend(settings)
    yield backend
    await backend.close()


async def test_openai_streams_tokens_in_order(vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend) -> None:
    vllm.script = OpenAIScript(tokens=["Ask", "mesh", " is", " a", " RAG", " service", "."], prompt_tokens=33)

    events, error = await collect(openai_backend.generate(make_request()))

    assert error is None
    assert texts(events) == ["Ask", "mesh", " is", " a", " RAG", " service", "."]
    assert "".join(texts(events)) == "Askmesh is a RAG service."
    done = finish(events)
    assert (done.completion_tokens, done.prompt_tokens) == (7, 33)


async def test_openai_without_usage_counts_deltas(
    vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend
) -> None:
    vllm.script = OpenAIScript(tokens=["a", "b", "c"], send_usage=False)

    events, _ = await collect(openai_backend.generate(make_request()))

    assert (finish(events).completion_tokens, finish(events).prompt_tokens) == (3, 0)


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "expected"),
    [
        ("stop", None, common_pb2.FINISH_REASON_EOS),
        ("stop", 2, common_pb2.FINISH_REASON_EOS),  # vLLM: a stop token id, e.g. <|im_end|>
        ("stop", "###", common_pb2.FINISH_REASON_STOP_SEQUENCE),  # vLLM: the stop string that matched
        ("length", None, common_pb2.FINISH_REASON_LENGTH),
    ],
)
async def test_openai_finish_reasons(
    vllm: FakeOpenAIServer,
    openai_backend: OpenAICompatibleBackend,
    finish_reason: str,
    stop_reason: str | int | None,
    expected: int,
) -> None:
    vllm.script = OpenAIScript(tokens=["a", "b"], finish_reason=finish_reason, stop_reason=stop_reason)

    events, error = await collect(openai_backend.generate(make_request(stop=["###"])))

    assert error is None
    assert "".join(texts(events)) == "ab"
    assert finish(events).reason == expected


async def test_openai_request_carries_messages_and_parameters(
    vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend
) -> None:
    await collect(openai_backend.generate(make_request(max_new_tokens=64, stop=["###", "\n\n"], seed=7)))

    [request] = vllm.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers.get("authorization") == "Bearer not-needed"
    body = request.body
    assert body is not None
    assert body["model"] == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert body["messages"] == MESSAGES
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 64
    assert body["temperature"] == pytest.approx(0.7)
    assert body["top_p"] == pytest.approx(0.9)
    assert body["stop"] == ["###", "\n\n"]
    assert body["seed"] == 7


async def test_openai_leaves_out_unset_options(vllm: FakeOpenAIServer) -> None:
    backend = OpenAICompatibleBackend(
        GeneratorSettings(backend="openai", url=vllm.url, port=1, api_key="sk-test", request_timeout_s=10)
    )
    try:
        await collect(backend.generate(make_request(temperature=0.0)))
    finally:
        await backend.close()

    [request] = vllm.requests
    assert request.headers.get("authorization") == "Bearer sk-test"
    assert request.body is not None
    assert request.body["model"] == "default"
    assert request.body["temperature"] == 0.0  # greedy on vLLM and llama.cpp
    assert "stop" not in request.body and "seed" not in request.body


async def test_openai_error_event_after_the_tokens_before_it(
    vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend
) -> None:
    vllm.script = OpenAIScript(tokens=["one", " two", " three", " four"], error_after_tokens=2)

    events, error = await collect(openai_backend.generate(make_request()))

    assert texts(events) == ["one", " two"]
    assert not any(isinstance(event, FinishEvent) for event in events)
    assert isinstance(error, Unavailable)
    assert "CUDA out of memory" in error.message


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, ResourceExhausted), (400, InvalidArgument), (422, InvalidArgument), (500, Unavailable), (503, Unavailable)],
)
async def test_openai_http_errors(
    vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend, status: int, expected: type[AskmeshError]
) -> None:
    vllm.script = OpenAIScript(http_status=status, error_message="max_tokens is too large")

    events, error = await collect(openai_backend.generate(make_request()))

    assert events == []
    assert type(error) is expected
    assert error is not None and "max_tokens is too large" in error.message
    if expected is InvalidArgument:
        assert isinstance(error, InvalidArgument) and error.field == "parameters"
    assert len(vllm.requests) == 1  # max_retries=0: no hidden retry


async def test_openai_server_down_is_unavailable_without_saying_where_it_lives(caplog: pytest.LogCaptureFixture) -> None:
    url = unused_url()
    backend = OpenAICompatibleBackend(GeneratorSettings(backend="openai", url=url, port=1, request_timeout_s=5))
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            await backend.start()
        _, error = await collect(backend.generate(make_request()))
        assert isinstance(error, Unavailable)
        assert "unreachable" in error.message and url not in error.message and "127.0.0.1" not in error.message
        assert url in caplog.text  # the operator's log says where
    finally:
        await backend.close()


async def test_openai_start_runs_a_one_token_warm_up(
    vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend
) -> None:
    await openai_backend.start()

    [request] = vllm.requests
    assert request.body is not None and request.body["max_tokens"] == 1
    assert vllm.stream_finished.wait(5) and vllm.tokens_sent == 1


async def test_openai_closing_early_hangs_up_on_the_server(
    vllm: FakeOpenAIServer, openai_backend: OpenAICompatibleBackend
) -> None:
    vllm.script = OpenAIScript(tokens=[f" t{i}" for i in range(100)], token_delay_s=0.02)
    events = openai_backend.generate(make_request(max_new_tokens=100))

    first = [await anext(events), await anext(events)]
    await events.aclose()

    assert texts(first) == [" t0", " t1"]
    # Without yielding to the event loop, as above: aclose() itself must close the connection.
    assert vllm.disconnected.wait(5), "the server never saw the client go"
    assert vllm.tokens_sent < 100
