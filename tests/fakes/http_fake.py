"""What the loopback fakes share: a threaded HTTP server on a free port that records each request,
and handler helpers for JSON bodies and chunked server-sent event streams.

A fake subclasses `FakeServer` with its script type and `FakeHandler` with its routes; the handler
reaches the fake (its `script`, `requests`, ...) as `self.fake`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Self, TypeVar

S = TypeVar("S")  # the fake's script: what it answers
T = TypeVar("T")

_HOST = "127.0.0.1"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any] | None


class FakeHandler(BaseHTTPRequestHandler, Generic[S]):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like TGI's axum and vLLM's uvicorn
    server: _LoopbackServer[S]

    @property
    def fake(self) -> FakeServer[S]:
        return self.server.fake

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionResetError:  # the client hung up between requests: nothing to answer
            self.close_connection = True

    def record(self) -> dict[str, Any] | None:
        """Reads the JSON body (None when there is none) and adds the request to `fake.requests`."""
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.fake.requests.append(RecordedRequest(self.command, self.path, headers, body))
        return body

    def send_bytes(self, status: int, data: bytes, content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, payload: Any) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json")

    def send_event_stream(self, headers: Mapping[str, str], events: Iterable[tuple[bytes, bool]]) -> None:
        """Answers 200 with a chunked body, one chunk per `(data, is_token)` event.

        Counts the token events written into `fake.tokens_sent`; a client that hangs up mid-stream
        sets `fake.disconnected`, which is how a test sees that a cancelled stream reached the server.
        """
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.fake.tokens_sent = 0
        self.fake.stream_finished.clear()
        try:
            for data, is_token in events:
                self._write_chunk(data)
                if is_token:
                    self.fake.tokens_sent += 1
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.fake.disconnected.set()
            self.close_connection = True
        finally:
            # The client may have read the last event before this thread counted it.
            self.fake.stream_finished.set()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def paced(items: Iterable[T], delay_s: float) -> Iterator[T]:
    """`items`, each after `delay_s`: a server that takes that long per token."""
    for item in items:
        if delay_s:
            time.sleep(delay_s)
        yield item


class FakeServer(Generic[S]):
    """Serves on 127.0.0.1 at a free port, from a daemon thread, while used as a context manager.

    A test sets `script` (what to answer), then reads `requests` (what the client sent) and
    `disconnected` / `tokens_sent` (whether, and after how many tokens, the client hung up).
    """

    def __init__(self, script: S, handler: type[FakeHandler[S]], name: str) -> None:
        self.script = script
        self.requests: list[RecordedRequest] = []
        self.disconnected = threading.Event()
        self.tokens_sent = 0  # token events written by the last stream
        self.stream_finished = threading.Event()  # the last stream's handler is done writing
        self._server = _LoopbackServer(self, handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name=name, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self._server.server_port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _LoopbackServer(ThreadingHTTPServer, Generic[S]):
    # Carries the fake so that handlers, which the server creates per request, can reach it.
    def __init__(self, fake: FakeServer[S], handler: type[FakeHandler[S]]) -> None:
        self.fake = fake
        super().__init__((_HOST, 0), handler)
