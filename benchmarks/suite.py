"""The benchmark suite (`make bench`): every tier of the real local mesh, under load.

    .venv/bin/python -m benchmarks.suite [--quick] [--repeats 3] [--sections embedder,retriever,ask]

Starts the local mesh (four service processes, Envoy, Milvus Lite) on free ports and measures:
- embedder: sentences/s at concurrency 1, 8, 32 (one ~40-token sentence per Embed call), on the
  mesh's embedder with dynamic batching, on a second embedder process started with
  ASKMESH_EMBEDDER_BATCHING=false, both called directly on their ports; and the model
  in-process (sentence-transformers, batches of 1, 8, 32 of the same sentences);
- retriever: Search p50/p99 (random unit query vectors, top_k 4, on the retriever's port) in
  knowledge bases of 10k and 100k chunks of random unit vectors, and how long loading took;
- Ask through Envoy's front door: time to first token p50/p99 and answers/s at concurrency
  1, 4, 16, 64, with failed calls counted by status;
- the same load on the generator called directly (Generator/Generate on its port, the same
  prompts the gateway builds), so the mesh's own cost is the difference.
Each figure is the median over repeated runs of that figure in each run. Prints a table per
section and writes benchmarks/results/<date>-suite.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout, free_port
from askmesh.runtime.channels import CHANNEL_OPTIONS
from askmesh.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from benchmarks.common import machine, markdown_table, median, rich_table, save
from benchmarks.loadgen import Outcome, Run, StreamFailed, drive, errors_text, median_of

REPO = Path(__file__).resolve().parent.parent
DIMENSION = 384
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
UPSERT_BATCH = 2048  # the retriever's max_upsert_chunks
ASK_KB = "bench_ask"
# Chunks of the Ask knowledge base, as in benchmarks/ingestion.py: four sources of 400 characters
# make a prompt of about 450 tokens, which the bundled model reads in about a second here.
ASK_CHUNK_SIZE = 400

# 32 sentences of about 40 tokens each (all-MiniLM-L6-v2's WordPiece), all different.
SENTENCES = [
    f"On shift {n} the warehouse team in aisle {n % 13} moved {7 * n + 3} crates of spare parts to dock "
    f"{n % 5}, checked every label against the manifest, and reported {n % 4} damaged boxes to the supervisor."
    for n in range(32)
]

# Questions about the sample documents; each call adds its own ticket number, so no two calls
# send the same question: llama.cpp would reuse the KV cache of a repeated prompt, and an
# answer cache would replay a repeated question.
TOPICS = [
    "How many days can I work from abroad?",
    "What is the hotel limit in Paris?",
    "Who approves business class flights?",
    "What is the per diem for meals?",
    "When are expense reports due?",
    "What equipment does the company provide for remote work?",
    "How does Envoy balance load between replicas?",
    "What happens when a service is stopped?",
    "How does askmesh report that a service is ready?",
    "Where are the chunks of a knowledge base stored?",
    "What security rules apply when working remotely?",
    "How do I book a train for a business trip?",
]


def question(number: int) -> str:
    return f"{TOPICS[number % len(TOPICS)]} (ticket {1000 + number})"


# -- settings --------------------------------------------------------------------------------------
@dataclass
class Settings:
    repeats: int = 3
    embed_concurrency: tuple[int, ...] = (1, 8, 32)
    embed_seconds: float = 2.0
    search_sizes: tuple[int, ...] = (10_000, 100_000)
    searches: int = 100
    search_seconds: float = 10.0  # a run also ends here, however few searches it made
    ask_concurrency: tuple[int, ...] = (1, 4, 16, 64)
    ask_seconds: float = 6.0  # at concurrency 1 an Ask takes about 1.2 s: 3 s windows held 2 or 3
    max_new_tokens: int = 16
    call_timeout_s: float = 30.0
    error_backoff_s: float = 0.5
    sections: tuple[str, ...] = ("embedder", "retriever", "ask")

    def describe(self) -> list[str]:
        return [
            f"- Every figure is the **median over {self.repeats} runs** of that figure in each run (p50 and p99 are "
            "taken over the calls of one run); error counts are summed over all runs, out of all calls made.",
            f"- Load: a closed-loop asyncio gRPC driver (`benchmarks/loadgen.py`, grpc.aio, one channel per target): "
            "N workers each call again as soon as their call ends; when a window closes no new call starts and the "
            "calls in flight finish; rates are successful work over the whole run, that drain included. A failed call "
            f"is counted by status code and its worker pauses {self.error_backoff_s} s before the next. Calls have a "
            f"{self.call_timeout_s:.0f} s deadline.",
            f"- Embedder: windows of {self.embed_seconds} s; each Embed call carries one ~40-token sentence, so "
            "concurrency N offers the service N sentences at once. In-process: `model.encode` of batches of N of the "
            "same sentences for the same window, in the driver's process (loaded before the mesh starts); each run "
            "measures in-process, batching and no batching back to back.",
            f"- Retriever: {self.searches} Search calls per run (or fewer: a run stops starting new ones after "
            f"{self.search_seconds:.0f} s), one at a time, measured right after loading (Milvus Lite may still be "
            "compacting and indexing then), a random unit query vector each, "
            "top_k 4, no filters; the knowledge bases hold random unit vectors with short chunk texts, loaded with "
            f"Upsert calls of {UPSERT_BATCH} chunks (each flushed by the retriever).",
            f"- Ask: windows of {self.ask_seconds} s; questions about the sample documents (`samples/`, chunks of "
            f"{ASK_CHUNK_SIZE} characters, no overlap, top_k 4), each with its own ticket number so no prompt repeats; {self.max_new_tokens} "
            "new tokens, greedy. Time to first token is measured by the client, to the first token delta. The "
            "generator direct runs send `Generator/Generate` the same messages the gateway builds (system prompt "
            "with the sources retrieved for the question's topic, then the question) on the generator's port.",
        ]


# -- helpers ----------------------------------------------------------------------------------------
def wait_serving(address: str, popen: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"{address} exited with {popen.returncode}; see {log}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} did not become SERVING in {timeout_s:.0f} s; see {log}")
            time.sleep(0.2)


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds == seconds else "-"


def rate(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def percent(value: float) -> str:
    return f"{value * 100:.0f}%" if value == value else "-"


def times(value: float) -> str:
    return f"{value:.2f}x" if value == value else "-"


async def repeated(
    settings: Settings, label: str, say: Callable[[str], None], run_once: Callable[[int], Awaitable[Run]], pause_s: float = 0.5
) -> list[Run]:
    runs = []
    for attempt in range(settings.repeats):
        run = await run_once(attempt)
        say(f"    {label} run {attempt + 1}: {run.ok} ok, {sum(run.errors.values())} failed in {run.elapsed_s:.1f} s")
        runs.append(run)
        await asyncio.sleep(pause_s)
    return runs


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        return rich_table(self.title, self.columns, self.rows)

    def markdown(self) -> list[str]:
        return [
            f"## {self.title}",
            "",
            *self.notes,
            *([""] if self.notes else []),
            *markdown_table(self.columns, self.rows),
            "",
        ]


# -- embedder ---------------------------------------------------------------------------------------
class InProcessModel:
    """The embedding model loaded in this process: the reference the service is compared with."""

    def __init__(self, say: Callable[[str], None]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        from services.embedder.config import bundled_model_path

        self.model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
        tokens = [len(ids) for ids in self.model.tokenize(SENTENCES)["input_ids"]]
        say(f"  sentences: {min(tokens)}-{max(tokens)} tokens each")
        self.model.encode(SENTENCES, batch_size=32, normalize_embeddings=True)  # warm-up

    def rate(self, size: int, seconds: float) -> float:
        """Sentences/s of `model.encode` on batches of `size` sentences for `seconds`."""
        batch = (SENTENCES * (size // len(SENTENCES) + 1))[:size]
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.model.encode(batch, batch_size=size, normalize_embeddings=True, convert_to_numpy=True)
            done += size
        return done / (time.perf_counter() - started)


async def embed_once(settings: Settings, stub: embedder_pb2_grpc.EmbedderStub, number: int) -> Outcome:
    request = embedder_pb2.EmbedRequest(texts=[SENTENCES[number % len(SENTENCES)]])
    await stub.Embed(request, timeout=settings.call_timeout_s)
    return Outcome(items=1)


async def embed_run(settings: Settings, stub: embedder_pb2_grpc.EmbedderStub, concurrency: int) -> Run:
    return await drive(
        lambda number: embed_once(settings, stub, number),
        concurrency=concurrency,
        duration_s=settings.embed_seconds,
        error_backoff_s=settings.error_backoff_s,
    )


@dataclass
class EmbedderRound:
    """One repeat at one concurrency: the in-process reference and both services, back to back."""

    in_process: float
    batched: Run
    unbatched: Run


async def embedder_rounds(
    settings: Settings, reference: InProcessModel, batched_address: str, unbatched_address: str, say: Callable[[str], None]
) -> dict[int, list[EmbedderRound]]:
    """Each repeat runs the three back to back, so a ratio compares runs minutes apart at most:
    on a shared machine the pace of the cores drifts by 10% and more over a few minutes."""
    async with aio_channel(batched_address) as batched_channel, aio_channel(unbatched_address) as unbatched_channel:
        batched = embedder_pb2_grpc.EmbedderStub(batched_channel)
        unbatched = embedder_pb2_grpc.EmbedderStub(unbatched_channel)
        for stub in (batched, unbatched):  # warm-up
            await drive(lambda n, stub=stub: embed_once(settings, stub, n), concurrency=4, max_calls=16)
        results: dict[int, list[EmbedderRound]] = {}
        for concurrency in settings.embed_concurrency:
            results[concurrency] = []
            for attempt in range(settings.repeats):
                in_process = await asyncio.to_thread(reference.rate, concurrency, settings.embed_seconds)
                await asyncio.sleep(0.5)
                with_batching = await embed_run(settings, batched, concurrency)
                await asyncio.sleep(0.5)
                without_batching = await embed_run(settings, unbatched, concurrency)
                await asyncio.sleep(0.5)
                results[concurrency].append(EmbedderRound(in_process, with_batching, without_batching))
                say(
                    f"    concurrency {concurrency} run {attempt + 1}: in-process {in_process:.0f}, batching "
                    f"{with_batching.rate():.0f} ({sum(with_batching.errors.values())} failed), no batching "
                    f"{without_batching.rate():.0f} ({sum(without_batching.errors.values())} failed) sentences/s"
                )
        return results


def start_service(tier: str, port: int, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`askmesh serve <tier>` on 127.0.0.1:`port` with `env` (which sets that port), once SERVING."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", "askmesh.cli", "serve", tier],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, popen, log)
    except BaseException:
        stop_process(popen)
        raise
    return popen, address


def start_unbatched_embedder(mesh: LocalMesh, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = mesh.service_env("embedder", 99, port)
    env["ASKMESH_EMBEDDER_BATCHING"] = "false"
    return start_service("embedder", port, env, folder / "logs" / "embedder-unbatched.log")


def stop_process(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


async def embedder_section(
    settings: Settings, mesh: LocalMesh, folder: Path, reference: InProcessModel, say: Callable[[str], None]
) -> Section:
    batched_address = mesh.layout.replicas("embedder")[0]
    say("embedder, unbatched: starting a second embedder with ASKMESH_EMBEDDER_BATCHING=false ...")
    popen, unbatched_address = start_unbatched_embedder(mesh, folder)
    try:
        say(f"embedder: in-process, batching ({batched_address}), no batching ({unbatched_address}) in turn ...")
        rounds = await embedder_rounds(settings, reference, batched_address, unbatched_address, say)
    finally:
        stop_process(popen)

    section = Section(
        "Embedder: sentences/s",
        ["concurrency (in-process: batch)", "service, batching", "service, no batching", "in-process",
         "batching ÷ in-process", "batching ÷ no batching",
         "latency p50 / p99 ms, batching", "latency p50 / p99 ms, no batching", "errors (batching; no batching)"],
        notes=[
            "Services called directly on their own ports (not through Envoy): the mesh's embedder "
            "(`ASKMESH_EMBEDDER_BATCHING=true`) and a second embedder process with `ASKMESH_EMBEDDER_BATCHING=false`. "
            "One sentence per Embed call. Each run measures the in-process model, then the service with batching, "
            "then without, back to back; the ratios are the medians of each run's ratios.",
        ],
    )
    for concurrency in settings.embed_concurrency:
        runs = rounds[concurrency]
        with_runs = [one.batched for one in runs]
        without_runs = [one.unbatched for one in runs]
        section.rows.append([
            str(concurrency),
            rate(median_of(with_runs, Run.rate)),
            rate(median_of(without_runs, Run.rate)),
            rate(median([one.in_process for one in runs])),
            percent(median([one.batched.rate() / one.in_process for one in runs])),
            times(median([one.batched.rate() / one.unbatched.rate() for one in runs if one.unbatched.rate()])),
            f"{ms(median_of(with_runs, lambda r: r.p(0.5)))} / {ms(median_of(with_runs, lambda r: r.p(0.99)))}",
            f"{ms(median_of(without_runs, lambda r: r.p(0.5)))} / {ms(median_of(without_runs, lambda r: r.p(0.99)))}",
            f"{errors_text(with_runs)}; {errors_text(without_runs)}",
        ])
    return section


# -- retriever --------------------------------------------------------------------------------------
def unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def load_knowledge_base(stub: retriever_pb2_grpc.RetrieverStub, name: str, chunks: int, rng: np.random.Generator,
                        say: Callable[[str], None]) -> float:
    """Creates `name` and upserts `chunks` random chunks; returns the seconds the upserts took."""
    stub.CreateCollection(
        retriever_pb2.CreateCollectionRequest(knowledge_base=name, generation=1, dimension=DIMENSION, embedding_model=EMBEDDING_MODEL),
        timeout=120,
    )
    seconds = 0.0
    for start in range(0, chunks, UPSERT_BATCH):
        count = min(UPSERT_BATCH, chunks - start)
        vectors = unit_vectors(rng, count)
        request = retriever_pb2.UpsertRequest(
            knowledge_base=name,
            embedding_model=EMBEDDING_MODEL,
            chunks=[
                retriever_pb2.VectorChunk(
                    chunk=common_pb2.Chunk(
                        id=f"{name}-{start + i}", document_id=f"doc-{(start + i) // 100}", chunk_index=(start + i) % 100,
                        title=f"Document {(start + i) // 100}", text=SENTENCES[(start + i) % len(SENTENCES)], document_version=1,
                    ),
                    vector=vectors[i].tolist(),
                )
                for i in range(count)
            ],
        )
        started = time.perf_counter()  # the upsert only, not making the request
        stub.Upsert(request, timeout=600)
        seconds += time.perf_counter() - started
        if (start // UPSERT_BATCH) % 10 == 9:
            say(f"    {start + count} chunks upserted ({seconds:.0f} s)")
    return seconds


async def retriever_section(settings: Settings, mesh: LocalMesh, say: Callable[[str], None]) -> Section:
    address = mesh.layout.replicas("retriever")[0]
    rng = np.random.default_rng(7)
    section = Section(
        "Retriever: Search latency",
        ["chunks", "load time", "searches per run", "Search p50 ms", "Search p99 ms", "searches/s", "errors"],
        notes=[f"Retriever called directly on its port ({address}), Milvus Lite embedded in it, HNSW on cosine, "
               "top_k 4, one search at a time."],
    )
    queries = unit_vectors(rng, 1000)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as sync_channel:
        sync_stub = retriever_pb2_grpc.RetrieverStub(sync_channel)
        for size in settings.search_sizes:
            name = f"bench_{size}"
            say(f"retriever: loading {size} chunks into {name} ...")
            load_s = load_knowledge_base(sync_stub, name, size, rng, say)
            info = sync_stub.DescribeCollection(retriever_pb2.DescribeCollectionRequest(knowledge_base=name), timeout=60)
            say(f"    loaded {info.chunk_count} chunks in {load_s:.1f} s")
            async with aio_channel(address) as channel:
                stub = retriever_pb2_grpc.RetrieverStub(channel)

                async def search(number: int, stub: retriever_pb2_grpc.RetrieverStub = stub, name: str = name) -> Outcome:
                    request = retriever_pb2.SearchRequest(knowledge_base=name, vector=queries[number % len(queries)].tolist(), top_k=4)
                    reply = await stub.Search(request, timeout=settings.call_timeout_s)
                    if len(reply.results) != 4:
                        raise StreamFailed(f"GOT_{len(reply.results)}_RESULTS")
                    return Outcome()

                await drive(search, concurrency=1, max_calls=20)  # warm-up
                runs = await repeated(
                    settings, f"{size} chunks", say,
                    lambda attempt: drive(
                        search, concurrency=1, max_calls=settings.searches, duration_s=settings.search_seconds,
                        first_number=attempt * settings.searches,
                    ),
                )
            # Scratch data: left in place, Milvus Lite goes on compacting and indexing it inside the
            # retriever while the next section runs (seen as Asks of 10-34 s at concurrency 1).
            sync_stub.DropKnowledgeBase(retriever_pb2.DropKnowledgeBaseRequest(knowledge_base=name), timeout=120)
            section.rows.append([
                f"{info.chunk_count:,}",
                f"{load_s:.0f} s ({size / load_s:.0f} chunks/s)",
                f"{median_of(runs, lambda r: r.calls):.0f}",
                ms(median_of(runs, lambda r: r.p(0.5))),
                ms(median_of(runs, lambda r: r.p(0.99))),
                rate(median_of(runs, lambda r: r.rate(items=False))),
                errors_text(runs),
            ])
    return section


# -- Ask and the generator direct -------------------------------------------------------------------
def topic_prompts(mesh: LocalMesh) -> list[generator_pb2.GenerateRequest]:
    """For each topic, the prompt the gateway sends the generator (its instructions, and the
    sources the retriever finds for the topic's question as passages), without the question."""
    from services.gateway.config import GatewaySettings

    gateway = GatewaySettings()
    with grpc.insecure_channel(mesh.layout.replicas("embedder")[0], options=CHANNEL_OPTIONS) as channel:
        embedded = embedder_pb2_grpc.EmbedderStub(channel).Embed(embedder_pb2.EmbedRequest(texts=TOPICS), timeout=60)
    prompts = []
    with grpc.insecure_channel(mesh.layout.replicas("retriever")[0], options=CHANNEL_OPTIONS) as channel:
        retriever = retriever_pb2_grpc.RetrieverStub(channel)
        for embedding in embedded.embeddings:
            found = retriever.Search(
                retriever_pb2.SearchRequest(knowledge_base=ASK_KB, vector=embedding.values, top_k=gateway.default_top_k), timeout=60
            )
            prompts.append(generator_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=gateway.system_prompt)],
                passages=[
                    generator_pb2.ContextPassage(number=number, title=r.chunk.title or r.chunk.document_id, text=r.chunk.text)
                    for number, r in enumerate(found.results, start=1)
                ],
            ))
    return prompts


