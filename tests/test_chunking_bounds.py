"""The chunking bomb (a huge AddDocuments with an overlap of nearly the chunk size) against the
real in-process ingestor: refused, or bounded and cut off the event loop, so the ingestor keeps
answering its health checks meanwhile."""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh import tiers
from askmesh.runtime.errors import InvalidArgument
from askmesh.runtime.server import ServiceRunner
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from services.ingestor.knowledge import resolve_chunking
from tests.conftest import InProcessTiers, start_ingestor


def resolved(size: int, overlap: int | None, default_overlap: int = 150) -> tuple[int, int]:
    options = common_pb2.ChunkingOptions(chunk_size=size)
    if overlap is not None:
        options.chunk_overlap = overlap
    return resolve_chunking(options, default_size=600, default_overlap=default_overlap, max_size=8000, field="header.chunking")


def test_an_overlap_over_half_the_chunk_size_is_refused_naming_the_field() -> None:
    assert resolved(8000, 4000) == (8000, 4000)
    with pytest.raises(InvalidArgument) as raised:
        resolved(8000, 7999)
    assert raised.value.message == "header.chunking.chunk_overlap: 7999 is more than half of chunk_size 8000 (4000)"
    with pytest.raises(InvalidArgument, match="must be smaller than chunk_size"):
        resolved(100, 100)


def test_a_stored_default_overlap_over_half_is_capped_not_refused() -> None:
    # A knowledge base created before the limit (100 / 90) keeps taking documents.
    assert resolved(100, None, default_overlap=90) == (100, 50)


@pytest.fixture
async def ingestor(upstreams: InProcessTiers, tmp_path: Path) -> AsyncIterator[ServiceRunner]:
    # Its own store, so nothing of other tests' knowledge bases is seen.
    runner = await start_ingestor(upstreams.addresses, max_chunks_per_request=5, store_url=str(tmp_path / "bounds.sqlite3"))
    yield runner
    await runner.stop()


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value.code(), raised.value.details() or ""


async def test_add_documents_over_the_chunk_limit_is_refused_before_anything_is_stored(ingestor: ServiceRunner) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestor.port}") as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        kb = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
        small = common_pb2.ChunkingOptions(chunk_size=50, chunk_overlap=0)
        one_per_chunk = " ".join(f"Sentence {i} fills a chunk alone." for i in range(3))  # 3 chunks
        expected = (
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents: the documents make more than 5 chunks, the limit per request (max_chunks_per_request)",
        )
        # One document of 6 chunks; then two of 3: the limit counts the whole request.
        too_long = gateway_pb2.AddDocumentsRequest(
            knowledge_base="bounded", documents=[gateway_pb2.Document(id="d", text=one_per_chunk + " " + one_per_chunk)], chunking=small
        )
        assert await refusal(gateway.AddDocuments(too_long)) == expected
        two = gateway_pb2.AddDocumentsRequest(
            knowledge_base="bounded",
            documents=[gateway_pb2.Document(id="a", text=one_per_chunk), gateway_pb2.Document(id="b", text=one_per_chunk)],
            chunking=small,
        )
        assert await refusal(gateway.AddDocuments(two)) == expected
        # Nothing stored: not even the knowledge base the request would have created.
        listed = await kb.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest())
        assert [k.name for k in listed.knowledge_bases] == []
        # The bomb's overlap is refused outright, naming the field.
        bomb = gateway_pb2.AddDocumentsRequest(
            knowledge_base="bounded", documents=[gateway_pb2.Document(id="d", text="A. " * 10)],
            chunking=common_pb2.ChunkingOptions(chunk_size=8000, chunk_overlap=7999),
        )
        assert await refusal(gateway.AddDocuments(bomb)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "chunking.chunk_overlap: 7999 is more than half of chunk_size 8000 (4000)"
        )
        # Within the limit it is stored.
        one = gateway_pb2.AddDocumentsRequest(knowledge_base="bounded", documents=[gateway_pb2.Document(id="a", text=one_per_chunk)], chunking=small)
        assert (await gateway.AddDocuments(one)).chunk_count == 3


def health_latencies(port: int, checks: int, every_s: float) -> list[float]:
    """Health checks from a thread of their own with a blocking channel: the ingestor shares this
    process's event loop with the test, and a check sent from that loop could not even start
    while the loop was blocked, so it would never see the block."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=tiers.INGESTOR.health_service)
        latencies = []
        for _ in range(checks):
            started = time.perf_counter()
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            latencies.append(time.perf_counter() - started)
            time.sleep(every_s)
        return latencies


async def test_health_answers_while_a_huge_add_documents_is_being_chunked(upstreams: InProcessTiers, tmp_path: Path) -> None:
    runner = await start_ingestor(upstreams.addresses, store_url=str(tmp_path / "huge.sqlite3"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            gateway = gateway_pb2_grpc.GatewayStub(channel)
            await asyncio.to_thread(health_latencies, runner.port, 1, 0)  # connected
            # 2 MB of the shortest sentences at the most overlap allowed: the costliest legal
            # text to cut (about a second of CPU here), within max_chunks_per_request.
            huge = gateway_pb2.AddDocumentsRequest(
                knowledge_base="huge", documents=[gateway_pb2.Document(id="huge", text="A. " * 666_666)],
                chunking=common_pb2.ChunkingOptions(chunk_size=8000, chunk_overlap=4000),
            )
            # This process also holds the in-process embedder, retriever and generator (torch and
            # transformers: some 0.5M objects that the ingestor's own process, some 60k, does not
            # have). The chunker's allocations set off full garbage collections, and each would
            # walk that heap for about 300 ms with the GIL held: it is set aside while the checks
            # run, so that they measure the ingestor, not this test's process.
            gc.freeze()
            try:
                call = gateway.AddDocuments(huge, timeout=120)
                started = time.perf_counter()
                latencies = await asyncio.to_thread(health_latencies, runner.port, 20, 0.05)
                elapsed = time.perf_counter() - started
                still_running = not call.done()
                call.cancel()
            finally:
                gc.unfreeze()
            print(
                f"health during chunking: {len(latencies)} checks in {elapsed:.2f} s, max {max(latencies) * 1000:.1f} ms,"
                f" median {statistics.median(latencies) * 1000:.1f} ms"
            )
            assert still_running, "the request ended before the checks did: they measured nothing"
            # The machine's cores are shared: a bound with room; the numbers are printed.
            assert max(latencies) < 0.2, latencies
    finally:
        await runner.stop()
