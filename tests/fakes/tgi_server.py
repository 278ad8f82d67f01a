"""A stand-in for a text-generation-inference (TGI) server, which cannot run here (no GPU, no weights).

It reproduces the parts of TGI's HTTP API (router/src/server.rs, router/src/lib.rs of TGI 2.x/3.x)
that a streaming client sees:

- `POST /generate_stream` (and `POST /` with `"stream": true`, TGI's compat route): HTTP 200,
  `text/event-stream`, chunked; one `data:{json}\\n\\n` event per token, each
  `{"index", "token": {"id", "text", "logprob", "special"}, "generated_text": null, "details": null}`
  (`top_tokens` is left out, as TGI's serde does when it is empty). The last event carries
  `generated_text` and `details: {"finish_reason": "length" | "eos_token" | "stop_sequence",
  "generated_tokens", "seed", "input_length"}`. On `eos_token` the last token is the special
  end-of-sequence token, as TGI streams it.
- A failure once the stream has begun (including TGI's own validation and overload checks,
  which run inside the stream) is one more event: `data:{"error": "...", "error_type": "..."}`.
- A failure before it (a proxy's 429, the non-streaming checks) is an HTTP status with TGI's
  `{"error", "error_type"}` JSON body.
- `GET /health` and `GET /info`.

A test sets `script` (what to answer), then reads `requests` (what the client sent) and
`disconnected` / `tokens_sent` (whether, and after how many tokens, the client hung up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http_fake import FakeHandler, FakeServer, paced

EOS_TEXT = "<|im_end|>"
_ERROR_TYPES = {422: "validation", 424: "generation", 429: "overloaded", 500: "incomplete_generation"}


@dataclass
class TgiScript:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    finish_reason: str = "length"  # length | eos_token | stop_sequence
    token_delay_s: float = 0.0
    error_after_tokens: int | None = None  # then an error event instead of the rest
    error_type: str = "generation"
    error_message: str = "Request failed during generation: Server error: CUDA out of memory"
    http_status: int | None = None  # answer this status instead of a stream
    http_body: bytes | None = None  # with http_status: this body instead of TGI's (e.g. a proxy's)
    input_length: int = 12


class FakeTgiServer(FakeServer[TgiScript]):
    def __init__(self) -> None:
        super().__init__(TgiScript(), _Handler, name="fake-tgi")


def _token(index: int, text: str, special: bool) -> dict[str, Any]:
    return {"id": 1000 + index, "text": text, "logprob": -0.25, "special": special}


def _stream_events(script: TgiScript, max_new_tokens: int | None) -> list[dict[str, Any]]:
    """The token events TGI would send, final details included (errors are added by the caller)."""
    texts, reason = list(script.tokens), script.finish_reason
    if max_new_tokens is not None and len(texts) > max_new_tokens:
        texts, reason = texts[:max_new_tokens], "length"
    tokens = [_token(i, text, False) for i, text in enumerate(texts)]
    if reason == "eos_token":
        tokens.append(_token(len(tokens), EOS_TEXT, True))
    events = [
        {"index": i + 1, "token": token, "generated_text": None, "details": None} for i, token in enumerate(tokens)
    ]
    if events:
        events[-1]["generated_text"] = "".join(texts)  # TGI decodes with special tokens skipped
        events[-1]["details"] = {
            "finish_reason": reason,
            "generated_tokens": len(tokens),
            "seed": None,
            "input_length": script.input_length,
        }
    return events


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))  # compact, as serde_json writes it
    return b"data:" + data.encode() + b"\n\n"


class _Handler(FakeHandler[TgiScript]):
    def do_GET(self) -> None:
        self.record()
        if self.path == "/health":
            self.send_bytes(200, b"")
        elif self.path == "/info":
            self.send_json(200, {"model_id": "fake/SmolLM2-135M-Instruct", "max_stop_sequences": 4})
        else:
            self.send_json(404, {"error": "not found", "error_type": "not_found"})

    def do_POST(self) -> None:
        body = self.record() or {}
        if self.path not in ("/generate_stream", "/") or (self.path == "/" and not body.get("stream")):
            self.send_json(404, {"error": "this fake only streams", "error_type": "not_found"})
            return
        script = self.fake.script
        if script.http_status is not None and script.http_body is not None:
            self.send_bytes(script.http_status, script.http_body, "text/plain")
            return
        if script.http_status is not None:
            error_type = _ERROR_TYPES.get(script.http_status, "generation")
            self.send_json(script.http_status, {"error": script.error_message, "error_type": error_type})
            return
        events = _stream_events(script, (body.get("parameters") or {}).get("max_new_tokens"))
        if script.error_after_tokens is not None:
            error = {"error": script.error_message, "error_type": script.error_type}
            events = events[: script.error_after_tokens] + [error]
        sse = ((_sse(event), "token" in event) for event in paced(events, script.token_delay_s))
        self.send_event_stream({"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}, sse)
