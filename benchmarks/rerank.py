"""What reranking adds to an Ask, on the real local mesh, side by side with the same questions
not reranked.

    .venv/bin/python -m benchmarks.rerank [--questions 20] [--models tiny,minilm]

No reranker weights ship on PyPI, so the embedder tier's reranker is a cross-encoder this
script builds and saves (nothing is downloaded); its scores mean nothing, its cost is real:
- tiny: a two-layer, 32-wide BERT with one label (what the tests use): the cost of the rerank
  step itself (the gateway's over-fetch, the Rerank call through Envoy's internal listener, the
  renumbering), with next to no model time;
- minilm: all-MiniLM-L6-v2's encoder with a fresh one-label head, i.e. the shape and cost of
  cross-encoder/ms-marco-MiniLM-L-6-v2 (6 layers, 384 wide, 512 tokens), the usual small reranker.

For each model a mesh starts with ASKMESH_EMBEDDER_RERANKER_MODEL_PATH set, the man-pages corpus
(benchmarks/corpus: the pages the questions name, then others up to --corpus-chars) is loaded, and each labelled question is asked twice, reranked and not (the
order alternates), top_k 5 (20 candidates reranked), 8 new tokens, greedy. Prints a table and
writes benchmarks/results/<date>-rerank.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Console

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import common_pb2, gateway_pb2
from benchmarks.common import machine, markdown_table, median, percentile, rich_table, save
from benchmarks.corpus.manpages import LabelledQuestion, build_corpus, load_questions

KNOWLEDGE_BASE = "manpages"
TOP_K = 5
MODELS = ("tiny", "minilm")
# The 1-minute load average after each question, per model: a shared machine's other work shows here.
LOADS: dict[str, list[float]] = {}
DESCRIPTIONS = {
    "tiny": "2 layers, 32 wide (the tests' model)",
    "minilm": "6 layers, 384 wide: ms-marco-MiniLM-L-6-v2's shape",
}


def build_cross_encoder(kind: str, folder: Path) -> Path:
    """A one-label BertForSequenceClassification and all-MiniLM-L6-v2's tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from services.embedder.config import bundled_model_path

    source = str(bundled_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    torch.manual_seed(0)
    if kind == "tiny":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37, max_position_embeddings=128, num_labels=1, initializer_range=0.5,
        )
        model = BertForSequenceClassification(config)
    else:
        model = BertForSequenceClassification.from_pretrained(source, num_labels=1, local_files_only=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def corpus_for(questions: list[LabelledQuestion], chars: int) -> list[gateway_pb2.Document]:
    """The pages the questions name, then others in corpus order, up to about `chars` characters."""
    pages = build_corpus()
    named = {q.document for q in questions}
    chosen = [p for p in pages if p.id in named]
    for page in pages:
        if sum(len(p.text) for p in chosen) >= chars:
            break
        if page.id not in named:
            chosen.append(page)
    return [gateway_pb2.Document(id=p.id, title=p.title, text=p.text) for p in chosen]


@dataclass
class Samples:
    total: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    search: list[float] = field(default_factory=list)
    rerank: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    errors: int = 0


def ask(channel: grpc.Channel, question: str, rerank: bool, samples: Samples) -> None:
    request = gateway_pb2.AskRequest(
        question=question,
        knowledge_base=KNOWLEDGE_BASE,
        top_k=TOP_K,
        rerank=rerank,
        parameters=common_pb2.GenerationParameters(max_new_tokens=8, temperature=0),
    )
    try:
        for message in client.ask(channel, request, timeout_s=600):
            if message.HasField("done"):
                timings = message.done.timings
                samples.total.append(timings.total_ms)
                samples.first_token.append(timings.time_to_first_token_ms)
                samples.search.append(timings.search_ms)
                samples.rerank.append(timings.rerank_ms)
                samples.overhead.append(timings.gateway_overhead_ms)
            elif message.HasField("error"):
                samples.errors += 1
    except grpc.RpcError:
        samples.errors += 1


def run_model(
    kind: str, folder: Path, documents: list[gateway_pb2.Document], questions: list[str], console: Console
) -> dict[bool, Samples]:
    model = build_cross_encoder(kind, folder / f"cross-encoder-{kind}")
    layout = MeshLayout.on_free_ports(folder / f"mesh-{kind}")
    results = {False: Samples(), True: Samples()}
    loads: list[float] = []
    console.print(f"{kind}: starting the mesh ...")
    with LocalMesh(layout, env={"ASKMESH_EMBEDDER_RERANKER_MODEL_PATH": str(model)}, say=lambda _: None) as mesh:
        with client.connect(layout.front_address, mesh.admin_key) as channel:
            chunks = 0
            # A few documents per call: one call with the whole corpus outlasts Envoy's idle
            # timeout on a busy 2-core machine.
            for offset in range(0, len(documents), 4):
                chunks += client.add_documents(channel, KNOWLEDGE_BASE, documents[offset : offset + 4], 600).chunk_count
            console.print(f"{kind}: {len(documents)} documents, {chunks} chunks loaded; asking {len(questions)} questions twice ...")
            ask(channel, "warm-up: what is a man page?", True, Samples())
            for index, question in enumerate(questions):
                for rerank in ((False, True) if index % 2 == 0 else (True, False)):
                    ask(channel, question, rerank, results[rerank])
                loads.append(os.getloadavg()[0])
    LOADS[kind] = loads
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--corpus-chars", type=int, default=200_000, help="man pages loaded (those the questions name first)")
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.models.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in MODELS]
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} unknown; choose from {', '.join(MODELS)}")
    console = Console()
    labelled = load_questions()[: args.questions]
    questions = [q.question for q in labelled]
    documents = corpus_for(labelled, args.corpus_chars)
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in kinds:
            results = run_model(kind, Path(folder), documents, questions, console)
            plain_total = median(results[False].total)
            for rerank in (False, True):
                s = results[rerank]
                added = f"{median(s.total) - plain_total:+.0f} ms" if rerank else ""
                rows.append((
                    kind, "on" if rerank else "off", f"{median(s.total):.0f} ms", added,
                    f"{median(s.first_token):.0f} ms", f"{median(s.search):.1f} ms",
                    f"{median(s.rerank):.1f} ms", f"{percentile(s.rerank, 0.9):.1f} ms",
                    f"{median(s.overhead):.2f} ms", str(s.errors),
                ))
    columns = ("reranker", "rerank", "Ask total p50", "vs off", "first token p50", "search p50",
               "rerank p50", "rerank p90", "gateway overhead p50", "errors")
    console.print(rich_table(f"Ask with and without reranking ({len(questions)} questions, top_k {TOP_K}, {TOP_K * 4} candidates)", columns, rows))
    text = "\n".join([
        "# Reranking: its cost on Ask",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python -m benchmarks.rerank --questions {args.questions} "
        f"--models {','.join(kinds)} --corpus-chars {args.corpus_chars}`.",
        "",
        "No real reranker weights are available here (none ship on PyPI, and nothing may be downloaded):",
        "the rerankers are cross-encoders built by the script, with meaningless scores and a real cost:",
        *[f"- {kind}: {DESCRIPTIONS[kind]}" for kind in kinds],
        "",
        f"Real local mesh (Envoy; the Rerank call goes through its internal listener); {len(documents)} man pages",
        f"({sum(len(d.text) for d in documents)} characters: those the questions name, then others);",
        f"each question asked reranked and not, alternately first; top_k {TOP_K}, so {TOP_K * 4} candidates are",
        "searched and reranked; 8 new tokens, greedy. Figures from each Ask's `done.timings`.",
        "1-minute load average while asking (min-max): "
        + "; ".join(f"{kind} {min(LOADS[kind]):.1f}-{max(LOADS[kind]):.1f}" for kind in kinds if LOADS.get(kind))
        + f" (on {os.cpu_count()} cores).",
        "",
        *markdown_table(columns, rows),
        "",
    ])
    console.print(f"saved to {save('rerank', text)}")


if __name__ == "__main__":
    main()
