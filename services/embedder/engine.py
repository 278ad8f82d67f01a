"""The embedding model, without gRPC."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from askmesh.runtime.errors import Unavailable
from services.embedder.config import EmbedderSettings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("askmesh.embedder")


@dataclass(frozen=True)
class EmbeddingBatch:
    vectors: np.ndarray  # shape (len(texts), dimension), float32, unit length
    model: str
    dimension: int
    queue_ms: float
    inference_ms: float


class EmbeddingEngine:
    def __init__(self, settings: EmbedderSettings) -> None:
        self.settings = settings
        self._model: SentenceTransformer | None = None
        # One model call at a time, off the event loop (torch uses every core for one batch).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-model")
        self._model_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def dimension(self) -> int:
        if self._model is None:
            raise Unavailable("embedder: model is still loading")
        dimension = self._model.get_embedding_dimension()
        assert dimension is not None
        return int(dimension)

    def _load(self) -> SentenceTransformer:
        # Never reach a model hub: the model is a local folder.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = self.settings.resolved_model_path()
        log.info("loading %s from %s", self.settings.model_name, path)
        model = SentenceTransformer(str(path), device=self.settings.device, local_files_only=True)
        model.encode(["warm-up"], normalize_embeddings=True)
        return model

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._model = None

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        assert self._model is not None
        vectors = self._model.encode(
            list(texts),
            batch_size=self.settings.encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        return np.asarray(vectors, dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> EmbeddingBatch:
        """Embeds already-validated texts (see servicer.validate_texts)."""
        if self._model is None:
            raise Unavailable("embedder: model is still loading")
        queued_at = time.perf_counter()
        async with self._model_lock:
            started_at = time.perf_counter()
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(self._executor, self._encode, texts)
            finished_at = time.perf_counter()
        return EmbeddingBatch(
            vectors=vectors,
            model=self.settings.model_name,
            dimension=int(vectors.shape[1]),
            queue_ms=(started_at - queued_at) * 1000,
            inference_ms=(finished_at - started_at) * 1000,
        )
