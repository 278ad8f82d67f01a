"""Chunk storage and vector search in Milvus, without gRPC.

One collection per knowledge base (`kb_<name>`): primary key `id` (deterministic chunk id, so an
upsert of the same chunk replaces it), document id and chunk index as scalar fields, title and
text, metadata as JSON, and the vector with an HNSW index on cosine similarity. Every write is
flushed: Milvus Lite searches unflushed rows about 50x slower.

pymilvus is blocking, so every call runs on a small thread pool off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from pymilvus import DataType, MilvusClient, MilvusException

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from askmesh.v1 import common_pb2, retriever_pb2
from services.retriever.config import RetrieverSettings
from services.retriever.filters import build_filter, literal

log = logging.getLogger("askmesh.retriever")

COLLECTION_PREFIX = "kb_"
OUTPUT_FIELDS = ["id", "document_id", "chunk_index", "title", "text", "metadata"]
EMBEDDING_MODEL_PROPERTY = "askmesh.embedding_model"
MAX_ID_LENGTH = 128
MAX_DOCUMENT_ID_LENGTH = 256
MAX_TITLE_LENGTH = 1024
MAX_TEXT_BYTES = 65_535

T = TypeVar("T")


def collection_name(knowledge_base: str) -> str:
    return COLLECTION_PREFIX + knowledge_base


@dataclass(frozen=True)
class CollectionInfo:
    dimension: int
    embedding_model: str


class RetrievalEngine:
    def __init__(self, settings: RetrieverSettings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="retriever-milvus")
        self._collections: dict[str, CollectionInfo] = {}
        # Creating a collection is check-then-act: serialize it within this replica.
        self._create_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def _connect(self) -> MilvusClient:
        uri = self.settings.milvus_uri
        if "://" not in uri:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        client = MilvusClient(uri=uri, token=self.settings.milvus_token)
        # After a restart collections are "released" until loaded again.
        for name in client.list_collections():
            if name.startswith(COLLECTION_PREFIX):
                client.load_collection(name)
        return client

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._client = await loop.run_in_executor(self._executor, self._connect)
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
    def _describe(self, knowledge_base: str) -> CollectionInfo | None:
        cached = self._collections.get(knowledge_base)
        if cached is not None:
            return cached
        name = collection_name(knowledge_base)
        if not self.client.has_collection(name):
            return None
        description = self.client.describe_collection(name)
        dimension = next(
            int(f["params"]["dim"]) for f in description["fields"] if f["name"] == "vector"
        )
        model = (description.get("properties") or {}).get(EMBEDDING_MODEL_PROPERTY, "")
        info = CollectionInfo(dimension=dimension, embedding_model=model)
        self._collections[knowledge_base] = info
        return info

    def _require(self, knowledge_base: str) -> CollectionInfo:
        info = self._describe(knowledge_base)
        if info is None:
            raise NotFound(f"knowledge_base: {knowledge_base!r} does not exist")
        return info

    def _create(self, knowledge_base: str, dimension: int, embedding_model: str) -> CollectionInfo:
        with self._create_lock:
            existing = self._describe(knowledge_base)
            if existing is not None:
                return existing
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
            schema.add_field("document_id", DataType.VARCHAR, max_length=MAX_DOCUMENT_ID_LENGTH)
            schema.add_field("chunk_index", DataType.INT64)
            schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_LENGTH)
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
            schema.add_field("metadata", DataType.JSON)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
            index_params = MilvusClient.prepare_index_params()
            index_params.add_index(
                field_name="vector",
                index_type="HNSW",
                metric_type="COSINE",
                params={"M": self.settings.hnsw_m, "efConstruction": self.settings.hnsw_ef_construction},
            )
            name = collection_name(knowledge_base)
            self.client.create_collection(
                name,
                schema=schema,
                index_params=index_params,
                consistency_level="Strong",
                # Collection properties survive restarts (Milvus Lite drops the description).
                properties={EMBEDDING_MODEL_PROPERTY: embedding_model},
            )
            self.client.load_collection(name)
            log.info("created knowledge base %s (dimension %d, model %s)", knowledge_base, dimension, embedding_model)
            return self._require(knowledge_base)

    # -- operations ------------------------------------------------------------------------
    async def search(self, request: retriever_pb2.SearchRequest) -> retriever_pb2.SearchResponse:
        top_k = request.top_k or self.settings.default_top_k
        expression = build_filter(
            request.filters,
            max_filters=self.settings.max_filters,
            max_values=self.settings.max_filter_values,
        )
        vector = list(request.vector)

        def search() -> list[Any]:
            info = self._require(request.knowledge_base)
            if len(vector) != info.dimension:
                raise InvalidArgument(
                    "vector", f"has {len(vector)} dimensions; knowledge base {request.knowledge_base!r} has {info.dimension}"
                )
            hits = self.client.search(
                collection_name(request.knowledge_base),
                data=[vector],
                anns_field="vector",
                limit=top_k,
                filter=expression,
                output_fields=OUTPUT_FIELDS,
                search_params={"metric_type": "COSINE", "params": {"ef": max(self.settings.hnsw_ef_search, top_k)}},
            )
            return list(hits[0])

        started = time.perf_counter()
        hits = await self._run(search)
        search_ms = (time.perf_counter() - started) * 1000
        results = []
        for hit in hits:
            score = float(hit["distance"])
            if request.HasField("score_threshold") and score < request.score_threshold:
                continue
            results.append(retriever_pb2.ScoredChunk(chunk=_chunk_from_row(hit["entity"]), score=score))
        return retriever_pb2.SearchResponse(
            results=results, timings=retriever_pb2.SearchTimings(search_ms=search_ms)
        )

    async def upsert(self, request: retriever_pb2.UpsertRequest) -> int:
        rows = [_row_from_chunk(item) for item in request.chunks]
        dimension = len(request.chunks[0].vector)

        def upsert() -> int:
            info = self._describe(request.knowledge_base)
            if info is None:
                if not request.create_if_missing:
                    raise NotFound(f"knowledge_base: {request.knowledge_base!r} does not exist")
                info = self._create(request.knowledge_base, dimension, request.embedding_model)
            if request.embedding_model and info.embedding_model and request.embedding_model != info.embedding_model:
                raise FailedPrecondition(
                    f"embedding_model: knowledge base {request.knowledge_base!r} was built with "
                    f"{info.embedding_model!r}, not {request.embedding_model!r}; rebuild it to change models"
                )
            for index, item in enumerate(request.chunks):
                if len(item.vector) != info.dimension:
                    raise InvalidArgument(
                        f"chunks[{index}].vector",
                        f"has {len(item.vector)} dimensions; knowledge base {request.knowledge_base!r} has {info.dimension}",
                    )
            name = collection_name(request.knowledge_base)
            self.client.upsert(name, rows)
            self.client.flush(name)
            return len(rows)

        return await self._run(upsert)

    async def delete(self, request: retriever_pb2.DeleteRequest) -> int:
        def delete() -> int:
            self._require(request.knowledge_base)
            ids = ", ".join(literal(d, f"document_ids[{i}]") for i, d in enumerate(request.document_ids))
            expression = f"document_id in [{ids}]"
            if request.HasField("from_chunk_index"):
                expression += f" and chunk_index >= {request.from_chunk_index}"
            name = collection_name(request.knowledge_base)
            # Count first: Milvus Lite's delete result does not report rows removed by a filter.
            existing = self.client.query(name, filter=expression, output_fields=["id"])
            if existing:
                self.client.delete(name, ids=[row["id"] for row in existing])
                self.client.flush(name)
            return len(existing)

        return await self._run(delete)


def _row_from_chunk(item: retriever_pb2.VectorChunk) -> dict[str, Any]:
    chunk = item.chunk
    return {
        "id": chunk.id,
        "document_id": chunk.document_id,
        "chunk_index": chunk.chunk_index,
        "title": chunk.title,
        "text": chunk.text,
        "metadata": json_format.MessageToDict(chunk.metadata),
        "vector": list(item.vector),
    }


def _chunk_from_row(row: dict[str, Any]) -> common_pb2.Chunk:
    metadata = struct_pb2.Struct()
    metadata.update(row.get("metadata") or {})
    return common_pb2.Chunk(
        id=row["id"],
        document_id=row["document_id"],
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
            raise InvalidArgument(f"{where}.chunk.id", f"{chunk.id!r} appears twice in one request")
        seen.add(chunk.id)
        if not chunk.document_id or len(chunk.document_id) > MAX_DOCUMENT_ID_LENGTH:
            raise InvalidArgument(f"{where}.chunk.document_id", f"must be 1 to {MAX_DOCUMENT_ID_LENGTH} characters")
        if len(chunk.title) > MAX_TITLE_LENGTH:
            raise InvalidArgument(f"{where}.chunk.title", f"must be at most {MAX_TITLE_LENGTH} characters")
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
