"""A HuggingFace text-embeddings-inference (TEI) server's `POST /rerank`.

TEI's wire format, from its router (text-embeddings-inference 1.9.3, commit 0d124dc:
router/src/http/types.rs `RerankRequest` / `Rank`, router/src/http/server.rs `async fn rerank`
and `impl From<&ErrorType> for StatusCode`, router/src/lib.rs `ErrorType` / `ErrorResponse`):

- request: `{"query": str, "texts": [str], "truncate": bool?, "truncation_direction": "right"?,
  "raw_scores": bool (default false: the sigmoid of one-label models), "return_text": bool}`;
- response 200: a JSON list of `{"index", "score"}` (and "text" with return_text), sorted by
  score, best first;
- errors: `{"error": str, "error_type": "Overloaded" | "Validation" | "Tokenizer" | "Empty" |
  "Backend" | "Unhealthy"}` (serde writes the variant names as they are; TEI's OpenAPI examples
  show them in lower case, so both are read): 429 overloaded (no free permit), 422 validation
  or tokenizer (a batch above --max-client-batch-size, an input too long without truncation),
  413 a body above --payload-limit (axum's own plain-text answer), 424 the model failed, 400 no
  texts, 503 unhealthy; 401 without the --api-key bearer token;
- `GET /info` names the model (`model_id`) and its type (`model_type: {"reranker": {...}}`).

A call with more texts than `reranker_batch_size` (TEI's --max-client-batch-size, 32 by default)
goes as several requests at once. The server's address stays in the log: a caller learns what
failed (overloaded, refused, unreachable), never where the server lives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx2  # huggingface_hub's HTTP client, already a dependency

from askmesh.runtime.errors import AskmeshError, InvalidArgument, ResourceExhausted, Unavailable
from askmesh.v1 import common_pb2
from services.embedder.config import EmbedderSettings
from services.embedder.rerankers.base import WARM_UP_QUERY, WARM_UP_TEXTS, Scores

log = logging.getLogger("askmesh.embedder.reranker")

# How often the wait for a TEI server that does not answer yet is logged at start.
_START_LOG_INTERVAL_S = 10.0
_START_RETRY_INTERVAL_S = 1.0
# The longest part of TEI's error message passed on.
_DETAIL_CHARS = 200


class TeiReranker:
    def __init__(self, settings: EmbedderSettings) -> None:
        self.settings = settings
        self.url = settings.reranker_url.rstrip("/")
        headers = {"Authorization": f"Bearer {settings.reranker_api_key}"} if settings.reranker_api_key else {}
        self._http = httpx2.AsyncClient(base_url=self.url, headers=headers, timeout=settings.reranker_timeout_s)
        self.name = settings.reranker_model_name or "tei"
        self._load_seconds = 0.0
        self._loaded_at = 0.0

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Reads the server's model, then scores one pair; waits (NOT_SERVING) while the server
        does not answer or is still loading, up to reranker_start_timeout_s."""
        started = time.monotonic()
        give_up_at = started + self.settings.reranker_start_timeout_s
        next_log = started
        while True:
            try:
                await self._read_info()
                await self.score(WARM_UP_QUERY, WARM_UP_TEXTS)
                break
            except (Unavailable, ResourceExhausted) as error:
                if time.monotonic() >= give_up_at:
                    raise
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + _START_LOG_INTERVAL_S
                    log.info("[STARTUP] waiting for the TEI reranker at %s: %s", self.url, error.message)
                await asyncio.sleep(_START_RETRY_INTERVAL_S)
        self._load_seconds = time.monotonic() - started
        self._loaded_at = time.time()
        log.info("the TEI reranker at %s serves %s", self.url, self.name)

    async def _read_info(self) -> None:
        """The model's name from /info, and a check that it is a reranker. A server without
        /info (a proxy that passes /rerank only) is taken at its word."""
        try:
            response = await self._http.get("/info")
        except httpx2.HTTPError as error:
            raise self._transport_error(error) from error
        if response.status_code != 200:
            if response.status_code == 503:
                raise self._status_error(response)
            return
        try:
            info = response.json()
        except ValueError:
            return
        if not isinstance(info, dict):
            return
        model_type = info.get("model_type")
        if isinstance(model_type, dict) and model_type and "reranker" not in model_type:
            kind = next(iter(model_type))
            raise RuntimeError(
                f"the TEI server at {self.url} serves {info.get('model_id', 'a model')} as a {kind} model, not a reranker"
            )
        if not self.settings.reranker_model_name and isinstance(info.get("model_id"), str):
            self.name = info["model_id"]

    # -- scoring -----------------------------------------------------------------------------

    async def score(self, query: str, texts: Sequence[str]) -> Scores:
        size = self.settings.reranker_batch_size
        parts = [list(texts[offset : offset + size]) for offset in range(0, len(texts), size)]
        started = time.perf_counter()
        # gather passes the first failure on; the requests still running are then not needed.
        requests = [asyncio.ensure_future(self._rerank(query, part)) for part in parts]
        try:
            answers = await asyncio.gather(*requests)
        finally:
            for request in requests:
                request.cancel()
        values = [score for part_scores, _ in answers for score in part_scores]
        queue_ms = max(queue for _, queue in answers)
        return Scores(values=values, queue_ms=queue_ms, inference_ms=(time.perf_counter() - started) * 1000)

    async def _rerank(self, query: str, texts: list[str]) -> tuple[list[float], float]:
        """Scores of `texts` in their order, and the time TEI says they queued (ms)."""
        body = {"query": query, "texts": texts, "truncate": True, "raw_scores": False, "return_text": False}
        try:
            response = await self._http.post("/rerank", json=body)
        except httpx2.HTTPError as error:
            raise self._transport_error(error) from error
        if response.status_code != 200:
            raise self._status_error(response)
        try:
            scores = _scores_in_order(response.json(), len(texts))
        except (ValueError, TypeError, KeyError) as error:
            log.warning("[RERANKER] TEI at %s sent an unreadable ranking: %s", self.url, error)
            raise Unavailable("embedder: the reranker (TEI) sent an answer that is not a ranking") from error
        return scores, _header_ms(response, "x-queue-time")

    # -- errors ------------------------------------------------------------------------------

    def _transport_error(self, error: httpx2.HTTPError) -> AskmeshError:
        log.warning("[RERANKER] TEI at %s: %s: %s", self.url, type(error).__name__, error)
        if isinstance(error, httpx2.TimeoutException):
            return Unavailable(f"embedder: the reranker (TEI) did not answer within {self.settings.reranker_timeout_s:g} s")
        return Unavailable("embedder: the reranker (TEI) is unreachable")

    def _status_error(self, response: httpx2.Response) -> AskmeshError:
        status, detail = response.status_code, _error_detail(response)
        log.warning("[RERANKER] TEI at %s answered HTTP %d: %s", self.url, status, detail)
        if status == 429:
            retry_after = _retry_after_s(response)
            return ResourceExhausted(f"embedder: the reranker (TEI) is overloaded ({detail}); retry later", retry_after_s=retry_after)
        if status == 413:
            return InvalidArgument("texts", f"the reranker (TEI) refused the request as too large ({detail}); send fewer or shorter texts")
        if status in (400, 422):
            return InvalidArgument("texts", f"the reranker (TEI) refused them: {detail}")
        if status == 424:
            return Unavailable(f"embedder: the reranker (TEI) failed: {detail}")
        if status in (401, 403):
            return Unavailable(f"embedder: the reranker (TEI) refused this replica's credentials (HTTP {status}); check reranker_api_key")
        if status == 503:
            return Unavailable(f"embedder: the reranker (TEI) is not ready ({detail})")
        return Unavailable(f"embedder: the reranker (TEI) answered HTTP {status} ({detail})")

    def info(self) -> common_pb2.ModelInfo:
        # An admin RPC, internal to the mesh: the generator's remote backends report their URL too.
        info = common_pb2.ModelInfo(name=self.name, path=self.url, backend="tei", load_seconds=self._load_seconds)
        info.loaded_at.FromNanoseconds(int(self._loaded_at * 1e9))
        return info

    async def close(self) -> None:
        await self._http.aclose()


