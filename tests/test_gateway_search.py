"""Search modes through the public API: the gateway's Search RPC and Ask's sources in dense,
keyword and hybrid mode, a knowledge base's default mode, citations that name the very chunk
(document, chunk id and index, title, page or heading), and a knowledge base made before keyword
search (searched densely and told so, refused for keyword) that gains it by a rebuild. Real
embedder, retriever (Milvus Lite), generator, ingestor and gateway servers, behind Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from pymilvus import MilvusClient

from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc
from services.ingestor.knowledge import chunk_id_for
from services.ingestor.store import open_store
from tests.conftest import InProcessTiers, start_gateway
from tests.test_parsing import make_pdf
from tests.test_retriever_modes import create_old_collection

DENSE, KEYWORD, HYBRID = common_pb2.SEARCH_MODE_DENSE, common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID
ONE_TOKEN = common_pb2.GenerationParameters(max_new_tokens=1, temperature=0)

MANUAL = b"""# Manual

## Binding sockets

A socket is bound to a local address and port before it listens for connections from peers.

## Error codes

EADDRINUSE: the local address is already in use by another socket.

## Pipes

A pipe is a unidirectional data channel between two processes.
"""
PDF_PAGES = ["The kernel keeps a table of open files for each process.", "Signal SIGPIPE is sent to a writer whose reader went away."]


class Api:
    def __init__(self, channel: grpc.aio.Channel, data: Path) -> None:
        self.kb = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
        self.ingest = ingestion_pb2_grpc.IngestionStub(channel)
        self.gateway = gateway_pb2_grpc.GatewayStub(channel)
        self.data = data

    async def upload(self, kb: str, file_name: str, data: bytes) -> None:
        async def parts() -> AsyncIterator[ingestion_pb2.UploadFileRequest]:
            yield ingestion_pb2.UploadFileRequest(header=ingestion_pb2.UploadFileHeader(knowledge_base=kb, file_name=file_name))
            yield ingestion_pb2.UploadFileRequest(data=data)

        task = await self.ingest.UploadFile(parts())
        await self.finish(task.id)

    async def finish(self, task_id: str) -> None:
        ended = [t async for t in self.ingest.WatchTask(ingestion_pb2.WatchTaskRequest(id=task_id), timeout=120)][-1]
        assert ended.state == ingestion_pb2.TASK_STATE_SUCCEEDED, ended.error

    async def search(self, kb: str, question: str, **fields: object) -> gateway_pb2.SearchResults:
        return await self.gateway.Search(gateway_pb2.SearchQuery(question=question, knowledge_base=kb, **fields), timeout=60)  # type: ignore[arg-type]

    async def sources(self, kb: str, question: str, **fields: object) -> gateway_pb2.Sources:
        """An Ask's sources; the call is hung up once they arrive."""
        call = self.gateway.Ask(gateway_pb2.AskRequest(question=question, knowledge_base=kb, parameters=ONE_TOKEN, **fields), timeout=120)  # type: ignore[arg-type]
        try:
            async for message in call:
                if message.HasField("sources"):
                    return message.sources
        finally:
            call.cancel()
        raise AssertionError("no sources message")

    def collection_of(self, kb: str) -> str:
        store = open_store(str(self.data / "store.sqlite3"))
        try:
            record = store.get_knowledge_base(kb)
            assert record is not None
            return record.collection
        finally:
            store.close()


@pytest.fixture(scope="module")
async def api(upstreams: InProcessTiers) -> AsyncIterator[Api]:
    front, channel = await start_gateway(upstreams.addresses)
    yield Api(channel, Path(upstreams.addresses["data"]))
    await channel.close()
    await front.stop()


@pytest.fixture(scope="module")
async def manual(api: Api) -> str:
    created = await api.kb.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="manual"))
    assert created.search_mode == HYBRID  # the server's default (ASKMESH_INGESTOR_DEFAULT_SEARCH_MODE)
    await api.upload("manual", "manual.md", MANUAL)
    await api.upload("manual", "kernel.pdf", make_pdf(PDF_PAGES))  # type: ignore[arg-type]
    return "manual"