@dataclass
class AskTarget:
    label: str
    address: str
    runs: dict[int, list[Run]] = field(default_factory=dict)
    cached: int = 0  # answers the gateway replayed from a cache (should stay 0: no question repeats)


async def stream_call(call: grpc.aio.UnaryStreamCall, started: float) -> tuple[Outcome, bool]:
    """Reads an Ask or Generate stream: time to the first delta; raises on an error message or a
    stream that ends without its done message."""
    first: float | None = None
    try:
        async for message in call:
            event = message.WhichOneof("event")
            if event == "delta" and first is None:
                first = time.perf_counter() - started
            elif event == "error":
                raise StreamFailed(message.error.code or "STREAM_ERROR")
            elif event == "done":
                return Outcome(first_s=first if first is not None else time.perf_counter() - started), bool(
                    getattr(message.done, "cached", False)
                )
        raise StreamFailed("NO_DONE_MESSAGE")
    finally:
        if not call.done():
            call.cancel()


async def ask_section(settings: Settings, mesh: LocalMesh, say: Callable[[str], None]) -> Section:
    layout = mesh.layout
    say(f"Ask: creating {ASK_KB} and adding samples/ ...")
    with client.connect(layout.front_address) as channel:
        knowledge_pb2_grpc.KnowledgeBasesStub(channel).CreateKnowledgeBase(
            knowledge_pb2.CreateKnowledgeBaseRequest(
                name=ASK_KB, chunking=common_pb2.ChunkingOptions(chunk_size=ASK_CHUNK_SIZE, chunk_overlap=0)
            ),
            timeout=120,
        )
        added = client.load_samples(channel, REPO / "samples", ASK_KB)
    say(f"    {len(added.documents)} documents added")
    prompts = topic_prompts(mesh)
    parameters = common_pb2.GenerationParameters(max_new_tokens=settings.max_new_tokens, temperature=0)
    targets = [
        AskTarget("Ask via Envoy front door (full mesh)", layout.front_address),
        AskTarget("Generator/Generate direct", layout.replicas("generator")[0]),
    ]
    number = 0  # one sequence over every call of the section: no question is ever asked twice
    for target in targets:
        say(f"{target.label} ({target.address}) ...")
        async with aio_channel(target.address) as channel:
            gateway = gateway_pb2_grpc.GatewayStub(channel)
            generator = generator_pb2_grpc.GeneratorStub(channel)

            async def one(n: int, target: AskTarget = target, gateway=gateway, generator=generator) -> Outcome:  # type: ignore[no-untyped-def]
                started = time.perf_counter()
                if target.address == layout.front_address:
                    call = gateway.Ask(
                        gateway_pb2.AskRequest(question=question(n), knowledge_base=ASK_KB, parameters=parameters),
                        timeout=settings.call_timeout_s,
                    )
                else:
                    prompt = generator_pb2.GenerateRequest()
                    prompt.CopyFrom(prompts[n % len(TOPICS)])
                    prompt.messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question(n)))
                    prompt.parameters.CopyFrom(parameters)
                    call = generator.Generate(prompt, timeout=settings.call_timeout_s)
                outcome, cached = await stream_call(call, started)
                target.cached += cached
                return outcome

            # Warm-up: every hop's connections, and the model.
            warm = await drive(one, concurrency=1, max_calls=2, first_number=number)
            number += warm.calls
            for concurrency in settings.ask_concurrency:
                runs = []
                for attempt in range(settings.repeats):
                    run = await drive(
                        one, concurrency=concurrency, duration_s=settings.ask_seconds,
                        error_backoff_s=settings.error_backoff_s, first_number=number,
                    )
                    number += run.calls + concurrency  # workers may have taken numbers they did not use
                    failed = ", ".join(f"{code} {count}" for code, count in run.errors.most_common()) or "none"
                    say(f"    concurrency {concurrency} run {attempt + 1}: {run.ok} answers in {run.elapsed_s:.1f} s, "
                        f"failed: {failed}")
                    runs.append(run)
                    await asyncio.sleep(1.0)
                target.runs[concurrency] = runs

    ask, direct = targets
    section = Section(
        "Ask: time to first token and answers/s, through the mesh and on the generator directly",
        ["concurrency", "target", "TTFT p50 ms", "TTFT p99 ms", "answers/s", "failed calls by status / calls (all runs)"],
        notes=[f"Mesh path: client → Envoy front → gateway → Envoy internal → embedder, retriever, generator. "
               f"Direct: client → generator replica port. {settings.max_new_tokens} new tokens, greedy."],
    )
    for concurrency in settings.ask_concurrency:
        for target in targets:
            runs = target.runs[concurrency]
            section.rows.append([
                str(concurrency),
                "Ask (mesh)" if target is ask else "Generate (direct)",
                ms(median_of(runs, lambda r: r.p(0.5, first=True))),
                ms(median_of(runs, lambda r: r.p(0.99, first=True))),
                rate(median_of(runs, lambda r: r.rate(items=False))),
                errors_text(runs),
            ])
    overhead = []
    for concurrency in settings.ask_concurrency:
        a = median_of(ask.runs[concurrency], lambda r: r.p(0.5, first=True))
        d = median_of(direct.runs[concurrency], lambda r: r.p(0.5, first=True))
        overhead.append(f"{concurrency}: {ms(a - d)} ms")
    section.notes.append(f"Mesh cost, TTFT p50 of Ask minus TTFT p50 of Generate direct, by concurrency: {', '.join(overhead)}.")
    if ask.cached:
        section.notes.append(f"{ask.cached} answers came from the gateway's answer cache.")
    return section


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run each, short windows, 10k chunks only (a smoke test)")
    parser.add_argument("--repeats", type=int, help="runs per measurement (default 3)")
    parser.add_argument("--embed-seconds", type=float, help="window of each embedder run (default 2)")
    parser.add_argument("--ask-seconds", type=float, help="window of each Ask/Generate run (default 6)")
    parser.add_argument("--searches", type=int, help="Search calls per run (default 100)")
    parser.add_argument("--search-seconds", type=float, help="most seconds of each Search run (default 10)")
    parser.add_argument("--sizes", help="knowledge base sizes for Search, comma-separated (default 10000,100000)")
    parser.add_argument("--embed-concurrency", help="comma-separated (default 1,8,32)")
    parser.add_argument("--ask-concurrency", help="comma-separated (default 1,4,16,64)")
    parser.add_argument("--sections", help="comma-separated subset of embedder,retriever,ask (default all)")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings = Settings(repeats=1, embed_seconds=1.0, search_sizes=(10_000,), searches=50, ask_seconds=2.0)
    if args.repeats:
        settings.repeats = args.repeats
    if args.embed_seconds:
        settings.embed_seconds = args.embed_seconds
    if args.ask_seconds:
        settings.ask_seconds = args.ask_seconds
    if args.searches:
        settings.searches = args.searches
    if args.search_seconds:
        settings.search_seconds = args.search_seconds
    if args.sizes:
        settings.search_sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.embed_concurrency:
        settings.embed_concurrency = tuple(int(s) for s in args.embed_concurrency.split(","))
    if args.ask_concurrency:
        settings.ask_concurrency = tuple(int(s) for s in args.ask_concurrency.split(","))
    if args.sections:
        settings.sections = tuple(s.strip() for s in args.sections.split(","))
        unknown = set(settings.sections) - {"embedder", "retriever", "ask"}
        if unknown:
            parser.error(f"--sections: unknown {', '.join(sorted(unknown))}")
    return settings, args


