"""Many people asking at once: askmesh's local mesh beside the Chatchat-style baseline.

    .venv/bin/python -m benchmarks.concurrency [--concurrency 1,4,16,64] [--seconds 60]

Both serve the same corpus (benchmarks/corpus: Linux man-pages from Debian's `manpages`) with
the same models (all-MiniLM-L6-v2, SmolLM2-135M-Instruct Q4_1 on llama.cpp), each on its own
defaults: askmesh as `make run` starts it (every tier a process, Envoy in front, Milvus Lite
embedded), the baseline as Chatchat's kb_chat flow in one process (benchmarks/baseline). The
questions are the corpus's labelled ones, in turn; each answer has `--max-new-tokens` new tokens
at most, greedy, the answer cache off. Closed-loop clients read every stream to its end; a
client refused with a retry pushback waits that long (with jitter) before it asks again, as a
gRPC client with a retry policy does. The two are measured one after the other at each
concurrency, in one run: this machine's pace drifts by a third within an hour.

Reported per system and concurrency: answers/s over the window and the drain of the calls in
flight, time to first token p50/p99 of the answers, calls refused (RESOURCE_EXHAUSTED) and how
long a refusal took end to end, other failures, prompt tokens per answer. Beside them: the
generator's own limit (Generate straight to the generator replica, one at a time, with the
prompts the gateway builds), and askmesh's retrieval on the labelled set through the mesh's
own embedder and retriever. Prints tables and writes benchmarks/results/<date>-concurrency.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.runtime.channels import CHANNEL_OPTIONS
from askmesh.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from benchmarks.baseline import client as baseline
from benchmarks.common import machine, median, percentile, save
from benchmarks.corpus.manpages import CorpusDocument, LabelledQuestion, build_corpus, load_questions, normalize
from benchmarks.loadgen import Outcome, Run, StreamFailed, drive

KNOWLEDGE_BASE = "manpages"
DOCUMENTS_PER_CALL = 8


@dataclass
class System:
    label: str
    ask: Callable[[int], Awaitable[Outcome]]
    runs: dict[int, Run] = field(default_factory=dict)


# -- askmesh ----------------------------------------------------------------------------------------
def load_askmesh(mesh: LocalMesh, corpus: Sequence[CorpusDocument]) -> int:
    chunks = 0
    with client.connect(mesh.layout.front_address) as channel:
        for start in range(0, len(corpus), DOCUMENTS_PER_CALL):
            documents = [
                gateway_pb2.Document(id=d.id, title=d.title, text=d.text) for d in corpus[start : start + DOCUMENTS_PER_CALL]
            ]
            chunks += client.add_documents(channel, KNOWLEDGE_BASE, documents).chunk_count
    return chunks


def askmesh_asker(
    stub: gateway_pb2_grpc.GatewayStub, questions: Sequence[LabelledQuestion], max_new_tokens: int, timeout_s: float
) -> Callable[[int], Awaitable[Outcome]]:
    parameters = common_pb2.GenerationParameters(max_new_tokens=max_new_tokens, temperature=0)

    async def ask(number: int) -> Outcome:
        request = gateway_pb2.AskRequest(
            question=questions[number % len(questions)].question, knowledge_base=KNOWLEDGE_BASE, parameters=parameters
        )
        started = time.perf_counter()
        first: float | None = None
        call = stub.Ask(request, timeout=timeout_s)
        try:
            async for message in call:
                event = message.WhichOneof("event")
                if event == "delta" and first is None:
                    first = time.perf_counter() - started
                elif event == "error":
                    raise StreamFailed(message.error.code)
                elif event == "done":
                    return Outcome(first_s=first, prompt_tokens=message.done.usage.prompt_tokens)
            raise StreamFailed("NO_DONE_MESSAGE")
        finally:
            if not call.done():
                call.cancel()

    return ask


async def generator_limit(mesh: LocalMesh, questions: Sequence[LabelledQuestion], max_new_tokens: int, calls: int) -> tuple[float, float]:
    """Answers/s and prompt tokens per answer of the generator alone, one call at a time, on
    the prompts the gateway builds (its instructions, the retriever's top chunks as passages)."""
    from services.gateway.config import GatewaySettings

    gateway = GatewaySettings()
    prompts = []
    with grpc.insecure_channel(mesh.layout.replicas("embedder")[0], options=CHANNEL_OPTIONS) as channel:
        texts = [q.question for q in questions[:calls]]
        embedded = embedder_pb2_grpc.EmbedderStub(channel).Embed(embedder_pb2.EmbedRequest(texts=texts), timeout=120)
    with grpc.insecure_channel(mesh.layout.replicas("retriever")[0], options=CHANNEL_OPTIONS) as channel:
        retriever = retriever_pb2_grpc.RetrieverStub(channel)
        for text, embedding in zip(texts, embedded.embeddings):
            found = retriever.Search(
                retriever_pb2.SearchRequest(knowledge_base=KNOWLEDGE_BASE, vector=embedding.values, top_k=gateway.default_top_k),
                timeout=60,
            )
            prompts.append(generator_pb2.GenerateRequest(
                messages=[
                    common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=gateway.system_prompt),
                    common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text),
                ],
                parameters=common_pb2.GenerationParameters(max_new_tokens=max_new_tokens, temperature=0),
                passages=[
                    generator_pb2.ContextPassage(number=n, title=r.chunk.title, text=r.chunk.text)
                    for n, r in enumerate(found.results, start=1)
                ],
            ))
    prompt_tokens = []
    async with grpc.aio.insecure_channel(mesh.layout.replicas("generator")[0], options=CHANNEL_OPTIONS) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        started = time.perf_counter()
        for prompt in prompts:
            async for message in stub.Generate(prompt):
                if message.HasField("done"):
                    prompt_tokens.append(message.done.usage.prompt_tokens)
        elapsed = time.perf_counter() - started
    return len(prompts) / elapsed, median([float(t) for t in prompt_tokens])


