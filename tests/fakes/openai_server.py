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
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any] | None


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.script = OpenAIScript()
        self.requests: list[RecordedRequest] = []
        self.disconnected = threading.Event()
        self.tokens_sent = 0  # content chunks written by the last stream
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


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


def _handler_for(fake: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like uvicorn

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except ConnectionResetError:  # the client hung up between requests: nothing to answer
                self.close_connection = True

        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _write_chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            headers = {name.lower(): value for name, value in self.headers.items()}
            fake.requests.append(RecordedRequest(self.command, self.path, headers, body))
            if self.path != "/v1/chat/completions" or not body.get("stream"):
                error = {"message": "this fake only streams chat completions", "type": "NotFoundError"}
                self._send_json(404, {"error": {**error, "param": None, "code": 404}})
                return
            script = fake.script
            if script.http_status is not None:
                error_type = _ERROR_TYPES.get(script.http_status, "InternalServerError")
                error = {"message": script.error_message, "type": error_type}
                self._send_json(script.http_status, {"error": {**error, "param": None, "code": script.http_status}})
                return
            self._stream(script, body)

        def _stream(self, script: OpenAIScript, body: dict[str, Any]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            fake.tokens_sent = 0
            events: list[Any] = _chunks(script, body)
            if script.error_after_tokens is not None:
                error = {"object": "error", "message": script.error_message, "type": "InternalServerError"}
                events = events[: 1 + script.error_after_tokens] + [{"error": {**error, "param": None, "code": 500}}]
            try:
                for event in events:
                    if script.token_delay_s:
                        time.sleep(script.token_delay_s)
                    self._write_chunk(b"data: " + _encode(event) + b"\n\n")
                    if event.get("choices") and event["choices"][0]["delta"].get("content"):
                        fake.tokens_sent += 1
                self._write_chunk(b"data: [DONE]\n\n")
                self._write_chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                fake.disconnected.set()
                self.close_connection = True

    return Handler
