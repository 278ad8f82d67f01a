"""Dense, keyword (BM25) and hybrid search in the retriever, on a real Milvus Lite: what each mode
finds and scores, filters and pins in both halves of a hybrid search, collections made before
keyword search (searched densely, refused for keyword, until a rebuild gives them the index),
and the gRPC contract's refusals."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from pymilvus import DataType, MilvusClient

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument
from askmesh.runtime.validation import check_search_mode
from askmesh.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from services.retriever import modes
from services.retriever.config import RetrieverSettings
from services.retriever.engine import EMBEDDING_MODEL_PROPERTY, SCHEMA_PROPERTY, RetrievalEngine, alias_name, collection_name
from tests.conftest import retriever_server

DIM = 8
DENSE, KEYWORD, HYBRID = common_pb2.SEARCH_MODE_DENSE, common_pb2.SEARCH_MODE_KEYWORD, common_pb2.SEARCH_MODE_HYBRID
V = common_pb2.FilterValue


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=DIM)
    return (vector / np.linalg.norm(vector)).tolist()


def chunk(document: str, index: int, seed: int, text: str, version: int = 1, **metadata: object) -> retriever_pb2.VectorChunk:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return retriever_pb2.VectorChunk(
        chunk=common_pb2.Chunk(
            id=f"{document}-{index}-v{version}", document_id=document, chunk_index=index, title=f"{document}(7)",
            text=text, metadata=meta, document_version=version,
        ),
        vector=unit(seed),
    )


# The question "what does EADDRINUSE mean?" is embedded as unit(1): by meaning, sockets.7 is
# nearest; by its words, only errno.3 says EADDRINUSE.
CORPUS = [
    chunk("errno", 0, 0, "EADDRINUSE Address already in use (POSIX.1-2001).", dept="libc", page=3),
    chunk("sockets", 0, 1, "A socket is bound to a local address and port before it listens.", dept="net", page=1),
    chunk("sockets", 1, 2, "Listening sockets accept connections from peers.", dept="net", page=2),
    chunk("pipes", 0, 3, "A pipe is a unidirectional data channel between processes.", dept="ipc", page=1),
    chunk("signals", 0, 4, "SIGPIPE is sent to a writer when the reader has gone; it says address nothing.", dept="ipc"),
]
QUESTION = "what does EADDRINUSE mean for my address"
QUESTION_VECTOR = unit(1)


async def load(engine: RetrievalEngine, chunks: list[retriever_pb2.VectorChunk] = CORPUS) -> None:
    request = retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=chunks, create_if_missing=True, embedding_model="m")
    assert await engine.upsert(request) == len(chunks)


async def search(engine: RetrievalEngine, mode: int, **kwargs: object) -> retriever_pb2.SearchResponse:
    values: dict[str, object] = dict(knowledge_base="kb", vector=QUESTION_VECTOR, query_text=QUESTION, top_k=10, search_mode=mode)
    values.update(kwargs)
    return await engine.search(retriever_pb2.SearchRequest(**values))  # type: ignore[arg-type]


def ids(found: retriever_pb2.SearchResponse) -> list[str]:
    return [r.chunk.id for r in found.results]


# -- the pure parts ----------------------------------------------------------------------------


def test_an_unspecified_mode_is_dense_and_a_collection_without_the_index_falls_back_or_refuses() -> None:
    assert modes.plan_mode(common_pb2.SEARCH_MODE_UNSPECIFIED, "kb", keyword_index=False) == modes.ModePlan(DENSE)
    assert modes.plan_mode(HYBRID, "kb", keyword_index=True) == modes.ModePlan(HYBRID)
    assert modes.plan_mode(KEYWORD, "kb", keyword_index=True) == modes.ModePlan(KEYWORD)
    fallback = modes.plan_mode(HYBRID, "old_kb", keyword_index=False)
    assert fallback.mode == DENSE and "'old_kb' was built before keyword search" in fallback.notice and "rebuild" in fallback.notice
    with pytest.raises(FailedPrecondition, match=r"^search_mode: knowledge base 'old_kb' was built before keyword search .*rebuild"):
        modes.plan_mode(KEYWORD, "old_kb", keyword_index=False)


def test_a_threshold_goes_with_dense_search_only_and_modes_are_the_enums() -> None:
    check_search_mode(DENSE, has_threshold=True)
    check_search_mode(common_pb2.SEARCH_MODE_UNSPECIFIED, has_threshold=True)
    check_search_mode(HYBRID, has_threshold=False)
    for mode in (KEYWORD, HYBRID):
        with pytest.raises(InvalidArgument, match=r"^score_threshold: is a cosine similarity, which (keyword|hybrid) search does not score"):
            check_search_mode(mode, has_threshold=True)
    with pytest.raises(InvalidArgument, match=r"^search_mode: 7 is not a search mode"):
        check_search_mode(7, has_threshold=False)


def test_bm25_scores_are_positive_whichever_sign_milvus_gives_them() -> None:
    assert modes.keyword_score(-1.25) == modes.keyword_score(1.25) == 1.25


def test_the_fusion_is_the_configured_ranker_over_enough_candidates() -> None:
    settings = RetrieverSettings(hybrid_candidates=20)
    assert modes.hybrid_candidates(settings, 5) == 20 and modes.hybrid_candidates(settings, 30) == 30
    weighted = modes.ranker(settings)  # the default: 0.7 dense, 0.3 keyword
    assert type(weighted).__name__ == "WeightedRanker" and weighted.dict()["params"]["weights"] == pytest.approx([0.7, 0.3])
    rrf = modes.ranker(RetrieverSettings(hybrid_fusion="rrf", rrf_k=30))
    assert type(rrf).__name__ == "RRFRanker" and rrf.dict()["params"]["k"] == 30
    dense_half, keyword_half = modes.hybrid_requests(settings, [1.0, 0.0], "words", 'dept == "x"', top_k=4)
    assert (dense_half.anns_field, keyword_half.anns_field) == ("vector", "sparse")
    assert dense_half.expr == keyword_half.expr == 'dept == "x"' and dense_half.limit == keyword_half.limit == 20


# -- each mode on a real Milvus Lite --------------------------------------------------------------


@pytest.fixture
async def rrf_engine(tmp_path) -> AsyncIterator[RetrievalEngine]:  # type: ignore[no-untyped-def]
    engine = RetrievalEngine(RetrieverSettings(milvus_uri=str(tmp_path / "milvus.db"), hybrid_fusion="rrf", rrf_k=60))
    await engine.start()
    yield engine
    await engine.close()


async def test_dense_scores_cosine_keyword_bm25_and_rrf_fuses_both_ranks(rrf_engine: RetrievalEngine) -> None:
    retrieval_engine = rrf_engine
    await load(retrieval_engine)
    dense = await search(retrieval_engine, DENSE)
    assert dense.search_mode == DENSE and not dense.notice
    assert ids(dense)[0] == "sockets-0-v1"
    vectors = {c.chunk.id: np.array(c.vector) for c in CORPUS}
    for result in dense.results:  # the score is the cosine similarity itself (unit vectors)
        assert result.score == pytest.approx(float(vectors[result.chunk.id] @ np.array(QUESTION_VECTOR)), abs=1e-5)

    keyword = await search(retrieval_engine, KEYWORD)
    assert keyword.search_mode == KEYWORD
    assert ids(keyword)[0] == "errno-0-v1"  # the only chunk that says EADDRINUSE
    # Only chunks sharing a word with the question; positive BM25 scores, best first.
    assert set(ids(keyword)) == {"errno-0-v1", "sockets-0-v1", "signals-0-v1"}
    scores = [r.score for r in keyword.results]
    assert all(s > 0 for s in scores) and scores == sorted(scores, reverse=True)

    hybrid = await search(retrieval_engine, HYBRID, top_k=3)
    assert hybrid.search_mode == HYBRID
    # Reciprocal rank fusion (k = 60) of the two rankings above, computed here independently.
    fused: dict[str, float] = {}
    for ranking in (ids(dense), ids(keyword)):
        for rank, chunk_id in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1 / (60 + rank)
    expected = sorted(fused.items(), key=lambda item: -item[1])[:3]
    assert [(r.chunk.id, pytest.approx(r.score, abs=1e-6)) for r in hybrid.results] == [(i, pytest.approx(s, abs=1e-6)) for i, s in expected]
    assert "errno-0-v1" in ids(hybrid) and "sockets-0-v1" in ids(hybrid)


async def test_weighted_fusion_adds_each_halfs_normalized_score(retrieval_engine: RetrievalEngine) -> None:
    """The default fusion: 0.7 x (1 + cosine) / 2 + 0.3 x 2 arctan(BM25) / pi, as Milvus
    normalizes each metric to [0, 1] (a half that did not find a chunk adds nothing)."""
    await load(retrieval_engine)
    cosines = {r.chunk.id: r.score for r in (await search(retrieval_engine, DENSE)).results}
    bm25 = {r.chunk.id: r.score for r in (await search(retrieval_engine, KEYWORD)).results}
    hybrid = await search(retrieval_engine, HYBRID)
    expected = {
        chunk_id: 0.7 * (1 + cosines[chunk_id]) / 2 + 0.3 * 2 * math.atan(bm25.get(chunk_id, 0.0)) / math.pi for chunk_id in cosines
    }
    assert ids(hybrid) == sorted(expected, key=lambda chunk_id: -expected[chunk_id])
    for result in hybrid.results:
        assert result.score == pytest.approx(expected[result.chunk.id], abs=1e-4)


async def test_citations_name_the_very_chunk_in_every_mode(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    stored = {c.chunk.id: c.chunk for c in CORPUS}
    for mode in (DENSE, KEYWORD, HYBRID):
        for result in (await search(retrieval_engine, mode)).results:
            assert result.chunk == stored[result.chunk.id], mode  # id, document, index, title, text, metadata, version


async def test_filters_and_pins_apply_to_both_halves(retrieval_engine: RetrievalEngine) -> None:
    newer = chunk("errno", 0, 0, "EADDRINUSE Address already in use, as of version two.", version=2, dept="libc", page=3)
    await load(retrieval_engine, [*CORPUS, newer])
    net = [common_pb2.MetadataFilter(field="dept", equals=V(string_value="net"))]
    for mode in (KEYWORD, HYBRID):
        found = await search(retrieval_engine, mode, filters=net)
        # errno is the keyword half's best and the dense half's third: filtered out of both.
        assert found.results and {r.chunk.document_id for r in found.results} == {"sockets"}, mode
        pinned_new = await search(retrieval_engine, mode, pins=[retriever_pb2.DocumentVersionPin(document_id="errno", version=2)])
        assert "errno-0-v2" in ids(pinned_new) and "errno-0-v1" not in ids(pinned_new), mode
        hidden = await search(retrieval_engine, mode, pins=[retriever_pb2.DocumentVersionPin(document_id="errno", version=0)])
        assert not any(i.startswith("errno") for i in ids(hidden)), mode
    # The dense half alone would have let both versions of errno through.
    unpinned = await search(retrieval_engine, DENSE)
    assert {"errno-0-v1", "errno-0-v2"} <= set(ids(unpinned))


async def test_a_keyword_search_needs_no_vector_and_ignores_stop_words(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    found = await retrieval_engine.search(
        retriever_pb2.SearchRequest(knowledge_base="kb", query_text="UNIDIRECTIONAL", search_mode=KEYWORD, top_k=3)
    )
    assert ids(found) == ["pipes-0-v1"]  # lowercased on both sides
    nothing = await search(retrieval_engine, KEYWORD, query_text="zebra")  # no word in common: no results, no error
    assert list(nothing.results) == []
    # Every chunk says "a", "is" or "the": stop words, in neither the index nor the query.
    assert list((await search(retrieval_engine, KEYWORD, query_text="The is A")).results) == []
    assert ids(await search(retrieval_engine, KEYWORD, query_text="the pipe")) == ["pipes-0-v1"]  # not SIGPIPE: whole words


# -- collections made before keyword search -----------------------------------------------------


def create_old_collection(client: MilvusClient, knowledge_base: str, dimension: int = DIM, model: str = "m") -> None:
    """A collection as askmesh made them before keyword search: no analyzer, no BM25 field."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("document_id", DataType.VARCHAR, max_length=256)
    schema.add_field("document_version", DataType.INT64)
    schema.add_field("chunk_index", DataType.INT64)
    schema.add_field("title", DataType.VARCHAR, max_length=512)
    schema.add_field("text", DataType.VARCHAR, max_length=65_535)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
    index_params = MilvusClient.prepare_index_params()
    index_params.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
    name = collection_name(knowledge_base, 1)
    client.create_collection(
        name, schema=schema, index_params=index_params, consistency_level="Strong",
        properties={EMBEDDING_MODEL_PROPERTY: model, SCHEMA_PROPERTY: "{}"},
    )
    client.load_collection(name)
    client.create_alias(name, alias_name(knowledge_base))


