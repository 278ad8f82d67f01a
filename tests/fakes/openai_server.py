"""A stand-in for an OpenAI-compatible server (vLLM), which cannot run here (no GPU, no weights).

It reproduces vLLM's streaming `POST /v1/chat/completions` (vllm/entrypoints/openai/serving_chat.py)
as a client sees it:

- HTTP 200, `text/event-stream`, chunked; `data: {json}\\n\\n` events, each a
  `chat.completion.chunk`: `{"id", "object", "created", "model", "choices": [{"index": 0,
  "delta": {...}, "logprobs": null, "finish_reason": null}]}`. The first delta is
  `{"role": "assistant", "content": ""}`, then one `{"content": ...}` per token; the last token's
  chunk carries `finish_reason` ("stop" | "length") and vLLM's extra `stop_reason` (null, the
  matched stop string, or a stop token id). With `stream_options.include_usage` a final chunk
  has `"choices": []` and `usage`. Then `data: [DONE]\\n\\n`.
- A failure once the stream has begun is one more event,
  `data: {"error": {"object": "error", "message", "type", "param", "code"}}`, then `[DONE]`.
- A failure before it is an HTTP status with an OpenAI-style body `{"error": {"message", "type",
  "param", "code"}}`.

A test sets `script` (what to answer), then reads `requests` (what the client sent) and
`disconnected` / `tokens_sent` (whether, and after how many tokens, the client hung up).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http_fake import FakeHandler, FakeServer, paced

_ERROR_TYPES = {400: "BadRequestError", 422: "UnprocessableEntityError", 429: "RateLimitError"}


@dataclass
class OpenAIScript:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    finish_reason: str = "stop"  # stop | length
    stop_reason: str | int | None = None  # vLLM: the stop string (or token id) that ended it
    token_delay_s: float = 0.0
    error_after_tokens: int | None = None  # then an error event instead of the rest
    error_message: str = "CUDA out of memory. Tried to allocate 20.00 MiB"
    http_status: int | None = None  # answer this status instead of a stream
    prompt_tokens: int = 21
    send_usage: bool = True  # False: ignore stream_options.include_usage, as some servers do


class FakeOpenAIServer(FakeServer[OpenAIScript]):
    def __init__(self) -> None:
        super().__init__(OpenAIScript(), _Handler, name="fake-openai")


def _chunks(script: OpenAIScript, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunk objects vLLM would send for this script (errors are added by the caller)."""
    texts, reason, stop_reason = list(script.tokens), script.finish_reason, script.stop_reason
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if max_tokens is not None and len(texts) > max_tokens:
        texts, reason, stop_reason = texts[:max_tokens], "length", None
    header = {
        "id": "chatcmpl-5f0c2d9e8b7a4c1d",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", ""),
    }

    def chunk(delta: dict[str, Any], **finish: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **finish}
        return {**header, "choices": [choice]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": text}) for text in texts] or [chunk({"content": ""})]
    chunks[-1]["choices"][0].update(finish_reason=reason, stop_reason=stop_reason)
    if script.send_usage and (body.get("stream_options") or {}).get("include_usage"):
        usage = {
            "prompt_tokens": script.prompt_tokens,
            "completion_tokens": len(texts),
            "total_tokens": script.prompt_tokens + len(texts),
        }
        chunks.append({**header, "choices": [], "usage": usage})
    return chunks


def _encode(event: dict[str, Any]) -> bytes:
    # vLLM writes chunks with pydantic's model_dump_json (compact) and errors with json.dumps.
    return json.dumps(event, separators=None if "error" in event else (",", ":")).encode()


def _sse(events: list[dict[str, Any]], delay_s: float) -> Iterator[tuple[bytes, bool]]:
    """The stream's `(data, is_token)` events; a token is a chunk with content."""
    for event in paced(events, delay_s):
        is_token = bool(event.get("choices") and event["choices"][0]["delta"].get("content"))
        yield b"data: " + _encode(event) + b"\n\n", is_token
    yield b"data: [DONE]\n\n", False


class _Handler(FakeHandler[OpenAIScript]):
    def do_POST(self) -> None:
        body = self.record() or {}
        if self.path != "/v1/chat/completions" or not body.get("stream"):
            error = {"message": "this fake only streams chat completions", "type": "NotFoundError"}
            self.send_json(404, {"error": {**error, "param": None, "code": 404}})
            return
        script = self.fake.script
        if script.http_status is not None:
            error_type = _ERROR_TYPES.get(script.http_status, "InternalServerError")
            error = {"message": script.error_message, "type": error_type}
            self.send_json(script.http_status, {"error": {**error, "param": None, "code": script.http_status}})
            return
        events = _chunks(script, body)
        if script.error_after_tokens is not None:
            error = {"object": "error", "message": script.error_message, "type": "InternalServerError"}
            events = events[: 1 + script.error_after_tokens] + [{"error": {**error, "param": None, "code": 500}}]
        self.send_event_stream({"Content-Type": "text/event-stream; charset=utf-8"}, _sse(events, script.token_delay_s))