async def run_suite(settings: Settings, console: Console) -> tuple[list[Section], float]:
    say = lambda text: console.print(text, highlight=False)  # noqa: E731
    sections: list[Section] = []
    reference: InProcessModel | None = None
    if "embedder" in settings.sections:
        say("loading the embedding model in-process (the reference), before the mesh starts ...")
        reference = InProcessModel(say)
    with tempfile.TemporaryDirectory(prefix="askmesh-bench-") as name:
        folder = Path(name)
        layout = MeshLayout.on_free_ports(folder)
        say("starting the local mesh ...")
        started = time.perf_counter()
        with LocalMesh(layout, env={"ASKMESH_EMBEDDER_BATCHING": "true"}, say=say) as mesh:
            startup_s = time.perf_counter() - started
            say(f"  mesh up in {startup_s:.0f} s")
            if reference is not None:
                sections.append(await embedder_section(settings, mesh, folder, reference, say))
                console.print(sections[-1].table())
            if "retriever" in settings.sections:
                sections.append(await retriever_section(settings, mesh, say))
                console.print(sections[-1].table())
            if "ask" in settings.sections:
                sections.append(await ask_section(settings, mesh, say))
                console.print(sections[-1].table())
    return sections, startup_s


def main(argv: Sequence[str] | None = None) -> None:
    settings, _ = parse_args(argv)
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the mesh and the extra embedder stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console()
    command = " ".join(["python -m benchmarks.suite", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    sections, startup_s = asyncio.run(run_suite(settings, console))
    total_s = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    console.rule("summary")
    for section in sections:
        console.print(section.table())
    lines = [
        "# Benchmark suite",
        "",
        f"Machine: {machine()}.",
        f"Command: `{command}` (`make bench` runs it with no options). Took {total_s / 60:.1f} min, the mesh "
        f"starting in {startup_s:.0f} s. 1-minute load average {load_before:.1f} before, {load_after:.1f} after "
        "(anything above 0 before is other work sharing the cores).",
        "The real local mesh: four service processes (embedder, retriever, generator with the bundled "
        "SmolLM2-135M-Instruct on llama.cpp, gateway), Envoy, Milvus Lite; the driver runs on the same machine.",
        "",
        "Method:",
        "",
        *settings.describe(),
        "",
        *[line for section in sections for line in section.markdown()],
    ]
    console.print(f"saved to {save('suite', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
