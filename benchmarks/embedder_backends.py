"""The embedder's model alone on the chunks a corpus makes: backends, batch sizes, length sorting.

    .venv/bin/python -m benchmarks.embedder_backends [--limit 600] [--fresh-export]

The texts are the labelled man-page corpus (benchmarks/corpus) chunked as the ingestor chunks
it (services.ingestor.chunking, 600/150). Each backend is loaded exactly as the embedder loads
it (services.embedder.models.load_model: torch, ONNX fp32, ONNX int8) and timed through
`LoadedModel.encode`, the call each model batch of the embedder makes, in three ways:
- "unsorted N": the texts in corpus order, one encode call of N texts at a time, each one model
  batch padded to its longest text: what the embedder runs when one ingestion worker sends Embed
  calls of N chunks one after the other (nothing to merge);
- "sorted N": every text in one encode call, which sorts them by length before slicing them
  into model batches of N (`encode_batch_size`; sentence-transformers and the ONNX backend both
  sort): the model alone at its best, with little padding.
Also: each backend's cosine to torch on every chunk, and how long a first ONNX export (and the
int8 quantization) takes into an empty cache (--fresh-export). Prints a table and writes
benchmarks/results/<date>-embedder-backends.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from benchmarks.common import machine, markdown_table, rich_table, save

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHUNK_SIZE = 600
CHUNK_OVERLAP = 150


@dataclass(frozen=True)
class Backend:
    label: str
    backend: str
    quantize: bool


BACKENDS = (
    Backend("torch", "torch", False),
    Backend("ONNX fp32", "onnx", False),
    Backend("ONNX int8", "onnx", True),
)
# (way, size): "unsorted" = encode calls of `size` texts in corpus order, each one model batch;
# "sorted" = one encode call of every text, model batches of `size`.
WAYS: tuple[tuple[str, int], ...] = (
    ("unsorted", 16),
    ("unsorted", 64),
    ("unsorted", 128),
    ("sorted", 32),
    ("sorted", 64),
    ("sorted", 128),
    ("sorted", 256),
)


def corpus_chunks() -> list[str]:
    from benchmarks.corpus.manpages import build_corpus
    from services.ingestor.chunking import chunk_text

    return [text for document in build_corpus() for text in chunk_text(document.text, CHUNK_SIZE, CHUNK_OVERLAP) if text.strip()]


def load(backend: Backend, cache_dir: Path) -> object:
    from services.embedder.config import EmbedderSettings
    from services.embedder.models import load_model

    settings = EmbedderSettings(backend=backend.backend, onnx_quantize=backend.quantize, onnx_cache_dir=cache_dir)  # type: ignore[arg-type]
    return load_model(settings.resolved_model_path(), settings.model_name, backend.backend, settings)


def timed(model: object, texts: Sequence[str], way: str, size: int) -> tuple[float, np.ndarray]:
    """Seconds for every text, and the vectors in the texts' order."""
    from services.embedder.models import LoadedModel

    assert isinstance(model, LoadedModel)
    started = time.perf_counter()
    if way == "sorted":
        model.encode_batch_size = size
        vectors = model.encode(texts)
    else:
        # Each call is one model batch when encode_batch_size is at least its size.
        model.encode_batch_size = max(size, 256)
        vectors = np.concatenate([model.encode(texts[start : start + size]) for start in range(0, len(texts), size)])
    return time.perf_counter() - started, vectors


