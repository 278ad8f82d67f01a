"""Dense, keyword and hybrid search: quality on the labelled man-pages set, and speed at 10k chunks.

    .venv/bin/python -m benchmarks.hybrid [--chunks 10000] [--searches 200] [--skip-quality]

What the default search mode and fusion are chosen by. The corpus (benchmarks/corpus: 80 Linux
man pages from Debian's `manpages`, 123 questions each naming its page and a phrase that
answers it) is cut as the ingestor cuts a text document with the default chunking (600/150),
embedded with the embedder's own model code, and stored by the retriever's own engine in Milvus
Lite (a collection with the BM25 field, as every new knowledge base gets). Then:

- quality: every question searched in each configuration (dense; keyword; hybrid by RRF with
  a few k and candidate counts; hybrid weighted with a few dense weights), scored by
  askmesh.evaluation as `askmesh eval` scores (hit@1/3/5 = doc@k, MRR, phrase-hit@5), top_k 5;
- speed: the same chunks repeated (each copy its own documents and ids, real text and real
  vectors) to `--chunks` in one collection, then dense, keyword and hybrid searches of the
  questions (their real vectors and text), the modes interleaved so that load on the machine
  falls on all alike: p50 and p99 of each, and hybrid's p50 over dense's.

Prints the tables and writes benchmarks/results/<date>-hybrid.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from askmesh import evaluation
from askmesh.v1 import common_pb2, retriever_pb2
from benchmarks.common import machine, markdown_table, median, percentile, rich_table, save
from benchmarks.corpus.manpages import build_corpus, load_questions
from services.ingestor.chunking import chunk_sections
from services.ingestor.parsing import Section
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine

CHUNK_SIZE, CHUNK_OVERLAP = 600, 150  # the ingestor's defaults
TOP_K = 5
DENSE, KEYWORD, HYBRID = common_pb2.SEARCH_MODE_DENSE, common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID
UPSERT_BATCH = 1024


@dataclass(frozen=True)
class Config:
    label: str
    mode: int
    settings: dict[str, Any]


CONFIGS = [
    Config("dense", DENSE, {}),
    Config("keyword (BM25)", KEYWORD, {}),
    Config("hybrid RRF k=60, 20 candidates", HYBRID, {"hybrid_fusion": "rrf", "rrf_k": 60, "hybrid_candidates": 20}),
    Config("hybrid RRF k=60, 50 candidates", HYBRID, {"hybrid_fusion": "rrf", "rrf_k": 60, "hybrid_candidates": 50}),
    Config("hybrid RRF k=20, 20 candidates", HYBRID, {"hybrid_fusion": "rrf", "rrf_k": 20, "hybrid_candidates": 20}),
    Config("hybrid RRF k=60, 10 candidates", HYBRID, {"hybrid_fusion": "rrf", "rrf_k": 60, "hybrid_candidates": 10}),
    Config("hybrid weighted 0.8 dense / 0.2 keyword", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.8, "hybrid_candidates": 20}),
    Config("hybrid weighted 0.7 dense / 0.3 keyword", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.7, "hybrid_candidates": 20}),
    Config("hybrid weighted 0.7 / 0.3, 10 candidates", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.7, "hybrid_candidates": 10}),
    Config("hybrid weighted 0.7 / 0.3, 50 candidates", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.7, "hybrid_candidates": 50}),
    Config("hybrid weighted 0.6 dense / 0.4 keyword", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.6, "hybrid_candidates": 20}),
    Config("hybrid weighted 0.5 / 0.5", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.5, "hybrid_candidates": 20}),
    Config("hybrid weighted 0.3 dense / 0.7 keyword", HYBRID, {"hybrid_fusion": "weighted", "hybrid_dense_weight": 0.3, "hybrid_candidates": 20}),
]


@dataclass(frozen=True)
class Chunk:
    document: str
    title: str
    text: str


def corpus_chunks() -> list[Chunk]:
    """Each page cut as the ingestor cuts a text document (AddDocuments) with the defaults."""
    return [
        Chunk(document.id, document.title, piece.text)
        for document in build_corpus()
        for piece in chunk_sections([Section(text=document.text)], CHUNK_SIZE, CHUNK_OVERLAP, None)
    ]


def vector_chunks(chunks: Sequence[Chunk], vectors: np.ndarray, copy: int) -> list[retriever_pb2.VectorChunk]:
    """The chunks as the retriever stores them; copy n > 0 is the same text as other documents."""
    suffix = f"#{copy}" if copy else ""
    return [
        retriever_pb2.VectorChunk(
            chunk=common_pb2.Chunk(
                id=f"{copy}-{index}", document_id=chunk.document + suffix, chunk_index=index, title=chunk.title,
                text=chunk.text, document_version=1,
            ),
            vector=vector.tolist(),
        )
        for index, (chunk, vector) in enumerate(zip(chunks, vectors))
    ]


async def load(engine: RetrievalEngine, knowledge_base: str, rows: list[retriever_pb2.VectorChunk]) -> float:
    started = time.perf_counter()
    await engine.create_collection(retriever_pb2.CreateCollectionRequest(
        knowledge_base=knowledge_base, generation=1, dimension=len(rows[0].vector), embedding_model="all-MiniLM-L6-v2",
    ))
    for start in range(0, len(rows), UPSERT_BATCH):
        await engine.upsert(retriever_pb2.UpsertRequest(knowledge_base=knowledge_base, chunks=rows[start : start + UPSERT_BATCH]))
    return time.perf_counter() - started


def search_request(knowledge_base: str, question: str, vector: np.ndarray, mode: int, top_k: int) -> retriever_pb2.SearchRequest:
    return retriever_pb2.SearchRequest(
        knowledge_base=knowledge_base, vector=vector.tolist(), query_text=question, search_mode=mode, top_k=top_k  # type: ignore[arg-type]
    )


def quality(
    loop: asyncio.AbstractEventLoop, engine: RetrievalEngine, questions: list[evaluation.LabelledQuestion],
    vectors: dict[str, np.ndarray], say: Any,
) -> list[tuple[Config, evaluation.ModeScores]]:
    base = engine.settings
    results = []
    for config in CONFIGS:
        engine.settings = base.model_copy(update=config.settings)

        def search(question: str, mode: int, top_k: int, config: Config = config) -> evaluation.Found:
            found = loop.run_until_complete(engine.search(search_request("quality", question, vectors[question], config.mode, top_k)))
            return evaluation.Found([(r.chunk.document_id, r.chunk.text) for r in found.results], mode)

        (scores,) = evaluation.evaluate(questions, search, modes=[evaluation_mode(config.mode)], top_k=TOP_K)
        results.append((config, scores))
        say(f"  {config.label}: doc@3 {scores.hit_at[3]:.1%}, phrase@5 {scores.phrase_hit_at[5]:.1%}")
    engine.settings = base
    return results


def evaluation_mode(mode: int) -> str:
    return common_pb2.SearchMode.Name(mode).removeprefix("SEARCH_MODE_").lower()


def speed(
    loop: asyncio.AbstractEventLoop, engine: RetrievalEngine, questions: list[str], vectors: dict[str, np.ndarray], searches: int
) -> dict[int, list[float]]:
    """Milliseconds per search by mode, the modes taking turns; a few warm-up rounds first."""
    times: dict[int, list[float]] = {DENSE: [], KEYWORD: [], HYBRID: []}
    for round_number in range(searches + 5):
        question = questions[round_number % len(questions)]
        for mode in times:
            started = time.perf_counter()
            loop.run_until_complete(engine.search(search_request("speed", question, vectors[question], mode, 4)))
            if round_number >= 5:
                times[mode].append((time.perf_counter() - started) * 1000)
    return times


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks in the collection the speed is measured on")
    parser.add_argument("--searches", type=int, default=200, help="searches per mode for the speed")
    parser.add_argument("--skip-quality", action="store_true", help="measure the speed only")
    args = parser.parse_args(argv)
    console = Console()
    say = console.print

    from benchmarks.retrieval import Embedder  # the embedder's own model code

    chunks = corpus_chunks()
    labelled = load_questions()
    questions = [evaluation.LabelledQuestion(q.question, q.document, q.phrase) for q in labelled]
    say(f"{len({c.document for c in chunks})} documents, {len(chunks)} chunks ({CHUNK_SIZE}/{CHUNK_OVERLAP}), {len(questions)} questions")
    embed = Embedder()
    started = time.perf_counter()
    chunk_vectors = embed([c.text for c in chunks])
    question_vectors = dict(zip((q.question for q in questions), embed([q.question for q in questions])))
    say(f"embedded in {time.perf_counter() - started:.0f} s ({embed.label})")

    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="askmesh-hybrid-") as folder:
        engine = RetrievalEngine(RetrieverSettings(milvus_uri=str(Path(folder) / "milvus.db")))
        loop.run_until_complete(engine.start())
        try:
            sections = [f"# Dense, keyword and hybrid search\n\nMachine: {machine()}\n"]
            if not args.skip_quality:
                loop.run_until_complete(load(engine, "quality", vector_chunks(chunks, chunk_vectors, 0)))
                say("quality (top 5):")
                scored = quality(loop, engine, questions, question_vectors, say)
                sections.append(quality_section(scored, len(chunks), len(questions), console))
            copies = -(-args.chunks // len(chunks))
            rows = [row for copy in range(copies) for row in vector_chunks(chunks, chunk_vectors, copy)][: args.chunks]
            load_s = loop.run_until_complete(load(engine, "speed", rows))
            say(f"speed: {len(rows)} chunks loaded in {load_s:.0f} s; {args.searches} searches per mode ...")
            times = speed(loop, engine, [q.question for q in questions], question_vectors, args.searches)
            sections.append(speed_section(times, len(rows), console))
        finally:
            loop.run_until_complete(engine.close())
            loop.close()
    path = save("hybrid", "\n".join(sections))
    say(f"written to {path}")


def quality_section(scored: list[tuple[Config, evaluation.ModeScores]], chunk_count: int, question_count: int, console: Console) -> str:
    columns = ["configuration", "doc@1", "doc@3", "doc@5", "MRR", "phrase@1", "phrase@3", "phrase@5"]
    default = RetrieverSettings()
    rows = [
        [
            config.label + (" (default)" if config.mode == HYBRID and all(getattr(default, k) == v for k, v in config.settings.items()) else ""),
            *(f"{s.hit_at[k]:.1%}" for k in (1, 3, 5)), f"{s.mrr:.3f}", *(f"{s.phrase_hit_at[k]:.1%}" for k in (1, 3, 5)),
        ]
        for config, s in scored
    ]
    console.print(rich_table(f"Quality on {question_count} labelled questions, top {TOP_K}", columns, rows, figures_right=True))
    return (
        f"\n## Quality\n\n{question_count} labelled questions (benchmarks/corpus/manpages_questions.jsonl) over "
        f"{chunk_count} chunks of the 80 man pages ({CHUNK_SIZE}/{CHUNK_OVERLAP}, cut as the ingestor cuts a text "
        "document), all-MiniLM-L6-v2 embeddings, the retriever's engine on Milvus Lite; top 5 citations, scored by "
        "askmesh.evaluation (doc@k: the page among the top k; phrase@k: its phrase inside one of the top k chunks).\n\n"
        + "\n".join(markdown_table(columns, rows)) + "\n"
    )


def fusion_label(settings: RetrieverSettings) -> str:
    if settings.hybrid_fusion == "weighted":
        fusion = f"weighted {settings.hybrid_dense_weight:g} dense / {1 - settings.hybrid_dense_weight:g} keyword"
    else:
        fusion = f"RRF k={settings.rrf_k}"
    return f"{fusion}, {settings.hybrid_candidates} candidates a half"


def speed_section(times: dict[int, list[float]], chunk_count: int, console: Console) -> str:
    columns = ["mode", "searches", "p50 ms", "p99 ms", "p50 / dense p50"]
    dense_p50 = median(times[DENSE])
    rows = [
        [evaluation_mode(mode), str(len(values)), f"{median(values):.1f}", f"{percentile(values, 0.99):.1f}", f"{median(values) / dense_p50:.2f}x"]
        for mode, values in times.items()
    ]
    title = f"Search at {chunk_count} chunks (top_k 4, the retriever's engine, modes interleaved)"
    console.print(rich_table(title, columns, rows, figures_right=True))
    return (
        f"\n## Speed at {chunk_count} chunks\n\nThe quality set's chunks repeated as other documents (real text, real "
        f"vectors) to the count; the questions' text and vectors as queries, top_k 4, the default fusion "
        f"({fusion_label(RetrieverSettings())}); the three modes take turns, so that the load of the machine falls on "
        "all alike. The retriever's engine in process (no gRPC hop).\n\n" + "\n".join(markdown_table(columns, rows)) + "\n"
    )


if __name__ == "__main__":
    main()