def askmesh_retrieval(mesh: LocalMesh, questions: Sequence[LabelledQuestion]) -> tuple[float, float]:
    """doc@3 and phrase@5 through the mesh's embedder and retriever (Milvus Lite's index)."""
    with grpc.insecure_channel(mesh.layout.replicas("embedder")[0], options=CHANNEL_OPTIONS) as channel:
        embedded = embedder_pb2_grpc.EmbedderStub(channel).Embed(
            embedder_pb2.EmbedRequest(texts=[q.question for q in questions]), timeout=300
        )
    doc_hits = phrase_hits = 0
    with grpc.insecure_channel(mesh.layout.replicas("retriever")[0], options=CHANNEL_OPTIONS) as channel:
        retriever = retriever_pb2_grpc.RetrieverStub(channel)
        for question, embedding in zip(questions, embedded.embeddings):
            found = retriever.Search(
                retriever_pb2.SearchRequest(knowledge_base=KNOWLEDGE_BASE, vector=embedding.values, top_k=5), timeout=60
            ).results
            doc_hits += question.document in {r.chunk.document_id for r in found[:3]}
            phrase_hits += any(normalize(question.phrase) in normalize(r.chunk.text) for r in found)
    return doc_hits / len(questions), phrase_hits / len(questions)


# -- the baseline -----------------------------------------------------------------------------------
def baseline_asker(
    http: httpx.AsyncClient, base_url: str, questions: Sequence[LabelledQuestion], max_new_tokens: int
) -> Callable[[int], Awaitable[Outcome]]:
    async def ask(number: int) -> Outcome:
        answer = await baseline.ask(
            http, base_url, questions[number % len(questions)].question, max_new_tokens, temperature=0
        )
        return Outcome(first_s=answer.ttft_s, prompt_tokens=answer.prompt_tokens or None)

    return ask


# -- the sweep --------------------------------------------------------------------------------------
def row(system: System, concurrency: int) -> list[str]:
    run = system.runs[concurrency]
    refused = run.errors.get("RESOURCE_EXHAUSTED", 0)
    failed = sum(run.errors.values()) - refused
    refusal_times = run.failed_s.get("RESOURCE_EXHAUSTED", [])
    refusal = f"{percentile(refusal_times, 0.5) * 1000:.0f} / {percentile(refusal_times, 0.99) * 1000:.0f} / {max(refusal_times) * 1000:.0f}" if refused else "-"
    others = ", ".join(f"{code} {count}" for code, count in run.errors.items() if code != "RESOURCE_EXHAUSTED")
    return [
        str(concurrency),
        system.label,
        f"{run.rate(items=False):.2f}",
        f"{run.p(0.5, first=True):.1f} / {run.p(0.99, first=True):.1f}",
        str(run.ok),
        f"{refused}" + (f" ({refusal} ms)" if refused else ""),
        f"{failed}" + (f" ({others})" if others else ""),
        f"{median([float(t) for t in run.prompt_tokens]):.0f}" if run.prompt_tokens else "-",
    ]


COLUMNS = [
    "askers",
    "system",
    "answers/s",
    "TTFT p50 / p99 s",
    "answers",
    "refused (p50 / p99 / max ms)",
    "failed",
    "prompt tokens p50",
]