async def test_each_mode_finds_its_sources_and_ask_gets_the_same_ones(api: Api, manual: str) -> None:
    question = "What does EADDRINUSE mean?"
    keyword = await api.search(manual, question, search_mode=KEYWORD, top_k=3)
    assert keyword.search_mode == KEYWORD and not keyword.search_notice
    assert keyword.citations[0].metadata["section"] == "Manual > Error codes"  # the only chunk with the word
    assert keyword.embedding_model == "" and keyword.timings.embed_ms < keyword.timings.total_ms
    for mode in (DENSE, KEYWORD, HYBRID):
        found = await api.search(manual, question, search_mode=mode, top_k=3)
        assert found.search_mode == mode and found.citations, mode
        assert [c.number for c in found.citations] == list(range(1, len(found.citations) + 1))
        assert found.timings.search_ms > 0 and found.timings.total_ms >= found.timings.search_ms
        if mode != KEYWORD:
            assert found.embedding_model and found.timings.embed_ms > 0
        # Ask searches the same way, through the same code: the same sources in the same order.
        sources = await api.sources(manual, question, search_mode=mode, top_k=3)
        assert sources.search_mode == mode
        assert [c.chunk_id for c in sources.citations] == [c.chunk_id for c in found.citations], mode
        assert [c.score for c in sources.citations] == pytest.approx([c.score for c in found.citations], abs=1e-5)
    hybrid = await api.search(manual, question, top_k=3)  # the knowledge base's default
    assert hybrid.search_mode == HYBRID and hybrid.citations[0].metadata["section"] == "Manual > Error codes"


async def test_citations_name_the_very_chunk_page_or_heading_in_every_mode(api: Api, manual: str) -> None:
    documents = {d.id: d for d in (await api.kb.ListDocuments(knowledge_pb2.ListDocumentsRequest(knowledge_base=manual))).documents}
    questions = {"manual": "Which error says the local address is already in use?", "kernel": "Which signal reaches a writer whose reader went away?"}
    for mode in (DENSE, KEYWORD, HYBRID):
        for expected_document, question in questions.items():
            found = await api.search(manual, question, search_mode=mode, top_k=10)
            cited = {c.document_id for c in found.citations}
            assert expected_document in cited, (mode, question)
            for citation in found.citations:
                document = documents[citation.document_id]
                assert citation.chunk_id == chunk_id_for(manual, document.id, document.version, citation.chunk_index)
                assert citation.title == document.title
                if document.id == "kernel":  # one chunk per page here: the page it came from
                    page = int(citation.metadata["page"])
                    assert PDF_PAGES[page - 1] in citation.text, (mode, citation.text)
                else:  # the heading its text sits under, which the text starts with
                    assert citation.text.startswith(citation.metadata["section"] + "\n\n"), (mode, citation.text)


async def test_a_knowledge_base_has_a_default_mode_and_a_question_may_choose_another(api: Api) -> None:
    created = await api.kb.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="exact", search_mode=KEYWORD))
    assert created.search_mode == KEYWORD
    await api.gateway.AddDocuments(gateway_pb2.AddDocumentsRequest(
        knowledge_base="exact", documents=[gateway_pb2.Document(id="e", text="ENOSPC: no space left on device.")]
    ))
    assert (await api.kb.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="exact"))).search_mode == KEYWORD
    by_default = await api.search("exact", "What is ENOSPC?")
    assert by_default.search_mode == KEYWORD and [c.document_id for c in by_default.citations] == ["e"]
    assert (await api.search("exact", "What is ENOSPC?", search_mode=DENSE)).search_mode == DENSE
    # A score threshold is a cosine similarity: a question that sets one without a mode searches densely.
    thresholded = await api.search("exact", "What is ENOSPC?", score_threshold=0.1)
    assert thresholded.search_mode == DENSE and all(c.score >= 0.1 for c in thresholded.citations)


