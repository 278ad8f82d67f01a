"""Retrieval quality and prompt size by chunking and context budget, on the labelled man-pages set.

    .venv/bin/python -m benchmarks.retrieval [--sizes 250,400,500,600,800] [--budgets 192,256,320,384]

What the defaults (chunk size, overlap, top_k, context budget) are chosen by. For each chunking,
the corpus (benchmarks/corpus: Linux man-pages from Debian's `manpages`, with ~120 questions,
each naming its document and a phrase that answers it) is chunked with the gateway's own
splitter and embedded with the embedder's model; each question is embedded and searched
exactly (cosine over every chunk: what Milvus's HNSW approximates). Reported per chunking:
- doc@3: the expected document among the top 3 chunks' documents;
- phrase@5: the expected phrase inside one of the top 5 chunks;
and per context budget (the generator's fitting, with the model's own tokenizer):
- in prompt: the expected phrase inside a passage that fits the prompt;
- prompt tokens: what the passages take, on average.
The Chatchat-style baseline's chunking (LangChain's splitter, 250/50) is measured beside it.
Prints a table and writes benchmarks/results/<date>-retrieval.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from askmesh.v1 import generator_pb2
from benchmarks.common import machine, save
from benchmarks.corpus.manpages import CorpusDocument, LabelledQuestion, build_corpus, load_questions, normalize
from services.ingestor.chunking import chunk_text
from services.generator.prompting import fit_passages

TOP_K = 5


@dataclass(frozen=True)
class Chunk:
    document: str
    title: str
    text: str


@dataclass
class Scores:
    label: str
    chunks: int
    doc_at_3: float
    phrase_at_5: float
    # budget -> (phrase in prompt, mean passage tokens, mean passages placed)
    by_budget: dict[int, tuple[float, float, float]]


def askmesh_chunks(corpus: Sequence[CorpusDocument], size: int, overlap: int) -> list[Chunk]:
    return [Chunk(d.id, d.title, text) for d in corpus for text in chunk_text(d.text, size, overlap) if text.strip()]


def baseline_chunks(corpus: Sequence[CorpusDocument]) -> list[Chunk]:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=250, chunk_overlap=50)
    return [Chunk(d.id, d.title, text) for d in corpus for text in splitter.split_text(d.text)]


# --backend: the embedder's backends by name; "default" is what EmbedderSettings() serves.
BACKENDS = {"torch": ("torch", False), "onnx-fp32": ("onnx", False), "onnx-int8": ("onnx", True)}


class Embedder:
    """The embedder's own model code (services.embedder.models), with a chosen backend."""

    def __init__(self, backend: str = "default") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from services.embedder.config import EmbedderSettings
        from services.embedder.models import load_model

        settings = EmbedderSettings()
        if backend != "default":
            settings.backend, settings.onnx_quantize = BACKENDS[backend]  # type: ignore[assignment]
        self.label = f"{settings.backend}{' int8' if settings.backend == 'onnx' and settings.onnx_quantize else ''}"
        self.model = load_model(settings.resolved_model_path(), settings.model_name, settings.backend, settings)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts)