async def sweep(systems: Sequence[System], concurrencies: Sequence[int], seconds: float, say: Callable[[str], None]) -> None:
    for concurrency in concurrencies:
        for system in systems:
            run = await drive(system.ask, concurrency=concurrency, duration_s=seconds, error_backoff_s=0.5)
            system.runs[concurrency] = run
            say(f"  {system.label} at {concurrency}: {run.ok} answers, {run.rate(items=False):.2f}/s, errors {dict(run.errors)}")
            await asyncio.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=60.0, help="each run's window (calls in flight then finish)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--generator-calls", type=int, default=12, help="calls measuring the generator's own limit")
    parser.add_argument("--call-timeout", type=float, default=600.0)
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    console = Console()
    say = lambda text: console.print(text, highlight=False)  # noqa: E731

    corpus, questions = build_corpus(), load_questions()
    characters = sum(len(d.text) for d in corpus)
    say(f"corpus: {len(corpus)} documents, {characters:,} characters; {len(questions)} questions")
    with tempfile.TemporaryDirectory(prefix="askmesh-concurrency-") as scratch:
        data = Path(scratch)
        mesh = LocalMesh(MeshLayout.on_free_ports(data / "askmesh"), say=lambda _: None)
        with mesh, baseline.running_server(data / "baseline") as server:
            started = time.perf_counter()
            chunks = load_askmesh(mesh, corpus)
            say(f"askmesh: {chunks} chunks stored in {time.perf_counter() - started:.0f} s")

            async def run_all() -> tuple[list[System], float, float, float, float]:
                async with httpx.AsyncClient(timeout=httpx.Timeout(args.call_timeout), limits=httpx.Limits(max_connections=256)) as http:
                    loaded = await baseline.upload_documents(
                        http, server.base_url, [{"id": d.id, "title": d.title, "text": d.text} for d in corpus]
                    )
                    say(f"baseline: {loaded}")
                    doc3, phrase5 = askmesh_retrieval(mesh, questions)
                    say(f"askmesh retrieval through the mesh: doc@3 {doc3:.0%}, phrase@5 {phrase5:.0%}")
                    limit, limit_tokens = await generator_limit(mesh, questions, args.max_new_tokens, args.generator_calls)
                    say(f"generator alone: {limit:.2f} answers/s, {limit_tokens:.0f} prompt tokens")
                    async with grpc.aio.insecure_channel(mesh.layout.front_address, options=CHANNEL_OPTIONS) as channel:
                        stub = gateway_pb2_grpc.GatewayStub(channel)
                        systems = [
                            System("askmesh", askmesh_asker(stub, questions, args.max_new_tokens, args.call_timeout)),
                            System("baseline", baseline_asker(http, server.base_url, questions, args.max_new_tokens)),
                        ]
                        for system in systems:  # warm-up: connections, caches, the model's first pages
                            await drive(system.ask, concurrency=1, max_calls=2, first_number=len(questions) - 2)
                        await sweep(systems, concurrencies, args.seconds, say)
                return systems, doc3, phrase5, limit, limit_tokens

            systems, doc3, phrase5, limit, limit_tokens = asyncio.run(run_all())

    table = Table(title="Concurrent askers: askmesh (local mesh, defaults) beside the Chatchat-style baseline")
    for column in COLUMNS:
        table.add_column(column)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for concurrency in concurrencies:
        for system in systems:
            cells = row(system, concurrency)
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    ratios = []
    for concurrency in concurrencies:
        ours, theirs = (s.runs[concurrency] for s in systems)
        ratios.append(f"| {concurrency} | {ours.rate(items=False) / theirs.rate(items=False):.2f}x |")
    say(f"generator alone: {limit:.2f} answers/s ({limit_tokens:.0f} prompt tokens); askmesh retrieval doc@3 {doc3:.0%}, phrase@5 {phrase5:.0%}")
    path = save(
        "concurrency",
        "# Concurrent askers: askmesh beside the Chatchat-style baseline\n\n"
        f"Machine: {machine()}\n\n"
        f"Corpus: {len(corpus)} Linux man-pages (Debian `manpages`), {characters:,} characters, {len(questions)} labelled "
        f"questions asked in turn; {args.max_new_tokens} new tokens at most, greedy; {args.seconds:.0f} s windows, then the "
        "calls in flight finish (answers/s counts both); closed-loop clients, a refused one waiting its retry pushback. "
        "askmesh: `make run`'s defaults (one replica per tier, Envoy, Milvus Lite embedded, answer cache off); "
        "baseline: benchmarks/baseline (Chatchat's kb_chat flow in one process, top_k 3, 250/50 chunks, one generation "
        "at a time).\n\n"
        + "\n".join(lines)
        + "\n\nanswers/s, askmesh / baseline:\n\n| askers | ratio |\n|---|---|\n" + "\n".join(ratios)
        + f"\n\nThe generator alone (Generate to its replica, one call at a time, the gateway's prompts): {limit:.2f} answers/s, "
        f"{limit_tokens:.0f} prompt tokens per answer.\n\nRetrieval through the mesh's embedder and retriever on the "
        f"labelled set: expected document in the top 3 for {doc3:.0%}, expected phrase in the top 5 chunks for {phrase5:.0%}.\n",
    )
    say(f"written to {path}")


if __name__ == "__main__":
    main()
