"""Reranking in the gateway, over real gRPC: real embedder (with its Reranker service), retriever
and generator servers, the gateway behind an Envoy front door. The reranker is the tiny local
cross-encoder the tests build, or a loopback server speaking TEI's /rerank (TEI cannot run here);
neither is a scripted stand-in for the embedder tier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from askmesh.runtime.server import ServiceDefinition, ServiceRunner
from askmesh.upstream import NO_RERANKER
from askmesh.v1 import common_pb2, embedder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, reranker_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.reranking import RerankingEngine
from services.embedder.servicer import EmbedderServicer, RerankerServicer
from tests.conftest import REPO_ROOT, FrontDoor, InProcessTiers, start_gateway, start_runner
from tests.fakes.tei_server import FakeTeiServer, TeiScript
from tests.rerank_models import build_tiny_cross_encoder

SHORT = common_pb2.GenerationParameters(max_new_tokens=4, temperature=0)
QUESTION = "How much may a hotel room in Paris cost per night?"
KNOWLEDGE_BASE = "reranked"


@dataclass
class Gateway:
    stub: gateway_pb2_grpc.GatewayStub
    front: FrontDoor
    channel: grpc.aio.Channel

    async def stop(self) -> None:
        await self.channel.close()
        await self.front.stop()


async def embedder_tier(embedding_engine: EmbeddingEngine, reranking: RerankingEngine) -> ServiceRunner:
    """The embedder tier's two services on the session's embedding model (already loaded), with
    `reranking` loaded and warmed before the replica says SERVING, as the tier's own main does."""
    embedder, reranker = EmbedderServicer(embedding_engine), RerankerServicer(reranking)

    def add_to_server(server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServicer_to_server(embedder, server)
        reranker_pb2_grpc.add_RerankerServicer_to_server(reranker, server)

    definition = ServiceDefinition(
        "embedder", ["askmesh.v1.Embedder", "askmesh.v1.Reranker"], add_to_server,
        start=reranking.start, close=reranking.close, servicers=[embedder, reranker],
    )
    return await start_runner(definition)


async def start(addresses: dict[str, str], **overrides: object) -> Gateway:
    front, channel = await start_gateway(addresses, **overrides)
    return Gateway(gateway_pb2_grpc.GatewayStub(channel), front, channel)


@pytest.fixture(scope="module")
def tei() -> Iterator[FakeTeiServer]:
    with FakeTeiServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_script(tei: FakeTeiServer) -> None:
    """Each test starts with the fake's default scoring and no failures."""
    tei.script = TeiScript()


@pytest.fixture(scope="module")
async def tei_gateway(upstreams: InProcessTiers, embedding_engine: EmbeddingEngine, tei: FakeTeiServer) -> AsyncIterator[Gateway]:
    """A gateway (rerank "auto", 4x over-fetch) whose embedder tier reranks with TEI; it holds the
    knowledge base every test asks."""
    reranking = RerankingEngine.configured(EmbedderSettings(reranker_url=tei.url, reranker_start_timeout_s=0))
    assert reranking is not None
    tier = await embedder_tier(embedding_engine, reranking)
    gateway = await start({**upstreams.addresses, "embedder": f"127.0.0.1:{tier.port}"}, rerank="auto", rerank_fetch_factor=4)
    documents = [
        gateway_pb2.Document(id=path.stem, title=path.stem, text=path.read_text())
        for path in sorted((REPO_ROOT / "samples").glob("*.md"))
    ]
    added = await gateway.stub.AddDocuments(
        gateway_pb2.AddDocumentsRequest(
            knowledge_base=KNOWLEDGE_BASE, documents=documents, chunking=common_pb2.ChunkingOptions(chunk_size=200, chunk_overlap=0)
        )
    )
    assert added.chunk_count >= 12
    yield gateway
    await gateway.stop()
    await tier.stop()


def ingestor_of(gateway: Gateway) -> str:
    assert gateway.front.ingestor is not None
    return f"127.0.0.1:{gateway.front.ingestor.port}"


async def ask(stub: gateway_pb2_grpc.GatewayStub, **fields: object) -> tuple[list[gateway_pb2.Citation], gateway_pb2.AskDone]:
    request = gateway_pb2.AskRequest(question=QUESTION, knowledge_base=KNOWLEDGE_BASE, parameters=SHORT, **fields)  # type: ignore[arg-type]
    messages = [message async for message in stub.Ask(request)]
    assert messages[-1].HasField("done"), messages[-1]
    (sources,) = [m.sources for m in messages if m.HasField("sources")]
    return list(sources.citations), messages[-1].done


async def ask_failure(stub: gateway_pb2_grpc.GatewayStub, **fields: object) -> tuple[grpc.StatusCode, str]:
    """The status and message an Ask ends with: its status, or its final error message."""
    request = gateway_pb2.AskRequest(question=QUESTION, knowledge_base=KNOWLEDGE_BASE, parameters=SHORT, **fields)  # type: ignore[arg-type]
    try:
        messages = [message async for message in stub.Ask(request)]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    assert messages[-1].HasField("error"), "the Ask was expected to fail"
    return grpc.StatusCode[messages[-1].error.code], messages[-1].error.message


async def test_reranking_keeps_the_rerankers_best_top_k_of_four_times_as_many_in_its_order(
    tei_gateway: Gateway, tei: FakeTeiServer
) -> None:
    # What the retriever ranks first for the question, without reranking.
    retrieved, plain_done = await ask(tei_gateway.stub, top_k=12, rerank=False)
    assert len(retrieved) == 12
    assert plain_done.timings.rerank_ms == 0 and not any(c.HasField("rerank_score") for c in retrieved)
    # The reranker's scores reverse the retriever's order: its last candidate is the best.
    position = {citation.text: index for index, citation in enumerate(retrieved)}
    tei.script.logit = lambda query, text: position.get(text, -1) / 4.0
    # A reranker that takes 300 ms: its time must show as rerank_ms, not as the gateway's own.
    tei.script.delay_s = 0.3
    tei.requests.clear()

    citations, done = await ask(tei_gateway.stub, top_k=3, rerank=True)

    (request,) = [r for r in tei.requests if r.path == "/rerank"]
    assert request.body is not None and request.body["query"] == QUESTION
    assert request.body["texts"] == [c.text for c in retrieved]  # 4 x top_k candidates, searched once
    expected = [retrieved[11], retrieved[10], retrieved[9]]
    assert [c.chunk_id for c in citations] == [c.chunk_id for c in expected]
    assert [c.number for c in citations] == [1, 2, 3]  # renumbered in the reranker's order
    assert [c.score for c in citations] == [c.score for c in expected]  # the retrieval score stays
    rerank_scores = [c.rerank_score for c in citations]
    assert rerank_scores == sorted(rerank_scores, reverse=True)
    assert rerank_scores[0] == pytest.approx(1 / (1 + np.exp(-11 / 4.0)), abs=1e-6)
    timings = done.timings
    assert timings.rerank_ms >= 300
    assert timings.gateway_overhead_ms < 300  # a wait on the embedder tier, not the gateway's own work
    assert timings.total_ms >= timings.embed_ms + timings.search_ms + timings.rerank_ms


async def test_questions_that_do_not_say_are_reranked_when_the_tier_has_a_reranker(tei_gateway: Gateway) -> None:
    citations, done = await ask(tei_gateway.stub, top_k=2)
    assert done.timings.rerank_ms > 0 and all(c.HasField("rerank_score") for c in citations)
    assert [c.number for c in citations] == [1, 2]


async def test_search_reranks_as_ask_does_in_every_search_mode(tei_gateway: Gateway) -> None:
    """Gateway/Search is Ask's retrieval: the gateway's default reranks it too, and a question
    may say no; the reranker reranks what the search mode found."""
    for mode in (common_pb2.SEARCH_MODE_DENSE, common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID):
        query = gateway_pb2.SearchQuery(question=QUESTION, knowledge_base=KNOWLEDGE_BASE, top_k=3, search_mode=mode)
        reranked = await tei_gateway.stub.Search(query)
        assert reranked.search_mode == mode and len(reranked.citations) == 3
        assert reranked.timings.rerank_ms > 0 and all(c.HasField("rerank_score") for c in reranked.citations)
        citations, _ = await ask(tei_gateway.stub, top_k=3, search_mode=mode)
        assert [c.chunk_id for c in citations] == [c.chunk_id for c in reranked.citations], mode
        query.rerank = False
        plain = await tei_gateway.stub.Search(query)
        assert plain.timings.rerank_ms == 0 and not any(c.HasField("rerank_score") for c in plain.citations)


async def test_a_tei_overloaded_or_failing_is_a_status_naming_the_tier_never_its_address(
    tei_gateway: Gateway, tei: FakeTeiServer
) -> None:
    # Straight to the gateway: the test's front door (unlike the mesh's) retries a stream refused
    # with RESOURCE_EXHAUSTED on another gateway replica, which would hide the first refusal.
    direct = grpc.aio.insecure_channel(f"127.0.0.1:{tei_gateway.front.gateway.port}")
    tei.script.fail_status, tei.script.fail_times = 429, 1
    try:
        code, message = await ask_failure(gateway_pb2_grpc.GatewayStub(direct), rerank=True)
    finally:
        await direct.close()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message == "embedder: the reranker (TEI) is overloaded (Model is overloaded); retry later"

    tei.script.fail_status, tei.script.fail_times = 424, 1
    code, message = await ask_failure(tei_gateway.stub, rerank=True)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message.startswith("embedder tier unavailable while reranking (UNAVAILABLE); ")
    assert tei.url.rsplit(":", 1)[1] not in message and "127.0.0.1" not in message

    # A TEI that takes fewer texts per request than the embedder sends (a configuration mismatch,
    # TEI's 422): not the asker's doing, so not INVALID_ARGUMENT.
    tei.script = TeiScript(max_client_batch_size=2)
    code, message = await ask_failure(tei_gateway.stub, rerank=True, top_k=1)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == (
        "rerank: the reranker refused the retrieved passages "
        "(texts: the reranker (TEI) refused them: batch size 4 > maximum allowed batch size 2)"
    )


async def test_the_tiny_local_cross_encoder_orders_the_sources(
    tei_gateway: Gateway, upstreams: InProcessTiers, embedding_engine: EmbeddingEngine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from sentence_transformers import CrossEncoder

    model = build_tiny_cross_encoder(tmp_path_factory.mktemp("gateway-reranker") / "tiny-cross-encoder")
    reranking = RerankingEngine.configured(EmbedderSettings(reranker_model_path=model))
    assert reranking is not None
    tier = await embedder_tier(embedding_engine, reranking)
    gateway = await start(
        {**upstreams.addresses, "embedder": f"127.0.0.1:{tier.port}", "ingestor": ingestor_of(tei_gateway)},
        rerank="on", rerank_fetch_factor=4,
    )
    try:
        retrieved, _ = await ask(gateway.stub, top_k=12, rerank=False)
        predicted = CrossEncoder(str(model), local_files_only=True, device="cpu").predict(
            [(QUESTION, c.text) for c in retrieved], show_progress_bar=False
        )
        best = list(np.argsort(-predicted, kind="stable")[:3])

        citations, done = await ask(gateway.stub, top_k=3)  # "on": reranked without asking

        assert [c.chunk_id for c in citations] == [retrieved[i].chunk_id for i in best]
        assert [c.rerank_score for c in citations] == pytest.approx([float(predicted[i]) for i in best], abs=1e-6)
        assert done.timings.rerank_ms > 0
    finally:
        await gateway.stop()
        await tier.stop()


async def test_asking_for_a_reranker_the_mesh_does_not_have_is_failed_precondition(
    tei_gateway: Gateway, upstreams: InProcessTiers
) -> None:
    # The module's plain embedder tier serves no Reranker service at all (UNIMPLEMENTED), as an
    # embedder from before rerankers; "auto" then leaves questions unreranked.
    gateway = await start({**upstreams.addresses, "ingestor": ingestor_of(tei_gateway)}, rerank="auto")
    try:
        citations, done = await ask(gateway.stub, top_k=2)
        assert done.timings.rerank_ms == 0 and not any(c.HasField("rerank_score") for c in citations)
        code, message = await ask_failure(gateway.stub, rerank=True)
        assert (code, message) == (grpc.StatusCode.FAILED_PRECONDITION, NO_RERANKER)
    finally:
        await gateway.stop()


async def test_the_over_fetch_is_capped_and_never_below_top_k() -> None:
    from services.gateway.config import GatewaySettings
    from services.gateway.engine import GatewayEngine

    engines = [
        GatewayEngine(GatewaySettings(rerank_fetch_factor=4, rerank_max_candidates=50)),
        GatewayEngine(GatewaySettings(rerank_fetch_factor=4, rerank_max_candidates=3)),
        GatewayEngine(GatewaySettings(rerank="on")),
    ]
    engine, small, on = engines
    try:
        assert [engine.fetch_count(k, True) for k in (1, 5, 12, 20)] == [4, 20, 48, 50]
        assert engine.fetch_count(5, False) == 5
        assert small.fetch_count(5, True) == 5
        assert engine.rerank_by_default is False  # "auto" until start() asks the embedder tier
        assert on.rerank_by_default is True
    finally:
        for each in engines:
            await each.close()