def padding_share(model: object, texts: Sequence[str], size: int, sort: bool) -> float:
    """Share of the model's token positions that are padding, with batches of `size`."""
    from services.embedder.models import LoadedModel

    assert isinstance(model, LoadedModel) and model.count_tokenizer is not None
    lengths = [len(model.count_tokenizer.encode(text).ids) for text in texts]
    if sort:
        lengths.sort(reverse=True)
    real = padded = 0
    for start in range(0, len(lengths), size):
        batch = lengths[start : start + size]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=0, help="only the first N chunks (0: all)")
    parser.add_argument("--stride", type=int, default=1, help="every Nth chunk only (keeps the corpus's mix of lengths)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the fastest counts")
    parser.add_argument("--cache-dir", type=Path, default=Path(".askmesh/models/onnx"), help="the ONNX export cache")
    parser.add_argument("--fresh-export", action="store_true", help="time a first export into an empty cache too")
    parser.add_argument("--ways", default=",".join(f"{way}:{size}" for way, size in WAYS),
                        help="which measurements, comma-separated way:size (unsorted or sorted)")
    parser.add_argument("--backends", default=",".join(b.label for b in BACKENDS),
                        help="which, comma-separated (torch's vectors are the cosine reference either way)")
    args = parser.parse_args()
    console = Console()

    texts = corpus_chunks()[:: args.stride]
    if args.limit:
        texts = texts[: args.limit]
    console.print(f"{len(texts)} chunks ({CHUNK_SIZE}/{CHUNK_OVERLAP}), {sum(map(len, texts)):,} characters")

    notes: list[str] = []
    if args.fresh_export:
        with tempfile.TemporaryDirectory() as empty:
            for backend in BACKENDS[1:]:
                started = time.perf_counter()
                load(backend, Path(empty))
                seconds = time.perf_counter() - started
                notes.append(f"- {backend.label}: first start into an empty cache (export{' + quantize' if backend.quantize else ''}, "
                             f"load, warm-up) {seconds:.1f} s")
                console.print(notes[-1])

    rows: list[list[str]] = []
    loads: list[float] = []  # 1-minute load averages after each measurement: above ~2, others shared the cores
    ways = [(way, int(size)) for way, size in (item.split(":") for item in args.ways.split(","))]
    chosen = [backend for backend in BACKENDS if backend.label in args.backends.split(",")]
    reference: np.ndarray | None = None
    if BACKENDS[0] not in chosen:
        _, reference = timed(load(BACKENDS[0], args.cache_dir), texts, "sorted", 32)
    for backend in chosen:
        started = time.perf_counter()
        model = load(backend, args.cache_dir)
        load_s = time.perf_counter() - started
        timed(model, texts[:64], "sorted", 32)  # warm-up at a real size
        results: dict[tuple[str, int], float] = {}
        vectors = np.empty(0)
        for way, size in ways:
            # The fastest of the repeats: on shared cores the slower runs measure the neighbours.
            seconds = float("inf")
            for _ in range(args.repeats):
                elapsed, vectors = timed(model, texts, way, size)
                seconds = min(seconds, elapsed)
            results[(way, size)] = len(texts) / seconds
            loads.append(os.getloadavg()[0])
            console.print(f"  {backend.label} {way} {size}: {results[(way, size)]:.1f} chunks/s (load average {loads[-1]:.1f})")
        if backend is BACKENDS[0]:
            reference = vectors
            cosine = "1 (reference)"
        else:
            assert reference is not None
            cosines = np.sum(vectors * reference, axis=1)
            cosine = f"min {cosines.min():.4f}, p1 {np.percentile(cosines, 1):.4f}, mean {cosines.mean():.4f}"
        rows.append([backend.label, f"{load_s:.1f} s", *(f"{results[w]:.1f}" for w in ways), cosine])
        if backend is chosen[0]:
            for size in (16, 32, 128):
                notes.append(f"- padding with model batches of {size}: {padding_share(model, texts, size, False):.0%} in corpus "
                             f"order, {padding_share(model, texts, size, True):.0%} sorted by length")
        del model

    columns = ["backend", "load", *(f"{way} {size}" for way, size in ways), "cosine to torch"]
    console.print(rich_table(f"Embedder model alone, chunks/s ({len(texts)} chunks of the man-page corpus, {CHUNK_SIZE}/{CHUNK_OVERLAP})", columns, rows))
    notes.append(f"- {args.repeats} runs of each measurement, the fastest kept; 1-minute load average after each: "
                 f"{min(loads):.1f}-{max(loads):.1f} (this benchmark alone keeps it near 2: above, other work shared the cores)")
    for note in notes:
        console.print(note)
    lines = [
        "# Embedder model alone: backends, batch sizes, length sorting",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python -m benchmarks.embedder_backends"
        f"{f' --stride {args.stride}' if args.stride > 1 else ''}{f' --limit {args.limit}' if args.limit else ''}"
        f"{f' --repeats {args.repeats}' if args.repeats != 2 else ''}{' --fresh-export' if args.fresh_export else ''}"
        f"{f' --backends {args.backends!r}' if len(chosen) < len(BACKENDS) else ''}"
        f"{f' --ways {args.ways}' if ways != list(WAYS) else ''}`.",
        "",
        f"{len(texts)} chunks of the man-page corpus ({CHUNK_SIZE}/{CHUNK_OVERLAP}, the ingestor's chunking), chunks/s through "
        "`LoadedModel.encode`. `unsorted N`: encode calls of N chunks in corpus order, each one model batch (one ingestion "
        "worker's Embed calls of N); `sorted N`: one call of every chunk, sorted by length, model batches of N.",
        "",
        *markdown_table(columns, rows),
        "",
        *notes,
        "",
    ]
    console.print(f"saved to {save('embedder-backends', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
