"""Prometheus metrics: real services in this process, real calls, /metrics scraped over HTTP.

The metrics are process-wide and other tests in the session move them too, so every check
compares a scrape taken before with one taken after. Nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from askmesh.runtime.config import ServiceSettings
from askmesh.runtime.server import ServiceDefinition, ServiceRunner
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
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from services.gateway.main import build as build_gateway
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine
from services.retriever.servicer import RetrieverServicer
from tests.fakes.generators import GatedBackend
from tests.conftest import InProcessTiers, gateway_settings, start_in_process, start_ingestor

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> Samples:
    return await asyncio.to_thread(_scrape, port)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it has not been written yet (a labelled metric appears on first use)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def _nothing() -> None:
    return None


async def start_with_metrics(
    name: str,
    grpc_service: str,
    add_to_server: Callable[[grpc.aio.Server], None],
    servicer: object,
    *,
    start: Callable[[], Awaitable[None]] = _nothing,
    close: Callable[[], Awaitable[None]] = _nothing,
    grace_period_s: float = 1,
) -> ServiceRunner:
    """Like conftest's start_in_process, with a metrics port and the servicer's calls tracked."""
    definition = ServiceDefinition(name, [grpc_service], add_to_server, start=start, close=close, servicers=[servicer])
    settings = ServiceSettings(port=1, host="127.0.0.1", grace_period_s=grace_period_s, metrics_port=free_port())
    runner = ServiceRunner(definition, settings)
    runner.settings.port = 0  # any free port
    await runner.start()
    assert runner.warm_up is not None
    await runner.warm_up
    return runner


def generate_request(content: str, **parameters: object) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)],
        parameters=common_pb2.GenerationParameters(**parameters),  # type: ignore[arg-type]
    )


# -- calls in flight, serving, drain -----------------------------------------------------------


async def test_a_stream_is_in_flight_while_it_runs_and_metrics_stay_up_through_the_drain() -> None:
    name = "generator-drain"
    backend = GatedBackend()
    engine = GenerationEngine(GeneratorSettings(), backend=backend)
    await engine.start()
    servicer = GeneratorServicer(engine)
    at_cleanup: Samples = {}

    async def close() -> None:  # after the drain, before the metrics server closes
        assert runner.metrics is not None
        at_cleanup.update(await scrape(runner.metrics.port))

    runner = await start_with_metrics(
        name,
        "askmesh.v1.Generator",
        lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s),
        servicer,
        close=close,
        grace_period_s=60,
    )
    assert runner.metrics is not None
    port = runner.metrics.port
    in_flight = {"service": name, "method": "Generate"}
    try:
        before = await scrape(port)
        assert value(before, "askmesh_calls_in_flight", **in_flight) == 0
        assert value(before, "askmesh_serving", service=name) == 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            call = generator_pb2_grpc.GeneratorStub(channel).Generate(generate_request("Say x."))
            kinds = []
            while not kinds or kinds[-1] == "queued" or kinds[-1] == "started":
                kinds.append((await call.read()).WhichOneof("event"))
            assert kinds == ["queued", "started", "delta"]

            running = await scrape(port)
            assert value(running, "askmesh_calls_in_flight", **in_flight) == 1
            assert grew(before, running, "askmesh_generations_running", service="generator") == 1

            stopping = asyncio.ensure_future(runner.stop())
            draining = await scrape(port)
            for _ in range(3000):
                if value(draining, "askmesh_serving", service=name) == 0:
                    break
                await asyncio.sleep(0.01)
                draining = await scrape(port)
            assert value(draining, "askmesh_serving", service=name) == 0
            assert value(draining, "askmesh_calls_in_flight", **in_flight) == 1  # the drain waits for it

            backend.release.set()
            rest = []
            while (message := await call.read()) is not grpc.aio.EOF:
                rest.append(message)
            assert rest[-1].WhichOneof("event") == "done"
            assert await call.code() == grpc.StatusCode.OK
            await stopping
    finally:
        backend.release.set()
        if runner.metrics is not None:
            await runner.stop()
        await engine.close()

    assert value(at_cleanup, "askmesh_calls_in_flight", **in_flight) == 0
    assert value(at_cleanup, "askmesh_drain_seconds", service=name) > 0
    assert grew(before, at_cleanup, "askmesh_calls_total", code="OK", **in_flight) == 1
    assert grew(before, at_cleanup, "askmesh_call_duration_seconds_count", **in_flight) == 1
    assert grew(before, at_cleanup, "askmesh_generation_time_to_first_token_seconds_count", service="generator") == 1
    assert runner.metrics is None
    with pytest.raises(OSError):  # closed after the cleanup
        await scrape(port)


# -- generator -----------------------------------------------------------------------------------


async def test_a_generation_records_its_time_to_first_token_and_tokens_per_second(
    generation_engine: GenerationEngine,
) -> None:
    servicer = GeneratorServicer(generation_engine)
    runner = await start_with_metrics(
        "generator",
        "askmesh.v1.Generator",
        lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s),
        servicer,
    )
    assert runner.metrics is not None
    try:
        before = await scrape(runner.metrics.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            request = generate_request(
                "Count from one to twenty, separated by commas.", max_new_tokens=16, temperature=0
            )
            messages = [message async for message in stub.Generate(request)]
        after = await scrape(runner.metrics.port)
    finally:
        await runner.stop()

    done = messages[-1].done
    assert done.usage.completion_tokens > 1
    ttft = "askmesh_generation_time_to_first_token_seconds"
    assert grew(before, after, f"{ttft}_count", service="generator") == 1
    assert grew(before, after, f"{ttft}_sum", service="generator") == pytest.approx(
        done.timings.time_to_first_token_ms / 1000, rel=0.05
    )
    speed = "askmesh_generation_tokens_per_second"
    assert grew(before, after, f"{speed}_count", service="generator") == 1
    assert grew(before, after, f"{speed}_sum", service="generator") == pytest.approx(done.timings.tokens_per_second)
    labels = {"service": "generator", "method": "Generate"}
    assert grew(before, after, "askmesh_calls_total", code="OK", **labels) == 1
    assert value(after, "askmesh_calls_in_flight", **labels) == 0
    assert grew(before, after, "askmesh_generations_running", service="generator") == 0
    assert grew(before, after, "askmesh_generation_queue_length", service="generator") == 0


# -- embedder ------------------------------------------------------------------------------------


async def test_concurrent_embed_calls_ride_in_a_batch_of_several_texts_after_a_timed_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="askmesh.server")
    # A batch starts when it holds 8 texts (or a second after its first call): the 8 calls ride together.
    engine = EmbeddingEngine(EmbedderSettings(max_batch_texts=8, max_wait_ms=1000))
    servicer = EmbedderServicer(engine)
    runner = await start_with_metrics(
        "embedder",
        "askmesh.v1.Embedder",
        lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, s),
        servicer,
        start=engine.start,
        close=engine.close,
    )
    assert runner.metrics is not None
    port = runner.metrics.port
    try:
        before = await scrape(port)
        tokens_before = engine.stats.tokens_encoded
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            texts = [f"text number {i} about the travel policy" for i in range(8)]
            replies = await asyncio.gather(*(stub.Embed(embedder_pb2.EmbedRequest(texts=[text])) for text in texts))
        after = await scrape(port)
    finally:
        await runner.stop()

    assert all(len(reply.embeddings) == 1 for reply in replies)
    assert f"[METRICS] embedder on http://127.0.0.1:{port}/metrics" in caplog.text
    size = "askmesh_embed_batch_size"
    batches = grew(before, after, f"{size}_count", service="embedder")
    assert grew(before, after, f"{size}_sum", service="embedder") == 8
    assert 1 <= batches < 8  # fewer batches than calls
    assert (f"{size}_bucket", frozenset({"service": "embedder", "le": "1.0"}.items())) in after
    single_text_batches = grew(before, after, f"{size}_bucket", service="embedder", le="1.0")
    assert batches - single_text_batches >= 1  # at least one batch held more than one text
    assert grew(before, after, "askmesh_embed_batch_tokens_sum", service="embedder") == (
        engine.stats.tokens_encoded - tokens_before
    )
    assert value(after, "askmesh_embed_queue_length", service="embedder") == value(
        before, "askmesh_embed_queue_length", service="embedder"
    )
    assert grew(before, after, "askmesh_calls_total", service="embedder", method="Embed", code="OK") == 8
    assert value(after, "askmesh_model_load_seconds", service="embedder") > 0
    assert value(after, "askmesh_serving", service="embedder") == 1


# -- retriever -----------------------------------------------------------------------------------


def unit_vector(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=8)
    return (vector / np.linalg.norm(vector)).tolist()


async def test_every_search_is_timed_and_calls_are_counted_by_status(tmp_path: Path) -> None:
    engine = RetrievalEngine(RetrieverSettings(milvus_uri=str(tmp_path / "milvus.db")))
    servicer = RetrieverServicer(engine)
    runner = await start_with_metrics(
        "retriever",
        "askmesh.v1.Retriever",
        lambda s: retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, s),
        servicer,
        start=engine.start,
        close=engine.close,
    )
    assert runner.metrics is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            chunks = [
                retriever_pb2.VectorChunk(
                    chunk=common_pb2.Chunk(id=f"d-{i}", document_id="d", chunk_index=i, text=f"chunk {i}"),
                    vector=unit_vector(i),
                )
                for i in range(3)
            ]
            await stub.Upsert(
                retriever_pb2.UpsertRequest(
                    knowledge_base="kb", chunks=chunks, create_if_missing=True, embedding_model="m"
                )
            )
            before = await scrape(runner.metrics.port)
            for seed in (0, 1):
                found = await stub.Search(
                    retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit_vector(seed), top_k=2)
                )
                assert len(found.results) == 2
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Search(retriever_pb2.SearchRequest(knowledge_base="missing", vector=unit_vector(0)))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            after = await scrape(runner.metrics.port)
    finally:
        await runner.stop()

    assert grew(before, after, "askmesh_search_latency_seconds_count", service="retriever") == 2
    assert grew(before, after, "askmesh_search_latency_seconds_sum", service="retriever") > 0
    labels = {"service": "retriever", "method": "Search"}
    assert grew(before, after, "askmesh_calls_total", code="OK", **labels) == 2
    assert grew(before, after, "askmesh_calls_total", code="NOT_FOUND", **labels) == 1
    assert grew(before, after, "askmesh_call_duration_seconds_count", **labels) == 3
    assert value(after, "askmesh_model_load_seconds", service="retriever") > 0


# -- gateway -------------------------------------------------------------------------------------


async def test_an_ask_records_the_gateways_time_to_first_token(upstreams: InProcessTiers) -> None:
    ingestor = await start_ingestor(upstreams.addresses, ingest_workers=0)
    settings = ServiceSettings(port=1, grace_period_s=1, metrics_port=free_port())
    addresses = {**upstreams.addresses, "ingestor": f"127.0.0.1:{ingestor.port}"}
    runner = ServiceRunner(build_gateway(gateway_settings(addresses)), settings)
    runner.settings.port = 0
    await runner.start()
    assert runner.warm_up is not None and runner.metrics is not None
    await runner.warm_up
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            document = gateway_pb2.Document(
                id="trains", title="Trains", text="Trains are preferred for trips under four hours."
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestor.port}") as documents:
                request = gateway_pb2.AddDocumentsRequest(knowledge_base="metrics", documents=[document])
                await gateway_pb2_grpc.GatewayStub(documents).AddDocuments(request)
            before = await scrape(runner.metrics.port)
            question = gateway_pb2.AskRequest(
                knowledge_base="metrics",
                question="When are trains preferred?",
                parameters=common_pb2.GenerationParameters(max_new_tokens=8, temperature=0),
            )
            answer = [message async for message in stub.Ask(question)]
            after = await scrape(runner.metrics.port)
    finally:
        await runner.stop()
        await ingestor.stop()

    assert any(message.WhichOneof("event") == "delta" for message in answer)
    done = answer[-1].done
    ttft = "askmesh_ask_time_to_first_token_seconds"
    assert grew(before, after, f"{ttft}_count", service="gateway") == 1
    assert grew(before, after, f"{ttft}_sum", service="gateway") == pytest.approx(
        done.timings.time_to_first_token_ms / 1000, rel=0.05
    )
    assert grew(before, after, "askmesh_calls_total", service="gateway", method="Ask", code="OK") == 1
    # One process: the gateway's port shows the tiers' metrics too, here the search it caused.
    assert grew(before, after, "askmesh_search_latency_seconds_count", service="retriever") >= 1


# -- configuration -------------------------------------------------------------------------------


async def test_metrics_port_zero_starts_no_metrics_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="askmesh.server")
    runner = await start_in_process("plain", "askmesh.v1.Nothing", lambda s: None)
    try:
        assert runner.settings.metrics_port == 0
        assert runner.metrics is None
    finally:
        await runner.stop()
    assert "[METRICS]" not in caplog.text


def test_the_metrics_port_comes_from_the_services_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASKMESH_GENERATOR_METRICS_PORT", "9464")
    assert GeneratorSettings().metrics_port == 9464
    assert EmbedderSettings().metrics_port == 0  # each service has its own
    for bad in (-1, 65536):
        with pytest.raises(ValidationError, match="metrics_port"):
            ServiceSettings(port=50061, metrics_port=bad)
    with pytest.raises(ValidationError, match="metrics_port: 50061 is the gRPC port too"):
        ServiceSettings(port=50061, metrics_port=50061)