def _scores_in_order(ranks: Any, count: int) -> list[float]:
    """TEI's ranking (best first) as one score per text, in the texts' order; raises ValueError
    unless every text has exactly one finite score."""
    if not isinstance(ranks, list) or len(ranks) != count:
        raise ValueError(f"expected a list of {count} ranks, got {type(ranks).__name__} of {len(ranks) if isinstance(ranks, list) else 0}")
    scores: list[float | None] = [None] * count
    for rank in ranks:
        index, score = rank["index"], rank["score"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count or scores[index] is not None:
            raise ValueError(f"index {index!r} is out of range or repeated")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or score != score:
            raise ValueError(f"score {score!r} is not a number")
        scores[index] = float(score)
    return [score for score in scores if score is not None]


def _error_detail(response: httpx2.Response) -> str:
    """TEI's `error` message, or what the body says when it is not TEI's JSON (a proxy's page,
    axum's 413 text), cut short."""
    try:
        body = response.json()
        detail = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), str) else ""
    except (ValueError, json.JSONDecodeError):
        detail = response.text.strip()
    detail = " ".join((detail or response.reason_phrase or f"HTTP {response.status_code}").split())
    return detail if len(detail) <= _DETAIL_CHARS else detail[:_DETAIL_CHARS] + "…"


def _retry_after_s(response: httpx2.Response) -> float | None:
    try:
        return max(float(response.headers.get("retry-after", "")), 0.0)
    except ValueError:
        return None


def _header_ms(response: httpx2.Response, name: str) -> float:
    try:
        return max(float(response.headers.get(name, "0")), 0.0)
    except ValueError:
        return 0.0