async def test_an_old_collection_searches_densely_refuses_keyword_and_gains_it_by_a_rebuild(retrieval_engine: RetrievalEngine) -> None:
    create_old_collection(retrieval_engine.client, "kb")
    await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS))
    info = await retrieval_engine.describe("kb")
    assert not info.keyword_search and info.chunk_count == len(CORPUS)

    dense = await search(retrieval_engine, DENSE)
    assert dense.search_mode == DENSE and ids(dense)[0] == "sockets-0-v1" and not dense.notice
    fallback = await search(retrieval_engine, HYBRID)
    assert fallback.search_mode == DENSE and ids(fallback) == ids(dense)
    assert fallback.notice.startswith("knowledge base 'kb' was built before keyword search") and "rebuild" in fallback.notice
    with pytest.raises(FailedPrecondition, match=r"knowledge base 'kb' was built before keyword search .*rebuild"):
        await search(retrieval_engine, KEYWORD)

    # A rebuild: the next generation is made by this askmesh (with the index), filled, switched
    # to, by another replica: this one's remembered state (no index) is looked at afresh.
    other = RetrievalEngine(retrieval_engine.settings)
    await other.start()
    try:
        await other.create_collection(
            retriever_pb2.CreateCollectionRequest(knowledge_base="kb", generation=2, dimension=DIM, embedding_model="m")
        )
        await other.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS, generation=2))
        switched = await other.switch_generation("kb", 2)
        assert switched.active_generation == 2 and switched.keyword_search
    finally:
        await other.close()
    hybrid = await search(retrieval_engine, HYBRID)
    assert hybrid.search_mode == HYBRID and not hybrid.notice
    # The keyword half counts now: errno's fused score is more than its dense share alone.
    cosine = next(r.score for r in (await search(retrieval_engine, DENSE)).results if r.chunk.id == "errno-0-v1")
    fused = next(r.score for r in hybrid.results if r.chunk.id == "errno-0-v1")
    assert fused > 0.7 * (1 + cosine) / 2 + 0.05
    assert ids(await search(retrieval_engine, KEYWORD))[0] == "errno-0-v1"


