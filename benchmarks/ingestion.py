"""Ingestion throughput and Ask latency during ingestion, on the real local mesh.

    .venv/bin/python -m benchmarks.ingestion [--chunks 2000] [--asks 8]

Measures, on this machine:
- the embedding model's raw throughput in-process (sentence-transformers, batches of 32), on the
  same chunk texts the ingestion produces;
- ingestion end to end through the mesh (upload -> parse -> chunk -> embed through Envoy ->
  upsert into Milvus Lite -> finalize), in chunks per second;
- Ask latency (time to first token and total, 32 new tokens, greedy) with the mesh idle, and
  again while a large file is being ingested.
Prints a table and writes benchmarks/results/<date>-ingestion.md.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import grpc
from rich.console import Console

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import common_pb2, gateway_pb2, ingestion_pb2, ingestion_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from benchmarks.common import machine, markdown_table, median, percentile, rich_table, save

# Different questions each time: llama.cpp reuses the KV cache of a repeated prompt, which
# would make repeated questions look faster than real traffic.
QUESTIONS = [f"Which pallet holds crate {n} and how often is it checked?" for n in range(7, 10_000, 97)]
CHUNK_SIZE = 400


def document_text(chunks: int) -> bytes:
    sentences = [
        f"Crate {i} sits on pallet {i % 97} in aisle {i % 13}; inspector {i % 7} checks it every {1 + i % 5} days."
        for i in range(chunks * 4)
    ]
    return " ".join(sentences).encode()


def raw_embedding_rate(texts: list[str]) -> float:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from services.embedder.config import bundled_model_path

    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    model.encode(texts[:32], batch_size=32)
    started = time.perf_counter()
    model.encode(texts, batch_size=32, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - started)


def ask_once(channel: grpc.Channel, knowledge_base: str, number: int) -> tuple[float, float]:
    request = gateway_pb2.AskRequest(
        question=QUESTIONS[number % len(QUESTIONS)], knowledge_base=knowledge_base,
        parameters=common_pb2.GenerationParameters(max_new_tokens=32, temperature=0),
    )
    started = time.perf_counter()
    first = None
    for message in client.ask(channel, request, 300):
        if message.HasField("delta") and first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return first or total, total


def upload(channel: grpc.Channel, knowledge_base: str, name: str, data: bytes) -> ingestion_pb2.Task:
    header = ingestion_pb2.UploadFileHeader(knowledge_base=knowledge_base, file_name=name)
    return ingestion_pb2_grpc.IngestionStub(channel).UploadFile(client.upload_requests(header, io.BytesIO(data)))


def wait(channel: grpc.Channel, task_id: str) -> ingestion_pb2.Task:
    return list(client.watch_task(channel, task_id))[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=2000, help="approximate chunks in the large file")
    parser.add_argument("--asks", type=int, default=8, help="questions per phase")
    args = parser.parse_args()
    console = Console()

    data = document_text(args.chunks)
    from services.ingestor.chunking import chunk_text

    texts = chunk_text(data.decode(), CHUNK_SIZE, 0)
    console.print(f"{len(texts)} chunks of up to {CHUNK_SIZE} characters; measuring the model in-process ...")
    raw_rate = raw_embedding_rate(texts)

    with tempfile.TemporaryDirectory() as folder:
        layout = MeshLayout.on_free_ports(Path(folder))
        with LocalMesh(layout, say=lambda _: None), client.connect(layout.front_address) as channel:
            kb = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
            for name in ("bench", "askme"):
                kb.CreateKnowledgeBase(
                    knowledge_pb2.CreateKnowledgeBaseRequest(name=name, chunking=common_pb2.ChunkingOptions(chunk_size=CHUNK_SIZE, chunk_overlap=0))
                )
            wait(channel, upload(channel, "askme", "small.txt", document_text(50)).id)

            console.print("ingesting the large file alone ...")
            started = time.perf_counter()
            task = upload(channel, "bench", "large.txt", data)
            final = wait(channel, task.id)
            ingest_seconds = time.perf_counter() - started
            assert final.state == ingestion_pb2.TASK_STATE_SUCCEEDED, final.error
            ingest_rate = final.progress.chunks_total / ingest_seconds

            console.print("asking with the mesh idle ...")
            ask_once(channel, "askme", 0)  # warm every hop
            idle = [ask_once(channel, "askme", n) for n in range(1, args.asks + 1)]

            console.print("asking while the large file is ingested again (a new version) ...")
            busy_task = upload(channel, "bench", "large.txt", data.replace(b"checks", b"inspects"))
            busy: list[tuple[float, float]] = []
            while ingestion_pb2_grpc.IngestionStub(channel).GetTask(ingestion_pb2.GetTaskRequest(id=busy_task.id)).stage < ingestion_pb2.TASK_STAGE_EMBEDDING:
                time.sleep(0.05)
            while len(busy) < args.asks:
                status = ingestion_pb2_grpc.IngestionStub(channel).GetTask(ingestion_pb2.GetTaskRequest(id=busy_task.id))
                if status.state != ingestion_pb2.TASK_STATE_RUNNING:
                    break
                busy.append(ask_once(channel, "askme", 1 + len(busy)))
            wait(channel, busy_task.id)

    idle_ttft, idle_total = [t for t, _ in idle], [t for _, t in idle]
    busy_ttft, busy_total = [t for t, _ in busy], [t for _, t in busy]
    rows = [
        ("embedding model in-process (batch 32)", f"{raw_rate:.0f} chunks/s", ""),
        ("ingestion end to end through the mesh", f"{ingest_rate:.0f} chunks/s", f"{ingest_rate / raw_rate:.0%} of the model's raw rate ({final.progress.chunks_total} chunks, {ingest_seconds:.1f} s)"),
        ("Ask, idle: time to first token p50 / p99", f"{median(idle_ttft) * 1000:.0f} / {percentile(idle_ttft, 0.99) * 1000:.0f} ms", f"{len(idle)} questions"),
        ("Ask, idle: total p50 / p99", f"{median(idle_total) * 1000:.0f} / {percentile(idle_total, 0.99) * 1000:.0f} ms", "32 new tokens"),
        ("Ask, during ingestion: time to first token p50 / p99", f"{median(busy_ttft) * 1000:.0f} / {percentile(busy_ttft, 0.99) * 1000:.0f} ms", f"{len(busy)} questions, {median(busy_ttft) / median(idle_ttft):.2f}x idle p50"),
        ("Ask, during ingestion: total p50 / p99", f"{median(busy_total) * 1000:.0f} / {percentile(busy_total, 0.99) * 1000:.0f} ms", f"{median(busy_total) / median(idle_total):.2f}x idle p50"),
    ]
    columns = ("measure", "value", "notes")
    console.print(rich_table("askmesh ingestion benchmark", columns, rows))
    lines = [
        "# Ingestion benchmark",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python -m benchmarks.ingestion --chunks {args.chunks} --asks {args.asks}`.",
        "Real local mesh (five service processes: ingestion on its own ingestor; Envoy, Milvus Lite), one ingestion worker, chunks of",
        f"{CHUNK_SIZE} characters, questions to a second small knowledge base, 32 new tokens, greedy.",
        "",
        *markdown_table(columns, rows),
        "",
    ]
    console.print(f"saved to {save('ingestion', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
