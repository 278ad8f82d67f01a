"""The ONNX Runtime backend: the sentence-transformers model's transformer exported to ONNX.

Why not sentence-transformers' own `backend="onnx"`: it exports and loads through Optimum
(`optimum-onnx`), whose releases pin transformers < 4.58 and whose export patches do not fit the
transformers 5 masking functions installed here. So the export is done here with `torch.onnx`
(the dynamo exporter, which traces transformers 5 models correctly), from the local model folder
(nothing is downloaded), and only the transformer runs in ONNX Runtime: tokenization and the
modules after it (pooling, normalization, dense layers) are the sentence-transformers model's own,
so the two backends share everything but the transformer's arithmetic.

The export is cached under `onnx_cache_dir/<model folder>-<fingerprint>/` and reused; it is written
to a temporary folder and renamed into place, so replicas starting together never read half a file.
`onnx_quantize` adds dynamic int8 quantization with the settings of Optimum's
`AutoQuantizationConfig.avx2(is_static=False)` (what sentence-transformers'
`export_dynamic_quantized_onnx_model(..., "avx2", ...)` uses): uint8 weights, symmetric, per channel,
full range, uint8 asymmetric activations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("askmesh.embedder")

# Bump when the export itself changes, so old caches are not reused.
EXPORT_FORMAT = "askmesh-onnx-1"
MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model_qint8_avx2.onnx"
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _missing_packages_error(error: ImportError) -> RuntimeError:
    return RuntimeError(
        "embedder: backend=onnx needs the packages onnxruntime, onnx and onnxscript "
        f"(pip install onnxruntime onnx onnxscript): {error}"
    )


def model_fingerprint(model_path: Path) -> str:
    """Changes when the model folder's files change (name, size, modification time)."""
    digest = hashlib.sha256(EXPORT_FORMAT.encode())
    digest.update(str(model_path.resolve()).encode())
    for path in sorted(p for p in model_path.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def export_folder(cache_dir: Path, model_path: Path) -> Path:
    return cache_dir / f"{model_path.resolve().name}-{model_fingerprint(model_path)}"


def _last_hidden_state(auto_model: Any) -> Any:
    """The module torch.onnx exports: the transformer's token embeddings."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = auto_model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    return LastHiddenState().eval()


def _export(model: SentenceTransformer, target: Path) -> None:
    """Exports the transformer of `model` to `target/model.onnx` (+ external weights)."""
    import torch

    transformer = model[0]
    auto_model = getattr(transformer, "auto_model", None)
    if auto_model is None:
        raise RuntimeError(f"embedder: backend=onnx cannot export a {type(transformer).__name__} first module")
    features = model.preprocess(["an example text to trace", "another one"])
    input_names = [name for name in _INPUT_NAMES if isinstance(features.get(name), torch.Tensor)]
    if input_names[:2] != ["input_ids", "attention_mask"]:
        raise RuntimeError(f"embedder: backend=onnx cannot export a model whose inputs are {sorted(features)}")
    inputs = tuple(features[name].to("cpu") for name in input_names)
    batch, sequence = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    dynamic_shapes = {name: {0: batch, 1: sequence} for name in input_names}
    wrapped = _last_hidden_state(auto_model.to("cpu"))
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            inputs,
            str(target / MODEL_FILE),
            input_names=input_names,
            output_names=["last_hidden_state"],
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=True,
            verbose=False,
        )


def _quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QUInt8,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def ensure_exported(model: SentenceTransformer, model_path: Path, cache_dir: Path, quantize: bool) -> Path:
    """The .onnx file to run, exporting (and quantizing) into the cache when not there yet."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise _missing_packages_error(error) from error
    folder = export_folder(cache_dir, model_path)
    if not (folder / MODEL_FILE).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_dir))
        try:
            log.info("exporting %s to ONNX in %s", model_path, folder)
            _export(model, staging)
            try:
                os.rename(staging, folder)
            except OSError:
                if not (folder / MODEL_FILE).is_file():  # not a replica that got there first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not quantize:
        return folder / MODEL_FILE
    quantized = folder / QUANTIZED_FILE
    if not quantized.is_file():
        log.info("quantizing %s to int8 (avx2)", folder / MODEL_FILE)
        handle, staging_name = tempfile.mkstemp(prefix=f".{QUANTIZED_FILE}-", suffix=".onnx", dir=folder)
        os.close(handle)
        try:
            _quantize(folder / MODEL_FILE, Path(staging_name))
            os.replace(staging_name, quantized)
        finally:
            Path(staging_name).unlink(missing_ok=True)
    return quantized


class OnnxEncoder:
    """Encodes texts like `SentenceTransformer.encode`, with the transformer in ONNX Runtime."""

    def __init__(self, model: SentenceTransformer, onnx_file: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise _missing_packages_error(error) from error
        self._model = model
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self._input_names = [node.name for node in self._session.get_inputs()]
        self.onnx_file = onnx_file

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Unit vectors, float32, in the order of `texts`."""
        import torch

        # Like sentence-transformers: slices of similar lengths, so little padding.
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        tail = list(self._model)[1:]
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            features = self._model.preprocess([texts[index] for index in indices])
            feeds = {name: features[name].numpy().astype(np.int64, copy=False) for name in self._input_names}
            (hidden,) = self._session.run(["last_hidden_state"], feeds)
            features["token_embeddings"] = torch.from_numpy(hidden)
            with torch.no_grad():
                for module in tail:
                    features = module(features)
            embeddings = features["sentence_embedding"].float().numpy()
            for index, vector in zip(indices, embeddings, strict=True):
                vectors[index] = vector
        stacked = np.stack(vectors).astype(np.float32, copy=False)
        norms = np.linalg.norm(stacked, axis=1, keepdims=True)
        return stacked / np.maximum(norms, 1e-12)
