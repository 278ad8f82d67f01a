"""The retriever: its engine on a real Milvus Lite, and its gRPC contract on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from askmesh.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine
from tests.conftest import retriever_server

DIM = 8
V = common_pb2.FilterValue


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=DIM)
    return (vector / np.linalg.norm(vector)).tolist()


def chunk(document: str, index: int, seed: int, **metadata: object) -> retriever_pb2.VectorChunk:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return retriever_pb2.VectorChunk(
        chunk=common_pb2.Chunk(
            id=f"{document}-{index}", document_id=document, chunk_index=index, title=f"Title {document}",
            text=f"text of {document} #{index}", metadata=meta,
        ),
        vector=unit(seed),
    )


CORPUS = [
    chunk("a", 0, 0, dept="eng", year=2021, tag="x"),
    chunk("a", 1, 1, dept="eng", year=2022),
    chunk("b", 0, 2, dept="ops", year=2023, tag="y"),
    chunk("b", 1, 3, dept="ops", year=2024),
    chunk("c", 0, 4, dept="legal", year=2025),
]


async def load(engine: RetrievalEngine, kb: str = "kb") -> None:
    request = retriever_pb2.UpsertRequest(knowledge_base=kb, chunks=CORPUS, create_if_missing=True, embedding_model="m")
    assert await engine.upsert(request) == len(CORPUS)


async def search(engine: RetrievalEngine, seed: int = 0, **kwargs: object) -> list[retriever_pb2.ScoredChunk]:
    request = retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(seed), top_k=10, **kwargs)  # type: ignore[arg-type]
    return list((await engine.search(request)).results)


async def test_nearest_chunk_comes_first_with_its_fields(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    results = await search(retrieval_engine, seed=2)
    assert results[0].chunk.id == "b-0" and results[0].score == pytest.approx(1.0, abs=1e-4)
    assert results[0].chunk.title == "Title b" and results[0].chunk.text == "text of b #0"
    assert results[0].chunk.metadata["dept"] == "ops"
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


async def test_upsert_is_idempotent(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    await load(retrieval_engine)
    assert len(await search(retrieval_engine)) == len(CORPUS)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (common_pb2.MetadataFilter(field="dept", equals=V(string_value="eng")), {"a-0", "a-1"}),
        (common_pb2.MetadataFilter(field="year", equals=V(int_value=2023)), {"b-0"}),
        (
            common_pb2.MetadataFilter(field="dept", **{"in": common_pb2.FilterValueList(values=[V(string_value="ops"), V(string_value="legal")])}),
            {"b-0", "b-1", "c-0"},
        ),
        (common_pb2.MetadataFilter(field="year", range=common_pb2.FilterRange(gt=2022, lte=2024)), {"b-0", "b-1"}),
        (common_pb2.MetadataFilter(field="tag", exists=True), {"a-0", "b-0"}),
        (common_pb2.MetadataFilter(field="tag", exists=False), {"a-1", "b-1", "c-0"}),
        (common_pb2.MetadataFilter(field="document_id", equals=V(string_value="c")), {"c-0"}),
        (common_pb2.MetadataFilter(field="dept", equals=V(string_value='eng" or dept != "')), set()),
    ],
)
async def test_filters(retrieval_engine: RetrievalEngine, condition: common_pb2.MetadataFilter, expected: set[str]) -> None:
    await load(retrieval_engine)
    assert {r.chunk.id for r in await search(retrieval_engine, filters=[condition])} == expected


async def test_score_threshold_drops_weak_matches(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    results = await search(retrieval_engine, seed=0, score_threshold=0.99)
    assert [r.chunk.id for r in results] == ["a-0"]


async def test_delete_a_document_or_its_tail(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    trimmed = await retrieval_engine.delete(retriever_pb2.DeleteRequest(knowledge_base="kb", document_ids=["a"], from_chunk_index=1))
    assert trimmed == 1
    deleted = await retrieval_engine.delete(retriever_pb2.DeleteRequest(knowledge_base="kb", document_ids=["b", "nope"]))
    assert deleted == 2
    assert {r.chunk.id for r in await search(retrieval_engine)} == {"a-0", "c-0"}


async def test_unknown_knowledge_base_is_not_found(retrieval_engine: RetrievalEngine) -> None:
    with pytest.raises(NotFound, match="knowledge_base: 'kb' does not exist"):
        await search(retrieval_engine)
    with pytest.raises(NotFound):
        await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS))


async def test_vectors_must_match_the_knowledge_base(retrieval_engine: RetrievalEngine) -> None:
    await load(retrieval_engine)
    wrong = retriever_pb2.VectorChunk(chunk=CORPUS[0].chunk, vector=[1.0, 0.0])
    built_with_another_model = r"^knowledge base 'kb' holds \d+-dimension vectors but got 2: it was built with another"
    with pytest.raises(FailedPrecondition, match=built_with_another_model):
        await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[wrong]))
    with pytest.raises(FailedPrecondition, match=built_with_another_model):
        await retrieval_engine.search(retriever_pb2.SearchRequest(knowledge_base="kb", vector=[1.0, 0.0]))
    with pytest.raises(FailedPrecondition, match=built_with_another_model):  # another model's name too
        await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[wrong], embedding_model="other"))
    with pytest.raises(FailedPrecondition, match="built with 'm', not 'other'"):
        await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS, embedding_model="other"))
    assert len(await search(retrieval_engine)) == len(CORPUS)  # nothing was changed


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    settings = RetrieverSettings(milvus_uri=str(tmp_path / "m.db"))
    first = RetrievalEngine(settings)
    await first.start()
    await load(first)
    await first.close()
    second = RetrievalEngine(settings)
    await second.start()
    try:
        assert len(await search(second)) == len(CORPUS)
    finally:
        await second.close()


# -- over gRPC ---------------------------------------------------------------------------------


@pytest.fixture
async def retriever(retrieval_engine: RetrievalEngine) -> AsyncIterator[retriever_pb2_grpc.RetrieverStub]:
    await load(retrieval_engine)
    async with retriever_server(retrieval_engine) as stub:
        yield stub


async def test_search_upsert_delete_over_grpc(retriever: retriever_pb2_grpc.RetrieverStub) -> None:
    found = await retriever.Search(retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(4), top_k=2))
    assert [r.chunk.id for r in found.results][0] == "c-0" and len(found.results) == 2
    assert found.timings.search_ms > 0
    added = await retriever.Upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[chunk("d", 0, 9)]))
    assert added.upserted == 1
    deleted = await retriever.Delete(retriever_pb2.DeleteRequest(knowledge_base="kb", document_ids=["d"]))
    assert deleted.deleted == 1


BAD_REQUESTS = [
    ("Search", retriever_pb2.SearchRequest(knowledge_base="Bad Name", vector=unit(0)), grpc.StatusCode.INVALID_ARGUMENT, "knowledge_base: 'Bad Name' is not a collection key"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="missing", vector=unit(0)), grpc.StatusCode.NOT_FOUND, "knowledge_base: 'missing' does not exist"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="kb"), grpc.StatusCode.INVALID_ARGUMENT, "vector: is empty"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(0), top_k=51), grpc.StatusCode.INVALID_ARGUMENT, "top_k: 51 is out of range 1..50"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(0), score_threshold=2), grpc.StatusCode.INVALID_ARGUMENT, "score_threshold"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(0), filters=[common_pb2.MetadataFilter(field="x y", exists=True)]), grpc.StatusCode.INVALID_ARGUMENT, "filters[0].field"),
    ("Upsert", retriever_pb2.UpsertRequest(knowledge_base="kb"), grpc.StatusCode.INVALID_ARGUMENT, "chunks: must contain at least one chunk"),
    ("Upsert", retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[chunk("a", 0, 0), chunk("a", 0, 1)]), grpc.StatusCode.INVALID_ARGUMENT, "chunks[1].chunk.id: 'a-0' appears twice"),
    ("Upsert", retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[retriever_pb2.VectorChunk(chunk=common_pb2.Chunk(id="z", document_id="z"), vector=unit(0))]), grpc.StatusCode.INVALID_ARGUMENT, "chunks[0].chunk.text: is empty"),
    ("Delete", retriever_pb2.DeleteRequest(knowledge_base="kb"), grpc.StatusCode.INVALID_ARGUMENT, "document_ids: must list at least one"),
    ("Delete", retriever_pb2.DeleteRequest(knowledge_base="nokb", document_ids=["a"]), grpc.StatusCode.NOT_FOUND, "knowledge_base: 'nokb' does not exist"),
    ("Delete", retriever_pb2.DeleteRequest(knowledge_base="kb", document_ids=["a", "b\tc"]), grpc.StatusCode.INVALID_ARGUMENT, "document_ids[1]: must be 1 to 256 printable characters"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(0), pins=[retriever_pb2.DocumentVersionPin(document_id="", version=1)]), grpc.StatusCode.INVALID_ARGUMENT, "pins[0].document_id: must be 1 to 256 printable characters"),
    ("Search", retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(0), score_threshold=2), grpc.StatusCode.INVALID_ARGUMENT, "score_threshold: 2 is outside [-1, 1]"),
]


@pytest.mark.parametrize(("method", "request_message", "code", "message"), BAD_REQUESTS)
async def test_bad_input_answers_the_right_status_and_changes_nothing(
    retriever: retriever_pb2_grpc.RetrieverStub, method: str, request_message: object, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(retriever, method)(request_message)
    assert raised.value.code() == code
    assert raised.value.details().startswith(message), raised.value.details()
    everything = await retriever.Search(retriever_pb2.SearchRequest(knowledge_base="kb", vector=unit(0), top_k=10))
    assert sorted(r.chunk.id for r in everything.results) == sorted(c.chunk.id for c in CORPUS)


# -- knowledge bases as generations behind an alias, typed metadata, document versions ---------


SCHEMA = [
    common_pb2.MetadataField(name="dept", type=common_pb2.METADATA_TYPE_STRING),
    common_pb2.MetadataField(name="year", type=common_pb2.METADATA_TYPE_INT),
]


async def create(engine: RetrievalEngine, generation: int = 1) -> retriever_pb2.CollectionInfo:
    return await engine.create_collection(
        retriever_pb2.CreateCollectionRequest(
            knowledge_base="kb", generation=generation, dimension=DIM, embedding_model="m", metadata_schema=SCHEMA
        )
    )


async def test_declared_metadata_is_typed_and_filterable(retrieval_engine: RetrievalEngine) -> None:
    info = await create(retrieval_engine)
    assert info.active_generation == 1 and [f.name for f in info.metadata_schema] == ["dept", "year"]
    await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS))
    year_in = common_pb2.MetadataFilter(field="year", **{"in": common_pb2.FilterValueList(values=[V(int_value=2021), V(int_value=2025)])})
    assert {r.chunk.id for r in await search(retrieval_engine, filters=[year_in])} == {"a-0", "c-0"}
    ops = common_pb2.MetadataFilter(field="dept", equals=V(string_value="ops"))
    assert {r.chunk.id for r in await search(retrieval_engine, filters=[ops])} == {"b-0", "b-1"}
    declared_absent = common_pb2.MetadataFilter(field="year", exists=False)
    assert await search(retrieval_engine, filters=[declared_absent]) == []
    tagged = common_pb2.MetadataFilter(field="tag", exists=True)  # undeclared: read from the JSON
    assert {r.chunk.id for r in await search(retrieval_engine, filters=[tagged])} == {"a-0", "b-0"}
    with pytest.raises(InvalidArgument, match=r"^filters\[0\]\.equals: is a string, but the field is declared int"):
        await search(retrieval_engine, filters=[common_pb2.MetadataFilter(field="year", equals=V(string_value="2021"))])
    with pytest.raises(InvalidArgument, match=r"^chunks\[0\]\.chunk\.metadata\.year: 'soon' is not a valid int"):
        await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[chunk("z", 0, 9, year="soon")]))
    assert (await retrieval_engine.describe("kb")).chunk_count == len(CORPUS)


async def test_pins_show_one_version_of_a_document_being_changed(retrieval_engine: RetrievalEngine) -> None:
    await create(retrieval_engine)
    old = chunk("a", 0, 0)
    new = chunk("a", 0, 0)
    new.chunk.id, new.chunk.document_version, new.chunk.text = "a-0-v2", 2, "new text"
    old.chunk.document_version = 1
    await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[old, new]))
    pin_old = [retriever_pb2.DocumentVersionPin(document_id="a", version=1)]
    assert [r.chunk.text for r in await search(retrieval_engine, pins=pin_old)] == ["text of a #0"]
    pin_new = [retriever_pb2.DocumentVersionPin(document_id="a", version=2)]
    assert [r.chunk.text for r in await search(retrieval_engine, pins=pin_new)] == ["new text"]
    hidden = [retriever_pb2.DocumentVersionPin(document_id="a", version=0)]
    assert await search(retrieval_engine, pins=hidden) == []
    removed = await retrieval_engine.delete(retriever_pb2.DeleteRequest(knowledge_base="kb", document_ids=["a"], except_version=2))
    assert removed == 1


async def test_a_new_generation_is_built_beside_the_old_and_switched_atomically(retrieval_engine: RetrievalEngine) -> None:
    await create(retrieval_engine, generation=1)
    await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS[:2]))
    info = await create(retrieval_engine, generation=2)
    assert info.active_generation == 1  # the alias still points at generation 1
    await retrieval_engine.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=CORPUS, generation=2))
    assert len(await search(retrieval_engine)) == 2
    switched = await retrieval_engine.switch_generation("kb", 2)
    assert switched.active_generation == 2 and switched.chunk_count == len(CORPUS)
    assert len(await search(retrieval_engine)) == len(CORPUS)
    with pytest.raises(NotFound, match="has no generation 1"):
        await retrieval_engine.describe("kb", generation=1)
    assert await retrieval_engine.drop("kb") is True
    assert await retrieval_engine.drop("kb") is False
    with pytest.raises(NotFound):
        await search(retrieval_engine)


async def test_a_search_follows_another_replicas_switch_and_drop(retrieval_engine: RetrievalEngine) -> None:
    """Searches remember each knowledge base's collection; another replica (a second engine on
    the same Milvus) switching it to a generation of another dimension, or dropping it, is seen."""
    await load(retrieval_engine)
    assert len(await search(retrieval_engine)) == len(CORPUS)  # remembered now
    other = RetrievalEngine(retrieval_engine.settings)
    await other.start()
    try:
        await other.create_collection(
            retriever_pb2.CreateCollectionRequest(knowledge_base="kb", generation=2, dimension=3, embedding_model="m3")
        )
        small = chunk("z", 0, 0)
        del small.vector[:]
        small.vector.extend([1.0, 0.0, 0.0])
        await other.upsert(retriever_pb2.UpsertRequest(knowledge_base="kb", chunks=[small], generation=2))
        await other.switch_generation("kb", 2)

        found = await retrieval_engine.search(retriever_pb2.SearchRequest(knowledge_base="kb", vector=[0.0, 1.0, 0.0]))
        assert [r.chunk.id for r in found.results] == ["z-0"]
        with pytest.raises(FailedPrecondition):
            await search(retrieval_engine)  # 8 numbers: the old generation's length

        await other.drop("kb")
        with pytest.raises(NotFound):
            await retrieval_engine.search(retriever_pb2.SearchRequest(knowledge_base="kb", vector=[0.0, 1.0, 0.0]))
    finally:
        await other.close()
