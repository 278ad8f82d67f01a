"""The web tier's translation between OpenAI's API and askmesh's, without a server: requests to
Ask, Ask's stream to chunks and Server-Sent Events, gRPC statuses to OpenAI errors."""

from __future__ import annotations

import json

import grpc
import pytest
from pydantic import ValidationError

from askmesh.runtime.errors import AskmeshError, InvalidArgument, NotFound, ResourceExhausted
from askmesh.v1 import common_pb2, gateway_pb2
from services.web import engine
from services.web.errors import error_body, http_status, retry_headers
from services.web.schemas import ChatCompletionRequest, EmbeddingsRequest, problem

LIMITS = engine.HistoryLimits(messages=20, chars=8000)


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "default", **fields})


def test_a_conversation_becomes_a_question_its_history_and_parameters() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": [{"type": "text", "text": "Q2"}, {"type": "text", "text": "more"}]},
        ],
        max_tokens=10, temperature=0.5, top_p=0.9, stop="END", seed=3,
    )
    translation = engine.ask_request(body, LIMITS)
    request = translation.request
    assert request.question == "Q2\nmore" and request.knowledge_base == "default"
    assert [(m.role, m.content) for m in request.history] == [(common_pb2.ROLE_USER, "Q1"), (common_pb2.ROLE_ASSISTANT, "A1")]
    parameters = request.parameters
    assert (parameters.max_new_tokens, parameters.top_p, list(parameters.stop), parameters.seed) == (10, pytest.approx(0.9), ["END"], 3)
    assert parameters.temperature == pytest.approx(0.5)
    # The gateway's field names lead back to the messages they came from.
    assert translation.fields["question"] == "messages[3].content"
    assert translation.fields["history[1]"] == "messages[2]"
    # Unset parameters stay unset: the generator's defaults apply.
    bare = engine.ask_request(chat(messages=[{"role": "user", "content": "Q"}]), LIMITS).request.parameters
    assert not bare.HasField("max_new_tokens") and not bare.HasField("temperature") and not bare.HasField("seed")
    assert engine.ask_request(chat(messages=[{"role": "user", "content": "Q"}], max_completion_tokens=5), LIMITS).request.parameters.max_new_tokens == 5


def test_only_the_newest_history_that_fits_is_passed_on_starting_with_a_question() -> None:
    turns = []
    for index in range(30):
        turns += [{"role": "user", "content": f"q{index}"}, {"role": "assistant", "content": f"a{index}"}]
    request = engine.ask_request(chat(messages=[*turns, {"role": "user", "content": "now"}]), engine.HistoryLimits(5, 8000)).request
    # Five would start with an answer: the oldest is dropped so the history starts with a question.
    assert [m.content for m in request.history] == ["q28", "a28", "q29", "a29"]
    by_chars = engine.ask_request(chat(messages=[*turns, {"role": "user", "content": "now"}]), engine.HistoryLimits(20, 6)).request
    assert [m.content for m in by_chars.history] == ["q29", "a29"]


