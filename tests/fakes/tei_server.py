"""A stand-in for a HuggingFace text-embeddings-inference (TEI) server that serves a reranker,
which cannot run here (no reranker weights; TEI is a Rust binary with its own model download).

It reproduces what a client of TEI's `/rerank` sees, as TEI's router writes it (TEI 1.9.3,
router/src/http/server.rs `async fn rerank`, router/src/http/types.rs, router/src/lib.rs):

- `POST /rerank` `{"query", "texts", "truncate"?, "truncation_direction"?, "raw_scores"?,
  "return_text"?}` -> 200, a JSON list of `{"index", "score"}` (plus `"text"` with return_text)
  sorted by score, best first; scores are the sigmoid of the model's logit unless raw_scores.
  Timing headers as TEI sends them (`x-compute-time`, `x-total-time`, `x-queue-time`, ... in ms).
- Errors as `{"error", "error_type"}` with serde's variant names ("Overloaded", "Validation",
  "Empty", "Backend", "Unhealthy") and TEI's statuses: 400 no texts, 422 more texts than
  --max-client-batch-size, 429 overloaded, 424 backend failure, 503 unhealthy; 413 for a body
  above --payload-limit is axum's own plain-text answer; 401 (empty body) without the api key.
- `GET /info` with `model_id` and `model_type: {"reranker": {...}}`; `GET /health`.

The model's raw score of each (query, text) pair is the script's `logit` function (by default
the share of the query's words found in the text), so a test decides the order.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http_fake import FakeHandler, FakeServer

AXUM_LENGTH_LIMIT = b"Failed to buffer the request body: length limit exceeded"
_ERRORS: dict[int, tuple[str, str]] = {
    424: ("Backend error: Inference failed", "Backend"),
    429: ("Model is overloaded", "Overloaded"),
    503: ("unhealthy", "Unhealthy"),
}


def word_overlap(query: str, text: str) -> float:
    words = set(query.lower().split())
    return len(words & set(text.lower().split())) / max(len(words), 1)


@dataclass
class TeiScript:
    logit: Callable[[str, str], float] = word_overlap
    model_id: str = "fake/bge-reranker-base"
    model_type: str = "reranker"  # "embedding" or "classifier" for a server that is not one
    max_client_batch_size: int = 32
    payload_limit: int = 2_000_000
    api_key: str | None = None  # then every request needs `Authorization: Bearer <key>`
    # The next `fail_times` /rerank requests answer this status with TEI's body (then normal again).
    fail_status: int | None = None
    fail_times: int = 0
    # Seconds each /rerank request takes (TEI's queue and inference).
    delay_s: float = 0.0


class FakeTeiServer(FakeServer[TeiScript]):
    def __init__(self) -> None:
        super().__init__(TeiScript(), _Handler, name="fake-tei")
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


class _Handler(FakeHandler[TeiScript]):
    def _authorized(self) -> bool:
        key = self.fake.script.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self.send_bytes(401, b"")
        return False

    def do_GET(self) -> None:
        self.record()
        if not self._authorized():
            return
        script = self.fake.script
        if self.path == "/health":
            self.send_bytes(200, b"")
        elif self.path == "/info":
            self.send_json(
                200,
                {
                    "model_id": script.model_id,
                    "model_sha": None,
                    "model_dtype": "float32",
                    "model_type": {script.model_type: {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
                    "max_concurrent_requests": 512,
                    "max_input_length": 512,
                    "max_batch_tokens": 16384,
                    "max_batch_requests": None,
                    "max_client_batch_size": script.max_client_batch_size,
                    "auto_truncate": True,
                    "tokenization_workers": 2,
                    "version": "1.9.3",
                },
            )
        else:
            self.send_bytes(404, b"")

    def do_POST(self) -> None:
        script = self.fake.script
        length = int(self.headers.get("Content-Length") or 0)
        if length > script.payload_limit:
            self.rfile.read(length)
            self.send_bytes(413, AXUM_LENGTH_LIMIT, "text/plain; charset=utf-8")
            return
        body = self.record() or {}
        if not self._authorized():
            return
        if self.path != "/rerank":
            self.send_bytes(404, b"")
            return
        with self.fake.lock:
            failing = script.fail_status is not None and script.fail_times > 0
            if failing:
                script.fail_times -= 1
        if failing:
            assert script.fail_status is not None
            message, error_type = _ERRORS[script.fail_status]
            self.send_json(script.fail_status, {"error": message, "error_type": error_type})
            return
        texts: list[str] = body["texts"]
        if not texts:
            self.send_json(400, {"error": "`texts` cannot be empty", "error_type": "Empty"})
            return
        if len(texts) > script.max_client_batch_size:
            message = f"batch size {len(texts)} > maximum allowed batch size {script.max_client_batch_size}"
            self.send_json(422, {"error": message, "error_type": "Validation"})
            return
        self._rerank(body, texts)

    def _rerank(self, body: dict[str, Any], texts: list[str]) -> None:
        fake, script = self.fake, self.fake.script
        with fake.lock:  # type: ignore[attr-defined]
            fake.in_flight += 1  # type: ignore[attr-defined]
            fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)  # type: ignore[attr-defined]
        try:
            if script.delay_s:
                threading.Event().wait(script.delay_s)
            ranks = []
            for index, text in enumerate(texts):
                logit = script.logit(body["query"], text)
                rank: dict[str, Any] = {"index": index}
                if body.get("return_text"):
                    rank["text"] = text
                rank["score"] = logit if body.get("raw_scores") else _sigmoid(logit)
                ranks.append(rank)
            # TEI sorts ascending, then reverses: best first.
            ranks.sort(key=lambda rank: rank["score"])
            ranks.reverse()
        finally:
            with fake.lock:  # type: ignore[attr-defined]
                fake.in_flight -= 1  # type: ignore[attr-defined]
        data = json.dumps(ranks, separators=(",", ":")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        for name in ("x-compute-time", "x-total-time", "x-inference-time"):
            self.send_header(name, str(int(script.delay_s * 1000)))
        self.send_header("x-queue-time", "0")
        self.send_header("x-tokenization-time", "0")
        self.send_header("x-compute-characters", str(sum(len(body["query"]) + len(t) for t in texts)))
        self.send_header("x-compute-type", "cpu")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