BAD_SEARCHES = [
    (dict(question="x", knowledge_base="manual", search_mode=HYBRID, score_threshold=0.2), grpc.StatusCode.INVALID_ARGUMENT,
     "score_threshold: is a cosine similarity, which hybrid search does not score"),
    (dict(question="x", knowledge_base="manual", search_mode=7), grpc.StatusCode.INVALID_ARGUMENT, "search_mode: 7 is not a search mode"),
    (dict(question=" ", knowledge_base="manual"), grpc.StatusCode.INVALID_ARGUMENT, "question: is empty"),
    (dict(question="x", knowledge_base="manual", top_k=21), grpc.StatusCode.INVALID_ARGUMENT, "top_k: 21 is out of range 1..20"),
    (dict(question="x", knowledge_base="nowhere"), grpc.StatusCode.NOT_FOUND, "knowledge_base: 'nowhere' does not exist"),
]


@pytest.mark.parametrize(("fields", "code", "message"), BAD_SEARCHES)
async def test_a_bad_search_is_refused_naming_the_field(api: Api, manual: str, fields: dict[str, object], code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.gateway.Search(gateway_pb2.SearchQuery(**fields))  # type: ignore[arg-type]
    assert raised.value.code() == code and raised.value.details().startswith(message), raised.value.details()


async def test_a_bad_mode_is_refused_by_create_and_rebuild(api: Api, manual: str) -> None:
    for call in (
        api.kb.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="odd", search_mode=5)),
        api.kb.RebuildKnowledgeBase(knowledge_pb2.RebuildKnowledgeBaseRequest(name=manual, search_mode=5)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("search_mode: 5 is not a search mode")
    with pytest.raises(grpc.aio.AioRpcError):
        await api.kb.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="odd"))  # nothing was made


async def test_a_knowledge_base_from_before_keyword_search_answers_densely_until_a_rebuild(api: Api, upstreams: InProcessTiers) -> None:
    created = await api.kb.CreateKnowledgeBase(knowledge_pb2.CreateKnowledgeBaseRequest(name="legacy"))
    # Its collection as an askmesh before keyword search made it (no BM25 field), then filled.
    key = api.collection_of("legacy")
    milvus = MilvusClient(uri=str(Path(upstreams.addresses["data"]) / "milvus.db"))
    try:
        milvus.drop_alias(f"kb_{key}")
        milvus.drop_collection(f"kb_{key}__g1")
        create_old_collection(milvus, key, dimension=created.dimension, model=created.embedding_model)
    finally:
        milvus.close()
    await api.upload("legacy", "manual.md", MANUAL)
    question = "What does EADDRINUSE mean?"

    found = await api.search("legacy", question)  # hybrid by default: dense, and told why
    assert found.search_mode == DENSE and found.citations
    assert found.search_notice.startswith("knowledge base 'legacy' was built before keyword search") and key not in found.search_notice
    assert "rebuild" in found.search_notice
    sources = await api.sources("legacy", question)
    assert sources.search_mode == DENSE and sources.search_notice == found.search_notice
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.search("legacy", question, search_mode=KEYWORD)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "knowledge base 'legacy' was built before keyword search" in refused.value.details() and key not in refused.value.details()

    rebuild = await api.kb.RebuildKnowledgeBase(knowledge_pb2.RebuildKnowledgeBaseRequest(name="legacy", search_mode=KEYWORD))
    await api.finish(rebuild.id)
    rebuilt = await api.kb.GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="legacy"))
    assert rebuilt.generation == 2 and rebuilt.search_mode == KEYWORD  # the new default took effect at the switch
    keyword = await api.search("legacy", question)
    assert keyword.search_mode == KEYWORD and not keyword.search_notice
    assert keyword.citations[0].metadata["section"] == "Manual > Error codes"
    assert (await api.search("legacy", question, search_mode=HYBRID)).search_mode == HYBRID