# -- the gRPC contract ---------------------------------------------------------------------------


@pytest.fixture
async def retriever(retrieval_engine: RetrievalEngine) -> AsyncIterator[retriever_pb2_grpc.RetrieverStub]:
    await load(retrieval_engine)
    async with retriever_server(retrieval_engine) as stub:
        yield stub


def request(**values: object) -> retriever_pb2.SearchRequest:
    base: dict[str, object] = dict(knowledge_base="kb", vector=QUESTION_VECTOR, query_text=QUESTION)
    base.update(values)
    return retriever_pb2.SearchRequest(**base)  # type: ignore[arg-type]


BAD_SEARCHES = [
    (request(search_mode=KEYWORD, score_threshold=0.5), "score_threshold: is a cosine similarity, which keyword search does not score"),
    (request(search_mode=HYBRID, score_threshold=0.5), "score_threshold: is a cosine similarity, which hybrid search does not score"),
    (request(search_mode=9), "search_mode: 9 is not a search mode"),
    (request(search_mode=HYBRID, query_text="  "), "query_text: is empty; hybrid search needs the query's text"),
    (request(search_mode=KEYWORD, query_text=""), "query_text: is empty; keyword search needs the query's text"),
    (request(search_mode=HYBRID, vector=[]), "vector: is empty; hybrid search needs the query's embedding"),
    (request(search_mode=HYBRID, query_text="x" * 8001), "query_text: 8001 characters exceed the limit of 8000"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SEARCHES)
async def test_a_bad_search_is_invalid_argument_naming_the_field(
    retriever: retriever_pb2_grpc.RetrieverStub, bad: retriever_pb2.SearchRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await retriever.Search(bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(message), raised.value.details()


async def test_each_mode_over_grpc(retriever: retriever_pb2_grpc.RetrieverStub) -> None:
    for mode in (DENSE, KEYWORD, HYBRID):
        found = await retriever.Search(request(search_mode=mode, top_k=2))
        assert found.search_mode == mode and len(found.results) == 2 and found.timings.search_ms > 0
    # Older callers send a vector alone: dense, as before.
    plain = await retriever.Search(retriever_pb2.SearchRequest(knowledge_base="kb", vector=QUESTION_VECTOR, top_k=1, score_threshold=0.1))
    assert plain.search_mode == DENSE and [r.chunk.id for r in plain.results] == ["sockets-0-v1"]
