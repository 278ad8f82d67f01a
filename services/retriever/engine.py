"""Chunk storage and vector search in Milvus, without gRPC.

A knowledge base `x` is a Milvus alias `kb_x` pointing at one physical collection per
generation, `kb_x__g1`, `kb_x__g2`, ... A rebuild writes the next generation while the alias keeps
serving the current one, then switches the alias atomically and drops the old collection.

Each collection holds chunks: primary key `id` (deterministic, so re-upserting replaces), the
document id, version and chunk index as scalar fields, title, text, all metadata as JSON, one
typed nullable column `m_<key>` per metadata key the knowledge base declares (fast, type-checked
filters), the vector with an HNSW index on cosine similarity, and (in collections made since
keyword search) a BM25 sparse vector that Milvus makes from the text itself (modes.py). Every
write is flushed: Milvus Lite searches unflushed rows about 50x slower.

pymilvus is blocking, so every call runs on a small thread pool off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from pymilvus import DataType, MilvusClient, MilvusException

from askmesh.runtime import metrics
from askmesh.runtime.errors import AskmeshError, FailedPrecondition, InvalidArgument, NotFound, Unavailable, shown
from askmesh.runtime.validation import (
    MAX_DECLARED_STRING,
    MAX_DOCUMENT_ID_CHARS,
    MAX_TITLE_CHARS,
    check_document_id,
    check_schema,
    check_title,
    typed_value,
)
from askmesh.v1 import common_pb2, retriever_pb2
from services.retriever.config import RetrieverSettings
from services.retriever import modes
from services.retriever.filters import DECLARED_PREFIX, build_filter, literal

log = logging.getLogger("askmesh.retriever")

ALIAS_PREFIX = "kb_"
EMBEDDING_MODEL_PROPERTY = "askmesh.embedding_model"
SCHEMA_PROPERTY = "askmesh.metadata_schema"
OUTPUT_FIELDS = ["id", "document_id", "document_version", "chunk_index", "title", "text", "metadata"]
MAX_ID_LENGTH = 128
MAX_TEXT_BYTES = 65_535
_GENERATION = re.compile(r"^(?P<alias>kb_[a-z][a-z0-9_]*)__g(?P<generation>\d+)$")
_COLUMN_TYPES = {
    common_pb2.METADATA_TYPE_STRING: DataType.VARCHAR,
    common_pb2.METADATA_TYPE_INT: DataType.INT64,
    common_pb2.METADATA_TYPE_FLOAT: DataType.DOUBLE,
    common_pb2.METADATA_TYPE_BOOL: DataType.BOOL,
}

T = TypeVar("T")


def alias_name(knowledge_base: str) -> str:
    return ALIAS_PREFIX + knowledge_base


def collection_name(knowledge_base: str, generation: int) -> str:
    return f"{ALIAS_PREFIX}{knowledge_base}__g{generation}"


@dataclass(frozen=True)
class CollectionState:
    name: str  # the physical collection
    generation: int
    dimension: int
    embedding_model: str
    schema: dict[str, int] = field(default_factory=dict)
    # It has the BM25 keyword index (made since keyword search; older ones gain it by a rebuild).
    keyword_index: bool = False


class RetrievalEngine:
    def __init__(self, settings: RetrieverSettings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="retriever-milvus")
        # Creating and switching collections is check-then-act: serialize it within this replica.
        self._admin_lock = threading.Lock()
        # The active collection's state per knowledge base as searches last saw it, so a search
        # is one Milvus call rather than three. Other replicas may switch or drop the alias, so a
        # search that fails with a remembered state forgets it and is made again with a fresh one.
        self._active: dict[str, CollectionState] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def _connect(self) -> MilvusClient:
        uri = self.settings.milvus_uri
        if "://" not in uri:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        client = MilvusClient(uri=uri, token=self.settings.milvus_token)
        # After a restart collections are "released" until loaded again.
        for name in client.list_collections():
            if _GENERATION.match(name):
                client.load_collection(name)
        return client

    async def start(self) -> None:
        self._client = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        log.info("connected to Milvus at %s", self.settings.milvus_uri)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, client.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        if self._client is None:
            raise Unavailable("retriever: not connected to Milvus yet")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except MilvusException as error:
            log.warning("Milvus error: %s", error)
            raise Unavailable(f"retriever: Milvus error: {error.message}") from error

    @property
    def client(self) -> MilvusClient:
        if self._client is None:
            raise Unavailable("retriever: not connected to Milvus yet")
        return self._client

    # -- collections -----------------------------------------------------------------------
    def _state(self, physical: str) -> CollectionState:
        description = self.client.describe_collection(physical)
        dimension = next(int(f["params"]["dim"]) for f in description["fields"] if f["name"] == modes.DENSE_FIELD)
        properties = description.get("properties") or {}
        schema = {name: int(kind) for name, kind in json.loads(properties.get(SCHEMA_PROPERTY) or "{}").items()}
        match = _GENERATION.match(description["collection_name"])
        return CollectionState(
            name=description["collection_name"],
            generation=int(match["generation"]) if match else 0,
            dimension=dimension,
            embedding_model=properties.get(EMBEDDING_MODEL_PROPERTY, ""),
            schema=schema,
            keyword_index=modes.has_keyword_index(description),
        )

    def _resolve(self, knowledge_base: str, generation: int | None = None) -> CollectionState:
        """The active collection (through the alias), or a given generation."""
        name = alias_name(knowledge_base) if generation is None else collection_name(knowledge_base, generation)
        if not self.client.has_collection(name):
            what = f"knowledge_base: {shown(knowledge_base)}"
            raise NotFound(f"{what} does not exist" if generation is None else f"{what} has no generation {generation}")
        return self._state(name)

    def _generations(self, knowledge_base: str) -> list[str]:
        """Its collections' names: those whose alias part is exactly its own (a prefix match
        would take `kb_a__gx__g1`, another key's generation, for one of `a`'s)."""
        alias = alias_name(knowledge_base)
        return [
            n for n in self.client.list_collections() if (match := _GENERATION.match(n)) and match["alias"] == alias
        ]

    def _create(self, knowledge_base: str, generation: int, dimension: int, model: str, schema: dict[str, int]) -> CollectionState:
        with self._admin_lock:
            name = collection_name(knowledge_base, generation)
            if self.client.has_collection(name):
                existing = self._state(name)
                if (existing.dimension, existing.embedding_model, existing.schema) != (dimension, model, schema):
                    raise FailedPrecondition(
                        f"knowledge_base: {shown(knowledge_base)} generation {generation} exists with another dimension, model or schema"
                    )
            else:
                collection_schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                collection_schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
                collection_schema.add_field("document_id", DataType.VARCHAR, max_length=MAX_DOCUMENT_ID_CHARS)
                collection_schema.add_field("document_version", DataType.INT64)
                collection_schema.add_field("chunk_index", DataType.INT64)
                collection_schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_CHARS)
                modes.create_text_field(collection_schema, MAX_TEXT_BYTES)
                collection_schema.add_field("metadata", DataType.JSON)
                for key, kind in schema.items():
                    extra = {"max_length": MAX_DECLARED_STRING} if kind == common_pb2.METADATA_TYPE_STRING else {}
                    collection_schema.add_field(DECLARED_PREFIX + key, _COLUMN_TYPES[kind], nullable=True, **extra)
                collection_schema.add_field(modes.DENSE_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
                index_params = MilvusClient.prepare_index_params()
                modes.add_keyword_index(collection_schema, index_params)
                index_params.add_index(
                    field_name=modes.DENSE_FIELD,
                    index_type="HNSW",
                    metric_type="COSINE",
                    params={"M": self.settings.hnsw_m, "efConstruction": self.settings.hnsw_ef_construction},
                )
                self.client.create_collection(
                    name,
                    schema=collection_schema,
                    index_params=index_params,
                    consistency_level="Strong",
                    # Collection properties survive restarts (Milvus Lite drops the description).
                    properties={EMBEDDING_MODEL_PROPERTY: model, SCHEMA_PROPERTY: json.dumps(schema)},
                )
                self.client.load_collection(name)
                log.info("created %s (dimension %d, model %s, schema %s)", name, dimension, model, schema)
            alias = alias_name(knowledge_base)
            if not self.client.has_collection(alias):
                self.client.create_alias(name, alias)
            return self._state(name)

    async def create_collection(self, request: retriever_pb2.CreateCollectionRequest) -> retriever_pb2.CollectionInfo:
        schema = check_schema(request.metadata_schema)
        generation = request.generation or 1
        await self._run(self._create, request.knowledge_base, generation, request.dimension, request.embedding_model, schema)
        return await self.describe(request.knowledge_base)

    async def switch_generation(self, knowledge_base: str, generation: int) -> retriever_pb2.CollectionInfo:
        def switch() -> None:
            with self._admin_lock:
                target = self._resolve(knowledge_base, generation)
                self.client.alter_alias(target.name, alias_name(knowledge_base))
                self._active.pop(knowledge_base, None)
                for name in self._generations(knowledge_base):
                    if name != target.name:
                        self.client.drop_collection(name)
                log.info("knowledge base %s now serves generation %d", knowledge_base, generation)

        await self._run(switch)
        return await self.describe(knowledge_base)

    async def drop(self, knowledge_base: str) -> bool:
        def drop() -> bool:
            with self._admin_lock:
                alias = alias_name(knowledge_base)
                existed = self.client.has_collection(alias)
                if existed:
                    self.client.drop_alias(alias)
                for name in self._generations(knowledge_base):
                    self.client.drop_collection(name)
                    existed = True
                self._active.pop(knowledge_base, None)
                return existed

        return await self._run(drop)

    async def describe(self, knowledge_base: str, generation: int | None = None) -> retriever_pb2.CollectionInfo:
        def describe() -> retriever_pb2.CollectionInfo:
            state = self._resolve(knowledge_base, generation)
            active = self._state(alias_name(knowledge_base)).generation if self.client.has_collection(alias_name(knowledge_base)) else 0
            rows = self.client.query(state.name, filter="", output_fields=["count(*)"])
            return retriever_pb2.CollectionInfo(
                knowledge_base=knowledge_base,
                active_generation=active,
                dimension=state.dimension,
                embedding_model=state.embedding_model,
                metadata_schema=[common_pb2.MetadataField(name=k, type=v) for k, v in state.schema.items()],
                chunk_count=int(rows[0]["count(*)"]) if rows else 0,
                keyword_search=state.keyword_index,
            )

        return await self._run(describe)

    # -- operations ------------------------------------------------------------------------
    async def search(self, request: retriever_pb2.SearchRequest) -> retriever_pb2.SearchResponse:
        """The best chunks in the mode asked (modes.py); the servicer has checked that the mode,
        the vector, the query text and the threshold go together."""
        top_k = request.top_k or self.settings.default_top_k
        vector = list(request.vector)

        def search() -> tuple[modes.ModePlan, list[Any]]:
            remembered = self._active.get(request.knowledge_base)
            if remembered is not None:
                try:
                    return search_in(remembered)
                except (MilvusException, AskmeshError):
                    # Perhaps another replica switched or dropped it since (a switch drops the
                    # generations it leaves, a rebuild that adds the keyword index included):
                    # the alias decides.
                    self._active.pop(request.knowledge_base, None)
            state = self._resolve(request.knowledge_base)
            found = search_in(state)
            self._active[request.knowledge_base] = state
            return found

        def search_in(state: CollectionState) -> tuple[modes.ModePlan, list[Any]]:
            plan = modes.plan_mode(request.search_mode, request.knowledge_base, state.keyword_index)
            if plan.mode != modes.KEYWORD:
                _check_dimension(request.knowledge_base, state, len(vector))
            expression = _and(
                build_filter(
                    request.filters,
                    max_filters=self.settings.max_filters,
                    max_values=self.settings.max_filter_values,
                    schema=state.schema,
                ),
                _pins_expression(request.pins),
            )
            # Through the alias, always: a remembered state only checks the vector and builds
            # the filter. One gone stale (another generation with another dimension or
            # schema, or none) makes this fail, and the search is made again afresh.
            alias = alias_name(request.knowledge_base)
            if plan.mode == modes.HYBRID:
                hits = self.client.hybrid_search(
                    alias,
                    modes.hybrid_requests(self.settings, vector, request.query_text, expression, top_k),
                    ranker=modes.ranker(self.settings),
                    limit=top_k,
                    output_fields=OUTPUT_FIELDS,
                )
            elif plan.mode == modes.KEYWORD:
                hits = self.client.search(
                    alias,
                    data=[request.query_text],
                    anns_field=modes.SPARSE_FIELD,
                    limit=top_k,
                    filter=expression,
                    output_fields=OUTPUT_FIELDS,
                    search_params=modes.KEYWORD_PARAMS,
                )
            else:
                hits = self.client.search(
                    alias,
                    data=[vector],
                    anns_field=modes.DENSE_FIELD,
                    limit=top_k,
                    filter=expression,
                    output_fields=OUTPUT_FIELDS,
                    search_params=modes.dense_params(self.settings, top_k),
                )
            return plan, list(hits[0])

        started = time.perf_counter()
        plan, hits = await self._run(search)
        search_s = time.perf_counter() - started
        metrics.SEARCH_LATENCY.labels("retriever").observe(search_s)
        score = modes.keyword_score if plan.mode == modes.KEYWORD else float
        threshold = request.score_threshold if request.HasField("score_threshold") and plan.mode == modes.DENSE else None
        results = [
            retriever_pb2.ScoredChunk(chunk=_chunk_from_row(hit["entity"]), score=score(hit["distance"]))
            for hit in hits
            if threshold is None or float(hit["distance"]) >= threshold
        ]
        return retriever_pb2.SearchResponse(
            results=results,
            timings=retriever_pb2.SearchTimings(search_ms=search_s * 1000),
            search_mode=plan.mode,  # type: ignore[arg-type]
            notice=plan.notice,
        )

    async def upsert(self, request: retriever_pb2.UpsertRequest) -> int:
        dimension = len(request.chunks[0].vector)
        generation = request.generation if request.HasField("generation") else None

        def upsert() -> int:
            try:
                state = self._resolve(request.knowledge_base, generation)
            except NotFound:
                if not request.create_if_missing:
                    raise
                state = self._create(request.knowledge_base, generation or 1, dimension, request.embedding_model, {})
            # Checked before anything is written; the dimension first, as the plainer reason.
            _check_dimension(request.knowledge_base, state, dimension)
            if request.embedding_model and state.embedding_model and request.embedding_model != state.embedding_model:
                raise FailedPrecondition(
                    f"embedding_model: knowledge base {shown(request.knowledge_base)} was built with "
                    f"{shown(state.embedding_model)}, not {shown(request.embedding_model)}; rebuild it to change models"
                )
            rows = []
            for index, item in enumerate(request.chunks):  # validate_chunks saw they share one length
                rows.append(_row_from_chunk(item, state.schema, f"chunks[{index}].chunk.metadata"))
            self.client.upsert(state.name, rows)
            self.client.flush(state.name)
            return len(rows)

        return await self._run(upsert)

    async def delete(self, request: retriever_pb2.DeleteRequest) -> int:
        generation = request.generation if request.HasField("generation") else None

        def delete() -> int:
            state = self._resolve(request.knowledge_base, generation)
            ids = ", ".join(literal(d, f"document_ids[{i}]") for i, d in enumerate(request.document_ids))
            expression = f"document_id in [{ids}]"
            if request.HasField("from_chunk_index"):
                expression += f" and chunk_index >= {request.from_chunk_index}"
            if request.HasField("except_version"):
                expression += f" and document_version != {request.except_version}"
            if request.HasField("below_version"):
                expression += f" and document_version < {request.below_version}"
            if request.HasField("only_version"):
                expression += f" and document_version == {request.only_version}"

            # Count first: Milvus Lite's delete result does not report rows removed by a filter.
            existing = self.client.query(state.name, filter=expression, output_fields=["id"])
            if existing:
                self.client.delete(state.name, ids=[row["id"] for row in existing])
                self.client.flush(state.name)
            return len(existing)

        return await self._run(delete)


def _check_dimension(knowledge_base: str, state: CollectionState, dimension: int) -> None:
    """Vectors of another length than a knowledge base's come from another embedding model (the
    embedder was swapped): refused as the knowledge base's state, which a rebuild changes."""
    if dimension != state.dimension:
        raise FailedPrecondition(
            f"knowledge base {shown(knowledge_base)} holds {state.dimension}-dimension vectors but got {dimension}: "
            "it was built with another embedding model; rebuild it"
        )


