"""One loaded embedding model with everything the batcher needs of it, loaded and swapped as a whole.

A model swap loads the new model into a `LoadedModel` beside the serving one (in a worker thread,
so the serving one keeps answering) and warms it up; askmesh.runtime.models' registry then
switches one reference. Each batch takes the model it runs on once, at its start, so a batch
started on the old model finishes on it and its calls report the old model's name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from askmesh.v1 import common_pb2

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from services.embedder.config import EmbedderSettings
    from services.embedder.onnx_backend import OnnxEncoder

log = logging.getLogger("askmesh.embedder")

WARM_UP_TEXT = "warm-up"


@dataclass(eq=False)
class LoadedModel:
    name: str  # what responses report
    path: Path
    backend: str  # torch | onnx
    model: SentenceTransformer
    onnx: OnnxEncoder | None
    count_tokenizer: Any  # a tokenizers.Tokenizer of our own, for counting only (None: estimate)
    max_seq_length: int
    encode_batch_size: int
    dimension: int = 0
    load_seconds: float = 0.0
    loaded_at: float = 0.0  # wall clock (time.time())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors; runs in the caller's thread (the engine's model thread)."""
        if self.onnx is not None:
            return self.onnx.encode(list(texts), self.encode_batch_size)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            # sentence-transformers draws a tqdm bar per call when logging is at INFO: seen in
            # profiles of the service as CPU and GIL time taken from every batch.
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model will see for `texts` (special tokens included, truncated)."""
        if self.count_tokenizer is None:
            return sum(min(self.max_seq_length, len(text) // 4 + 2) for text in texts)
        # encode, not encode_batch: the batch form fans out to a thread pool on every call, and
        # those threads compete with the model's for the same cores.
        return sum(len(self.count_tokenizer.encode(text).ids) for text in texts)

    def info(self) -> common_pb2.ModelInfo:
        info = common_pb2.ModelInfo(
            name=self.name,
            path=str(self.path),
            backend=self.backend,
            dimension=self.dimension,
            load_seconds=self.load_seconds,
        )
        info.loaded_at.FromNanoseconds(int(self.loaded_at * 1e9))
        return info


def never_reach_a_hub() -> None:
    """Before sentence-transformers is imported: every model is a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model(path: Path, name: str, backend: str, settings: EmbedderSettings) -> LoadedModel:
    """Loads a sentence-transformers folder and encodes one text with it. Blocking: run it in a
    worker thread. Raises whatever the loader raises."""
    never_reach_a_hub()
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    log.info("loading %s from %s (backend %s)", name, path, backend)
    model = SentenceTransformer(str(path), device=settings.device, local_files_only=True)
    onnx: OnnxEncoder | None = None
    if backend == "onnx":
        from services.embedder.onnx_backend import OnnxEncoder, ensure_exported

        onnx_file = ensure_exported(model, path, settings.onnx_cache_dir, settings.onnx_quantize)
        onnx = OnnxEncoder(model, onnx_file)
    max_seq_length = int(model.max_seq_length or 512)
    loaded = LoadedModel(
        name=name,
        path=path,
        backend=backend,
        model=model,
        onnx=onnx,
        count_tokenizer=_counting_tokenizer(model, max_seq_length),
        max_seq_length=max_seq_length,
        encode_batch_size=settings.encode_batch_size,
    )
    # The warm-up call also gives the dimension as the model really makes it (some models do
    # not declare one, and a Dense module after pooling changes it).
    loaded.dimension = int(loaded.encode([WARM_UP_TEXT]).shape[1])
    loaded.load_seconds = time.perf_counter() - started
    loaded.loaded_at = time.time()
    return loaded


def _counting_tokenizer(model: SentenceTransformer, max_seq_length: int) -> Any:
    """An independent copy of the fast tokenizer (the model thread's one mutates its own
    truncation settings while encoding, so sharing it across threads is unsafe)."""
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        log.warning("no fast tokenizer: batch token budgets use an estimate from characters")
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    return tokenizer
