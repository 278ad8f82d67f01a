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
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any] | None


class FakeTgiServer:
    def __init__(self) -> None:
        self.script = TgiScript()
        self.requests: list[RecordedRequest] = []
        self.disconnected = threading.Event()
        self.tokens_sent = 0  # token events written by the last stream
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-tgi", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeTgiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


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


def _handler_for(fake: FakeTgiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like TGI's axum server

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except ConnectionResetError:  # the client hung up between requests: nothing to answer
                self.close_connection = True

        def _record(self) -> dict[str, Any] | None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            headers = {name.lower(): value for name, value in self.headers.items()}
            fake.requests.append(RecordedRequest(self.command, self.path, headers, body))
            return body

        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _write_chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def do_GET(self) -> None:
            self._record()
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/info":
                self._send_json(200, {"model_id": "fake/SmolLM2-135M-Instruct", "max_stop_sequences": 4})
            else:
                self._send_json(404, {"error": "not found", "error_type": "not_found"})

        def do_POST(self) -> None:
            body = self._record() or {}
            if self.path not in ("/generate_stream", "/") or (self.path == "/" and not body.get("stream")):
                self._send_json(404, {"error": "this fake only streams", "error_type": "not_found"})
                return
            script = fake.script
            if script.http_status is not None and script.http_body is not None:
                self.send_response(script.http_status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(script.http_body)))
                self.end_headers()
                self.wfile.write(script.http_body)
                return
            if script.http_status is not None:
                error_type = _ERROR_TYPES.get(script.http_status, "generation")
                self._send_json(script.http_status, {"error": script.error_message, "error_type": error_type})
                return
            self._stream(script, body.get("parameters") or {})

        def _stream(self, script: TgiScript, parameters: dict[str, Any]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            fake.tokens_sent = 0
            events = _stream_events(script, parameters.get("max_new_tokens"))
            if script.error_after_tokens is not None:
                error = {"error": script.error_message, "error_type": script.error_type}
                events = events[: script.error_after_tokens] + [error]
            try:
                for event in events:
                    if script.token_delay_s:
                        time.sleep(script.token_delay_s)
                    data = json.dumps(event, separators=(",", ":"))  # compact, as serde_json writes it
                    self._write_chunk(b"data:" + data.encode() + b"\n\n")
                    if "token" in event:
                        fake.tokens_sent += 1
                self._write_chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                fake.disconnected.set()
                self.close_connection = True

    return Handler
