"""A local cross-encoder, through sentence-transformers' CrossEncoder, from a folder on disk.

Any sequence-classification model with one label that sentence-transformers loads as a
CrossEncoder works (ms-marco-MiniLM, bge-reranker, mxbai-rerank...). Nothing is downloaded: the
folder must hold the model and its tokenizer. Scores are CrossEncoder.predict's, i.e. the
sigmoid of the model's logit for one-label models, as TEI's /rerank gives without raw_scores.

One call's pairs run in forward passes of `reranker_batch_size` in a thread of its own (one
model call at a time, off the event loop, so health checks and embeddings keep answering).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from askmesh.runtime.errors import Unavailable
from askmesh.v1 import common_pb2
from services.embedder.config import EmbedderSettings
from services.embedder.models import never_reach_a_hub
from services.embedder.rerankers.base import WARM_UP_QUERY, WARM_UP_TEXTS, Scores

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

log = logging.getLogger("askmesh.embedder.reranker")


def load_cross_encoder(path: Path, device: str, max_length: int | None) -> CrossEncoder:
    """The model at `path`, checked to be a one-label cross-encoder. Blocking."""
    if not path.is_dir():
        raise FileNotFoundError(f"reranker_model_path: {path} is not a folder (a cross-encoder saved with save_pretrained)")
    never_reach_a_hub()
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(path), device=device, local_files_only=True, max_length=max_length)
    if model.num_labels != 1:
        raise ValueError(
            f"reranker_model_path: {path} is a classifier with {model.num_labels} labels; a reranker has one (its relevance score)"
        )
    return model


class CrossEncoderReranker:
    def __init__(self, settings: EmbedderSettings) -> None:
        assert settings.reranker_model_path is not None
        self.settings = settings
        self.path = settings.reranker_model_path
        self.name = settings.reranker_model_name or self.path.absolute().name
        self._model: CrossEncoder | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reranker-model")
        self._load_seconds = 0.0
        self._loaded_at = 0.0

    async def start(self) -> None:
        started = time.perf_counter()
        log.info("loading the reranker %s from %s", self.name, self.path)
        loop = asyncio.get_running_loop()
        max_length = self.settings.reranker_max_length or None
        model = await loop.run_in_executor(
            self._executor, load_cross_encoder, self.path, self.settings.device, max_length
        )
        self._model = model
        await self.score(WARM_UP_QUERY, WARM_UP_TEXTS)
        self._load_seconds = time.perf_counter() - started
        self._loaded_at = time.time()

    def _predict(self, pairs: list[tuple[str, str]]) -> tuple[float, float, list[float]]:
        """Runs in the model thread: (started, finished, scores)."""
        assert self._model is not None
        started = time.perf_counter()
        scores = self._model.predict(
            pairs,
            batch_size=self.settings.reranker_batch_size,
            # A tqdm bar per call costs CPU on every call when logging is at INFO.
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return started, time.perf_counter(), [float(score) for score in scores]

    async def score(self, query: str, texts: Sequence[str]) -> Scores:
        if self._model is None:
            raise Unavailable("embedder: the reranker is still loading")
        queued = time.perf_counter()
        pairs = [(query, text) for text in texts]
        started, finished, values = await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, pairs)
        return Scores(values=values, queue_ms=(started - queued) * 1000, inference_ms=(finished - started) * 1000)

    def info(self) -> common_pb2.ModelInfo:
        info = common_pb2.ModelInfo(
            name=self.name, path=str(self.path), backend="cross-encoder", load_seconds=self._load_seconds
        )
        info.loaded_at.FromNanoseconds(int(self._loaded_at * 1e9))
        return info

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._model = None
