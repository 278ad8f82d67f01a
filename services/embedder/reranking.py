"""The reranker, without gRPC: scores from the configured backend, best first, with a bound on
the calls a replica takes at once (one more is refused, so the caller can try another replica).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from askmesh.runtime.errors import ResourceExhausted, Unavailable
from askmesh.runtime.inflight import InFlight
from askmesh.v1 import common_pb2
from services.embedder.config import EmbedderSettings
from services.embedder.rerankers import create_reranker
from services.embedder.rerankers.base import RerankBackend

log = logging.getLogger("askmesh.embedder.reranker")


@dataclass(frozen=True)
class Ranking:
    ranks: list[tuple[int, float]]  # (index of the text, score), best first
    model: str
    queue_ms: float
    inference_ms: float


def best_first(scores: Sequence[float], top_n: int | None = None) -> list[tuple[int, float]]:
    """(index, score) by score, highest first; ties (and NaN, last) keep the texts' order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if not math.isnan(scores[i]) else math.inf)
    if top_n is not None:
        order = order[:top_n]
    return [(index, scores[index]) for index in order]


class RerankingEngine:
    def __init__(self, settings: EmbedderSettings, backend: RerankBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.ready = False
        self.calls = InFlight()  # running or waiting for the model

    @classmethod
    def configured(cls, settings: EmbedderSettings) -> RerankingEngine | None:
        """The engine for the configured reranker; None when the replica has none."""
        backend = create_reranker(settings)
        return None if backend is None else cls(settings, backend)

    async def start(self) -> None:
        await self.backend.start()
        self.ready = True
        info = self.backend.info()
        log.info("[STARTUP] reranker %s (%s) loaded and warmed in %.1f s", info.name, info.backend, info.load_seconds)

    async def close(self) -> None:
        self.ready = False
        await self.backend.close()

    def model_info(self) -> common_pb2.ModelInfo:
        return self.backend.info()

    async def rerank(self, query: str, texts: Sequence[str], top_n: int | None = None) -> Ranking:
        """The texts (already validated) best first, the best `top_n` of them when given."""
        if not self.ready:
            raise Unavailable("embedder: the reranker is still loading")
        if self.calls.count >= self.settings.reranker_max_calls:
            raise ResourceExhausted(
                f"embedder: the reranker is busy ({self.calls.count} calls running or waiting, "
                f"limit {self.settings.reranker_max_calls}); retry later"
            )
        with self.calls.track():
            scores = await self.backend.score(query, texts)
        return Ranking(
            ranks=best_first(scores.values, top_n),
            model=self.backend.name,
            queue_ms=scores.queue_ms,
            inference_ms=scores.inference_ms,
        )
