"""Admission before work: the gateway asks a generator for a place in line before it embeds or
searches, so a question that will not be served costs neither; a question let in is told where
it stands while it waits. Real embedder and retriever servers (counting their calls), a real
generator servicer and engine whose backend the test holds (GatedBackend), the real gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from askmesh.runtime.errors import retry_after_of
from askmesh.runtime.server import ServiceRunner
from askmesh.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine
from services.retriever.servicer import RetrieverServicer
from tests.conftest import REPO_ROOT, start_gateway, start_in_process, until
from tests.fakes.generators import GatedBackend


class CountingEmbedder(EmbedderServicer):
    def __init__(self, engine: EmbeddingEngine) -> None:
        super().__init__(engine)
        self.embeds = 0

    async def Embed(self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> embedder_pb2.EmbedResponse:
        self.embeds += 1
        return await super().Embed(request, context)


class CountingRetriever(RetrieverServicer):
    def __init__(self, engine: RetrievalEngine) -> None:
        super().__init__(engine)
        self.searches = 0

    async def Search(self, request: retriever_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> retriever_pb2.SearchResponse:
        self.searches += 1
        return await super().Search(request, context)


@dataclass
class Mesh:
    gateway: gateway_pb2_grpc.GatewayStub
    embedder: CountingEmbedder
    retriever: CountingRetriever
    generator: GenerationEngine
    backend: GatedBackend

    def work(self) -> tuple[int, int]:
        return self.embedder.embeds, self.retriever.searches


@pytest.fixture
async def mesh(embedding_engine: EmbeddingEngine, tmp_path: Path) -> AsyncIterator[Mesh]:
    retrieval = RetrievalEngine(RetrieverSettings(milvus_uri=str(tmp_path / "milvus.db")))
    await retrieval.start()
    backend = GatedBackend()
    # One slot; the line's first guess is 2 s a generation, so a newcomer behind one running
    # and one waiting expects 4 s, behind two waiting 6 s: more than the 5 s it may wait.
    generation = GenerationEngine(GeneratorSettings(max_concurrent_generations=1, max_queue_wait_s=5), backend=backend)
    await generation.start()
    embedder, retriever = CountingEmbedder(embedding_engine), CountingRetriever(retrieval)
    generator = GeneratorServicer(generation)
    runners: list[ServiceRunner] = [
        await start_in_process("embedder", "askmesh.v1.Embedder", lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(embedder, s)),
        await start_in_process("retriever", "askmesh.v1.Retriever", lambda s: retriever_pb2_grpc.add_RetrieverServicer_to_server(retriever, s)),
        await start_in_process("generator", "askmesh.v1.Generator", lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(generator, s)),
    ]
    addresses = {name: f"127.0.0.1:{runner.port}" for name, runner in zip(("embedder", "retriever", "generator"), runners)}
    gateway_runner, channel = await start_gateway({**addresses, "data": str(tmp_path)}, ingest_workers=0)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    text = (REPO_ROOT / "samples" / "travel-policy.md").read_text()
    await stub.AddDocuments(
        gateway_pb2.AddDocumentsRequest(knowledge_base="policies", documents=[gateway_pb2.Document(id="travel", title="Travel", text=text)])
    )
    yield Mesh(stub, embedder, retriever, generation, backend)
    backend.release.set()
    await channel.close()
    await gateway_runner.stop()
    for runner in runners:
        await runner.stop()
    await generation.close()
    await retrieval.close()


def question(text: str) -> gateway_pb2.AskRequest:
    return gateway_pb2.AskRequest(question=text, knowledge_base="policies", parameters=common_pb2.GenerationParameters(max_new_tokens=4))


async def messages_until(call: grpc.aio.UnaryStreamCall, kind: str) -> list[gateway_pb2.AskResponse]:
    """Reads an Ask stream up to the first message of `kind`."""
    received = []
    while (message := await call.read()) is not grpc.aio.EOF:
        received.append(message)
        if message.WhichOneof("event") == kind:
            return received
    raise AssertionError(f"the stream ended without {kind}: {[m.WhichOneof('event') for m in received]}")


async def rest_of(call: grpc.aio.UnaryStreamCall) -> list[gateway_pb2.AskResponse]:
    received = []
    while (message := await call.read()) is not grpc.aio.EOF:
        received.append(message)
    return received


async def test_a_question_that_would_wait_too_long_is_refused_before_it_costs_an_embedding_or_a_search(mesh: Mesh) -> None:
    embeds, searches = mesh.work()  # the documents' own embeddings
    holder = mesh.gateway.Ask(question("Who approves business class?"))
    assert [m.WhichOneof("event") for m in await messages_until(holder, "delta")] == ["sources", "delta"]
    second = mesh.gateway.Ask(question("What is the hotel limit in Paris?"))
    waiting = await second.read()
    assert waiting.queued.position == 1 and waiting.queued.estimated_wait_ms > 0
    third = mesh.gateway.Ask(question("How are meals paid?"))
    assert (await third.read()).queued.position == 2
    ready = (embeds + 3, searches + 3)
    await until(lambda: mesh.work() == ready, "the waiting questions have their sources ready")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rest_of(mesh.gateway.Ask(question("Can I take a taxi?")))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "try again in about" in refused.value.details()
    assert (retry_after_of(refused.value) or 0) > 0
    # A deadline shorter than the wait is refused at once too, not left to run out.
    with pytest.raises(grpc.aio.AioRpcError) as too_soon:
        await rest_of(mesh.gateway.Ask(question("Can I fly first class?"), timeout=3))
    assert too_soon.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert mesh.work() == ready  # the refused questions were neither embedded nor searched
    assert mesh.backend.started == 1

    mesh.backend.release.set()
    for call in (holder, second, third):
        assert (await rest_of(call))[-1].HasField("done")
    asked = [prompt[-1]["content"] for prompt in mesh.backend.prompts]
    assert asked == ["Who approves business class?", "What is the hotel limit in Paris?", "How are meals paid?"]


async def test_a_waiting_question_is_told_when_it_moves_up_and_gets_its_sources_when_its_turn_comes(mesh: Mesh) -> None:
    holder = mesh.gateway.Ask(question("Who approves business class?"))
    await messages_until(holder, "delta")
    ahead = mesh.gateway.Ask(question("What is the hotel limit in Paris?"))
    assert (await ahead.read()).queued.position == 1
    roomy = question("How are meals paid?")
    roomy.context_token_budget = 2000  # every source fits
    mine = mesh.gateway.Ask(roomy)
    assert (await mine.read()).queued.position == 2
    ahead.cancel()  # the one ahead gives up
    moved = await mine.read()
    assert moved.queued.position == 1
    mesh.backend.release.set()
    received = await rest_of(mine)
    kinds = [m.WhichOneof("event") for m in received]
    assert kinds[0] == "sources" and kinds[-1] == "done" and "queued" not in kinds
    citations = received[0].sources.citations
    assert len(citations) >= 2 and all(c.in_prompt for c in citations)
    done = received[-1].done
    assert done.timings.queue_ms > 0 and done.timings.time_to_first_token_ms >= done.timings.queue_ms
    await rest_of(holder)
    await until(lambda: mesh.generator.running + mesh.generator.waiting == 0, "every place is given up")
    # A small budget (GatedBackend counts words) holds the best source alone, shortened.
    tight = question("How are meals paid?")
    tight.context_token_budget = 20
    sources = (await messages_until(mesh.gateway.Ask(tight), "sources"))[-1].sources.citations
    assert len(sources) >= 2 and [c.in_prompt for c in sources] == [True] + [False] * (len(sources) - 1)