def _and(*expressions: str) -> str:
    parts = [e for e in expressions if e]
    return " and ".join(f"({e})" for e in parts) if len(parts) > 1 else "".join(parts)


def _pins_expression(pins: Sequence[retriever_pb2.DocumentVersionPin]) -> str:
    """Documents being changed: only their pinned version is visible (none for version 0)."""
    clauses = []
    for index, pin in enumerate(pins):
        document = literal(pin.document_id, f"pins[{index}].document_id")
        clauses.append(
            f"document_id != {document}"
            if pin.version == 0
            else f"(document_id != {document} or document_version == {pin.version})"
        )
    return " and ".join(clauses)


def _row_from_chunk(item: retriever_pb2.VectorChunk, schema: dict[str, int], where: str) -> dict[str, Any]:
    chunk = item.chunk
    metadata = json_format.MessageToDict(chunk.metadata)
    row: dict[str, Any] = {
        "id": chunk.id,
        "document_id": chunk.document_id,
        "document_version": chunk.document_version,
        "chunk_index": chunk.chunk_index,
        "title": chunk.title,
        "text": chunk.text,
        "metadata": metadata,
        "vector": list(item.vector),
    }
    for key, kind in schema.items():
        row[DECLARED_PREFIX + key] = typed_value(metadata.get(key), kind, f"{where}.{key}")
    return row