def token_counter() -> Callable[[str], int]:
    """The generator's own count: the bundled GGUF's tokenizer (its vocabulary only)."""
    from llama_cpp import Llama

    from services.generator.config import bundled_model_path

    vocabulary = Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)
    return lambda text: len(vocabulary.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def score(
    label: str,
    chunks: list[Chunk],
    questions: Sequence[LabelledQuestion],
    question_vectors: np.ndarray,
    embed: Embedder,
    count_tokens: Callable[[str], int],
    budgets: Sequence[int],
    top_k: int,
) -> Scores:
    vectors = embed([c.text for c in chunks])
    similarities = question_vectors @ vectors.T
    doc_hits = phrase_hits = 0
    in_prompt = {budget: [0, [], []] for budget in budgets}
    for question, row in zip(questions, similarities):
        best = [chunks[i] for i in np.argsort(-row)[:TOP_K]]
        phrase = normalize(question.phrase)
        doc_hits += question.document in {c.document for c in best[:3]}
        phrase_hits += any(phrase in normalize(c.text) for c in best)
        passages = [
            generator_pb2.ContextPassage(number=n, title=c.title, text=c.text) for n, c in enumerate(best[:top_k], start=1)
        ]
        for budget in budgets:
            placed = fit_passages(passages, budget, count_tokens)
            hit = any(phrase in normalize(p.text) for p in placed)
            tally = in_prompt[budget]
            tally[0] += hit
            tally[1].append(sum(count_tokens(p.text + "\n\n") for p in placed))
            tally[2].append(len(placed))
    count = len(questions)
    return Scores(
        label,
        len(chunks),
        doc_hits / count,
        phrase_hits / count,
        {
            budget: (hits / count, statistics.mean(tokens), statistics.mean(placed))
            for budget, (hits, tokens, placed) in in_prompt.items()
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,400,500,600,800", help="chunk sizes in characters")
    parser.add_argument("--overlap-share", type=float, default=0.125, help="overlap as a share of the size")
    parser.add_argument("--budgets", default="192,256,320,384,512", help="context budgets in prompt tokens")
    parser.add_argument("--top-k", type=int, default=5, help="passages offered to the prompt (retrieved)")
    parser.add_argument("--backend", choices=["default", *BACKENDS], default="default",
                        help="the embedder backend (default: what the embedder's settings serve)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline's chunking")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    console = Console()

    corpus, questions = build_corpus(), load_questions()
    console.print(f"{len(corpus)} documents, {sum(len(d.text) for d in corpus):,} characters, {len(questions)} questions")
    embed, count_tokens = Embedder(args.backend), token_counter()
    console.print(f"embedder backend: {embed.label}")
    question_vectors = embed([q.question for q in questions])
    results = []
    for size in sizes:
        overlap = int(size * args.overlap_share)
        label = f"askmesh {size}/{overlap}"
        results.append(score(label, askmesh_chunks(corpus, size, overlap), questions, question_vectors, embed, count_tokens, budgets, args.top_k))
        console.print(f"  {label}: done")
    if args.no_baseline:
        console.print("  the baseline's chunking: skipped (--no-baseline)")
    else:
        try:
            results.append(score("baseline 250/50 (LangChain)", baseline_chunks(corpus), questions, question_vectors, embed, count_tokens, budgets, 3))
        except ImportError:
            console.print("  the baseline's splitter is not installed (pip install -e '.[bench]'): skipped")

    table = Table(title=f"Retrieval on {len(questions)} labelled questions (top_k {args.top_k} offered to the prompt)")
    columns = ["chunking", "chunks", "doc@3", "phrase@5"] + [f"in prompt / tokens @ {b}" for b in budgets]
    for column in columns:
        table.add_column(column)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        cells = [result.label, str(result.chunks), f"{result.doc_at_3:.0%}", f"{result.phrase_at_5:.0%}"]
        cells += [
            f"{hit:.0%} / {tokens:.0f} ({placed:.1f} passages)" for hit, tokens, placed in (result.by_budget[b] for b in budgets)
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    path = save(
        "retrieval" if args.backend == "default" else f"retrieval-{args.backend}",
        "# Retrieval by chunking and context budget\n\n"
        f"Machine: {machine()}\n\n"
        f"Corpus: {len(corpus)} Linux man-pages (Debian `manpages`), {sum(len(d.text) for d in corpus):,} characters; "
        f"{len(questions)} labelled questions (benchmarks/corpus/manpages_questions.jsonl). Exact cosine search over "
        f"all-MiniLM-L6-v2 embeddings ({embed.label} backend); prompt tokens counted with SmolLM2's tokenizer; the baseline row offers its "
        "top 3 (its top_k).\n\n" + "\n".join(lines) + "\n",
    )
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
