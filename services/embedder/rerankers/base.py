"""The interface every reranking backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from askmesh.v1 import common_pb2

WARM_UP_QUERY = "warm-up"
WARM_UP_TEXTS = ("warm-up",)


@dataclass(frozen=True)
class Scores:
    values: list[float]  # one per text, in the order the texts were given
    queue_ms: float  # waiting for the model (or for a request to the server) to start
    inference_ms: float  # the model's time, or the server's round trip


class RerankBackend(Protocol):
    name: str  # the model's (a TEI server's own id, once started)

    async def start(self) -> None:
        """Loads the model or reaches the server, then scores one pair: the replica says SERVING
        only after that. Raises when it cannot."""

    async def score(self, query: str, texts: Sequence[str]) -> Scores:
        """The relevance of each text to `query` (already validated). Raises AskmeshError."""
        ...

    def info(self) -> common_pb2.ModelInfo:
        """What GetModel reports (valid after start)."""
        ...

    async def close(self) -> None: ...