def _chunk_from_row(row: dict[str, Any]) -> common_pb2.Chunk:
    metadata = struct_pb2.Struct()
    metadata.update(row.get("metadata") or {})
    return common_pb2.Chunk(
        id=row["id"],
        document_id=row["document_id"],
        document_version=int(row["document_version"]),
        chunk_index=int(row["chunk_index"]),
        title=row["title"],
        text=row["text"],
        metadata=metadata,
    )


def validate_chunks(chunks: Sequence[retriever_pb2.VectorChunk], max_chunks: int) -> None:
    """Shape checks that need no collection (the servicer calls this before the engine)."""
    if not chunks:
        raise InvalidArgument("chunks", "must contain at least one chunk")
    if len(chunks) > max_chunks:
        raise InvalidArgument("chunks", f"{len(chunks)} chunks exceed the limit of {max_chunks} per call")
    seen: set[str] = set()
    for index, item in enumerate(chunks):
        where = f"chunks[{index}]"
        chunk = item.chunk
        if not chunk.id or len(chunk.id) > MAX_ID_LENGTH:
            raise InvalidArgument(f"{where}.chunk.id", f"must be 1 to {MAX_ID_LENGTH} characters")
        if chunk.id in seen:
            raise InvalidArgument(f"{where}.chunk.id", f"{shown(chunk.id)} appears twice in one request")
        seen.add(chunk.id)
        check_document_id(chunk.document_id, f"{where}.chunk.document_id")
        check_title(chunk.title, f"{where}.chunk.title")
        if not chunk.text.strip():
            raise InvalidArgument(f"{where}.chunk.text", "is empty")
        if len(chunk.text.encode()) > MAX_TEXT_BYTES:
            raise InvalidArgument(f"{where}.chunk.text", f"is longer than {MAX_TEXT_BYTES} bytes")
        if not item.vector:
            raise InvalidArgument(f"{where}.vector", "is empty")
    dimension = len(chunks[0].vector)
    for index, item in enumerate(chunks):
        if len(item.vector) != dimension:
            raise InvalidArgument(f"chunks[{index}].vector", f"has {len(item.vector)} dimensions; chunks[0] has {dimension}")