def test_what_askmesh_cannot_honour_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^messages\[1\]: the last message must be the user's question"):
        engine.ask_request(chat(messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]), LIMITS)
    with pytest.raises(InvalidArgument, match=r"^messages\[0\]\.role: 'tool' messages are not supported"):
        engine.ask_request(chat(messages=[{"role": "tool", "content": "x"}, {"role": "user", "content": "Q"}]), LIMITS)
    refusals = [
        ({"messages": [{"role": "user", "content": "Q"}], "n": 3}, "n: must be 1"),
        ({"messages": [{"role": "user", "content": "Q"}], "tools": [{"type": "function"}]}, "tools: askmesh answers"),
        ({"messages": [{"role": "user", "content": "Q"}], "stop": [1]}, "stop: must be a string or a list of strings"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content: part 0 is 'image_url'"),
        ({"messages": [{"role": "user", "content": "Q"}], "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({}, "messages: is required"),
    ]
    for fields, expected in refusals:
        with pytest.raises(ValidationError) as raised:
            chat(**fields)
        assert problem(raised.value)[1].startswith(expected), problem(raised.value)
    with pytest.raises(ValidationError) as raised:
        EmbeddingsRequest.model_validate({"model": "default", "input": [1, 2]})
    assert problem(raised.value) == ("input", "input: token arrays are not supported; send the text")


def test_the_gateways_errors_come_back_with_openai_field_names() -> None:
    fields = {"question": "messages[4].content", "history[0]": "messages[1]"}
    cases = [
        (InvalidArgument("parameters.temperature", "3 is out of range 0..2"), "temperature: 3 is out of range 0..2"),
        (InvalidArgument("parameters.stop[2]", "must be 1 to 64 characters"), "stop[2]: must be 1 to 64 characters"),
        (InvalidArgument("question", "is empty"), "messages[4].content: is empty"),
        (InvalidArgument("history[0].content", "is too long"), "messages[1].content: is too long"),
        (InvalidArgument("texts[1]", "is empty"), "input[1]: is empty"),
        (ResourceExhausted("generator: the line is full; ask again in 3 s", retry_after_s=2.5), "generator: the line is full; ask again in 3 s"),
    ]
    for error, expected in cases:
        renamed, code = engine.for_caller(error, "default", fields)
        assert renamed.message == expected and renamed.code == error.code and code is None
    assert engine.for_caller(cases[-1][0], "default")[0].retry_after_s == 2.5
    for unknown in (NotFound("knowledge_base: 'nope' does not exist"), InvalidArgument("knowledge_base", "must be lowercase")):
        renamed, code = engine.for_caller(unknown, "nope")
        assert renamed.code == grpc.StatusCode.NOT_FOUND and code == "model_not_found"
        assert renamed.message == "model: 'nope' does not exist; GET /v1/models lists the knowledge bases this key can ask"


def citation(number: int) -> gateway_pb2.Citation:
    cited = gateway_pb2.Citation(number=number, document_id="doc", title="Doc", text="text", score=0.5, in_prompt=True)
    cited.metadata.update({"page": 3, "section": "A > B"})
    return cited


def events_of(answer: engine.Answer, messages: list[gateway_pb2.AskResponse]) -> list[bytes]:
    return [event for message in messages for event in answer.events(message)]


def test_an_answer_streams_as_openai_chunks_with_sources_first_and_usage_last() -> None:
    messages = [
        gateway_pb2.AskResponse(queued=common_pb2.QueueStatus(position=2, estimated_wait_ms=1500.4)),
        gateway_pb2.AskResponse(sources=gateway_pb2.Sources(citations=[citation(1), citation(2)])),
        gateway_pb2.AskResponse(delta=common_pb2.TokenDelta(text="Hello")),
        gateway_pb2.AskResponse(delta=common_pb2.TokenDelta(text=" [1]")),
        gateway_pb2.AskResponse(done=gateway_pb2.AskDone(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=100, completion_tokens=2, cached_prompt_tokens=60),
        )),
    ]
    answer = engine.Answer("default", include_usage=True)
    events = events_of(answer, messages)
    assert events[0] == b': queued {"position": 2, "estimated_wait_ms": 1500}\n\n'
    assert events[-1] == engine.DONE_EVENT
    chunks = [json.loads(event[len(b"data: "):]) for event in events[1:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [s["number"] for s in chunks[0]["sources"]] == [1, 2]
    assert chunks[0]["sources"][0]["metadata"] == {"page": 3, "section": "A > B"}  # a page is 3, not 3.0
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hello", " [1]"]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {
        "prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102, "prompt_tokens_details": {"cached_tokens": 60},
    }
    assert all(chunk["usage"] is None for chunk in chunks[:4]) and len({c["id"] for c in chunks}) == 1
    completion = answer.completion()
    assert completion["choices"][0]["message"]["content"] == "Hello [1]" and len(completion["sources"]) == 2
    # Without include_usage: no usage anywhere in the stream.
    plain = events_of(engine.Answer("default"), messages)
    assert b"usage" not in b"".join(plain) and plain[-1] == engine.DONE_EVENT


def test_each_grpc_status_has_its_http_status_and_a_failed_stream_no_done() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNKNOWN: 500,
    }
    for code, status in expected.items():
        assert http_status(code).status == status, code
    full = ResourceExhausted("generator: the line is full", retry_after_s=2.2)
    assert retry_headers(full) == {"Retry-After": "3"} and retry_headers(NotFound("x")) == {}
    assert error_body(InvalidArgument("temperature", "3 is out of range")) == {
        "error": {"message": "temperature: 3 is out of range", "type": "invalid_request_error", "param": "temperature",
                  "code": "invalid_argument"}
    }
    event = engine.error_event(AskmeshError("generator tier failed mid-stream (UNAVAILABLE)", code=grpc.StatusCode.UNAVAILABLE))
    assert event.startswith(b"data: {") and event.endswith(b"\n\n") and b"[DONE]" not in event
    assert json.loads(event[6:])["error"]["param"] is None
