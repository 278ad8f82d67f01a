"""Knowledge bases and documents: records in the durable store, chunks in the retriever tier.

A document update is atomic for readers: the new version's chunks are written while the store
pins the document to its old version (searches pass the pins to the retriever), then one store
commit makes the new version the visible one, and the old chunks are removed after.

Every change that spans the store and the retriever records its intent in the store first
(a pending version, a document or knowledge base marked deleting or creating, a committed
version settling), under a lease its request renews as it goes; each later step is idempotent.
A request that dies anywhere in between leaves an intent with an expired lease, which the
reconciler (reconciler.py) finishes or undoes, and which a retry of the same call takes over:
nothing stays locked and no half-done change becomes visible. `crash_point` marks each step
boundary for the crash-point tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from askmesh.runtime.crashpoints import crash_point
from askmesh.runtime.errors import AskmeshError, FailedPrecondition, InvalidArgument, NotFound, with_name_for_key
from askmesh.runtime.validation import SEARCH_MODE_BY_NAME, check_search_mode, search_mode_name, typed_value
from askmesh.v1 import (
    catalog_pb2,
    common_pb2,
    embedder_pb2,
    knowledge_pb2,
    retriever_pb2,
)
from askmesh.upstream import Deadline, Upstreams
from services.ingestor.chunking import SectionChunk, chunk_sections
from services.ingestor.config import IngestorSettings
from services.ingestor.parsing import Section
from services.ingestor.repository import Repository
from services.ingestor.store import KB_CREATING, KB_DELETING, DocumentRecord, KnowledgeBaseRecord

T = TypeVar("T")
PROBE_TEXT = "askmesh dimension probe"
# How often a write waiting for another write of the same document looks again.
OTHER_WRITE_POLL_S = 0.2


async def about(record: KnowledgeBaseRecord, call: Awaitable[T]) -> T:
    """The retriever's answer for the record's collections; its errors name the knowledge base,
    not its collection key, which a caller never sees."""
    try:
        return await call
    except AskmeshError as error:
        renamed = with_name_for_key(error, record.collection, record.name)
        if renamed is error:
            raise
        raise renamed from error


def new_collection_id() -> str:
    """The retriever's key for a new knowledge base's collections: letters and digits only, so
    it can never look like another's collection generation (`<key>__g<n>`)."""
    return "c" + uuid.uuid4().hex


MIN_CHUNK_SIZE = 50

def stored_search_mode(mode: int, field: str = "search_mode") -> str:
    """A knowledge base's default search mode as the store keeps it: "dense", "keyword" or
    "hybrid"; "" (UNSPECIFIED) follows the server's default_search_mode."""
    check_search_mode(mode, field=field)
    return search_mode_name(mode) if mode else ""


def effective_search_mode(record: KnowledgeBaseRecord, default: str) -> int:
    """The mode a knowledge base's questions search in when they do not say."""
    return SEARCH_MODE_BY_NAME[record.search_mode or default]


def resolve_chunking(
    options: common_pb2.ChunkingOptions,
    *,
    default_size: int,
    default_overlap: int,
    max_size: int,
    field: str = "chunking",
) -> tuple[int, int]:
    """The chunk size and overlap a write uses: the request's where set, else the defaults (the
    knowledge base's; its overlap capped at half the size, so one stored before that limit
    keeps working), checked together. At most half a chunk may overlap the previous one: more
    makes the chunks of a text up to chunk_size times its length (see chunking.check_chunking)."""
    size = options.chunk_size or default_size
    if not MIN_CHUNK_SIZE <= size <= max_size:
        raise InvalidArgument(f"{field}.chunk_size", f"{size} is out of range {MIN_CHUNK_SIZE}..{max_size}")
    overlap = options.chunk_overlap if options.HasField("chunk_overlap") else min(default_overlap, size // 2)
    if overlap >= size:
        raise InvalidArgument(f"{field}.chunk_overlap", f"{overlap} must be smaller than chunk_size {size}")
    if overlap > size // 2:
        raise InvalidArgument(f"{field}.chunk_overlap", f"{overlap} is more than half of chunk_size {size} ({size // 2})")
    return size, overlap


@dataclass
class StoreTimings:
    """Where a write's time went: waiting on the embedder, and on the retriever."""

    embed_s: float = 0.0
    upsert_s: float = 0.0


def content_hash(write: DocumentWrite, embedding_model: str) -> str:
    """What a document's chunks are made from: the same hash means a write would change nothing."""
    material = json.dumps(
        [write.title, write.metadata, sections_to_json(write.sections), write.chunk_size, write.chunk_overlap,
         write.file_name, write.content_type, embedding_model],
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def chunk_id_for(knowledge_base: str, document_id: str, version: int, index: int) -> str:
    """Deterministic: writing the same version again (a resumed task) overwrites, never duplicates."""
    return hashlib.sha256(f"{knowledge_base}\0{document_id}\0{version}\0{index}".encode()).hexdigest()[:40]


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(values)
    return result


@dataclass
class DocumentWrite:
    """One document to store: where it goes, what it says and how to cut it."""

    knowledge_base: KnowledgeBaseRecord
    document_id: str
    title: str
    metadata: dict[str, Any]
    sections: list[Section]
    chunk_size: int
    chunk_overlap: int
    file_name: str = ""
    content_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Its chunks of text when already cut (off the event loop, within the caller's chunk
    # limit); None: plan_chunks cuts them itself.
    pieces: list[SectionChunk] | None = field(default=None, repr=False, compare=False)

    @property
    def size_bytes(self) -> int:
        return sum(len(s.text.encode()) for s in self.sections)


def sections_to_json(sections: Sequence[Section]) -> list[dict[str, Any]]:
    return [{"text": s.text, "page": s.page, "heading": s.heading} for s in sections]


def sections_from_json(items: Sequence[dict[str, Any]]) -> list[Section]:
    return [Section(text=i["text"], page=i.get("page"), heading=i.get("heading")) for i in items]


class KnowledgeEngine:
    def __init__(self, settings: IngestorSettings, store: Repository, upstreams: Upstreams) -> None:
        self.settings = settings
        self.store = store
        self.upstreams = upstreams

    # -- knowledge bases -------------------------------------------------------------------
    async def probe_embedder(self, deadline: Deadline) -> tuple[str, int]:
        """The embedding model the embedder tier serves now, and its dimension."""
        reply = await self.upstreams.embed([PROBE_TEXT], deadline)
        return reply.model, reply.dimension

    async def create(
        self,
        name: str,
        deadline: Deadline,
        *,
        description: str = "",
        schema: Sequence[common_pb2.MetadataField] = (),
        chunking: common_pb2.ChunkingOptions | None = None,
        search_mode: int = common_pb2.SEARCH_MODE_UNSPECIFIED,
    ) -> KnowledgeBaseRecord:
        chunk_size, chunk_overlap = resolve_chunking(
            chunking or common_pb2.ChunkingOptions(),
            default_size=self.settings.chunk_size,
            default_overlap=self.settings.chunk_overlap,
            max_size=self.settings.max_chunk_size,
        )
        wanted = dict(
            description=description,
            metadata_schema=[(f.name, int(f.type)) for f in schema],
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            search_mode=stored_search_mode(search_mode),
        )
        existing = await self.store.get_knowledge_base(name)
        if existing is not None:
            return await self._existing_for_create(existing, wanted, deadline)
        model, dimension = await self.probe_embedder(deadline)
        record = KnowledgeBaseRecord(
            name=name, collection=new_collection_id(), embedding_model=model, dimension=dimension, generation=1,
            state=KB_CREATING, lease_until=time.time() + self.settings.write_lease_s, **wanted,  # type: ignore[arg-type]
        )
        try:
            created = await self.store.create_knowledge_base(record)
        except AskmeshError as error:
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            raced = await self.store.get_knowledge_base(name)  # another request won
            if raced is None:
                raise
            return await self._existing_for_create(raced, wanted, deadline)
        crash_point("kb.create.recorded")
        try:
            return await self.finish_create(created, deadline)
        except AskmeshError:
            await self.store.delete_knowledge_base(name)  # refused: leaves no trace
            raise

    async def _existing_for_create(
        self, existing: KnowledgeBaseRecord, wanted: dict[str, Any], deadline: Deadline
    ) -> KnowledgeBaseRecord:
        """A create of a name that exists: the same knowledge base again is a retry (answered
        with it, finishing an interrupted create first); anything else is ALREADY_EXISTS."""
        name = existing.name
        if existing.state == KB_DELETING:
            raise FailedPrecondition(f"name: knowledge base {name!r} is being deleted; create it again once that has finished")
        same = all(getattr(existing, key) == value for key, value in wanted.items())
        if not same:
            raise AskmeshError(f"name: knowledge base {name!r} already exists", code=grpc.StatusCode.ALREADY_EXISTS)
        if existing.ready:
            return existing
        if not await self.store.lease_knowledge_base(name, state=KB_CREATING, lease_s=self.settings.write_lease_s, now=time.time()
        ):
            raise FailedPrecondition(f"name: knowledge base {name!r} is being created by another request; try again in a moment")
        return await self.finish_create(existing, deadline)

    async def finish_create(self, record: KnowledgeBaseRecord, deadline: Deadline) -> KnowledgeBaseRecord:
        """Creates the collection (idempotent) and makes the knowledge base ready."""
        request = retriever_pb2.CreateCollectionRequest(
            knowledge_base=record.collection, generation=record.generation, dimension=record.dimension,
            embedding_model=record.embedding_model,
            metadata_schema=[common_pb2.MetadataField(name=n, type=t) for n, t in record.metadata_schema],  # type: ignore[arg-type]
        )
        await about(record, self.upstreams.create_collection(request, deadline))
        crash_point("kb.create.collection")
        return await self.store.update_knowledge_base(record.name, state="ready", lease_until=0.0)

    async def require(self, name: str) -> KnowledgeBaseRecord:
        record = await self.store.read_knowledge_base(name)
        if record is None or not record.ready:  # one being created or deleted does not exist yet, or any more
            raise NotFound(f"knowledge_base: {name!r} does not exist")
        return record

    async def describe(self, record: KnowledgeBaseRecord) -> knowledge_pb2.KnowledgeBase:
        documents, chunks, size = await self.store.knowledge_base_stats(record.name)
        return knowledge_pb2.KnowledgeBase(
            name=record.name,
            description=record.description,
            metadata_schema=[common_pb2.MetadataField(name=n, type=t) for n, t in record.metadata_schema],  # type: ignore[arg-type]
            chunking=common_pb2.ChunkingOptions(chunk_size=record.chunk_size, chunk_overlap=record.chunk_overlap),
            embedding_model=record.embedding_model,
            dimension=record.dimension,
            document_count=documents,
            chunk_count=chunks,
            size_bytes=size,
            generation=record.generation,
            state=(
                knowledge_pb2.KNOWLEDGE_BASE_STATE_REBUILDING
                if record.rebuilding_generation
                else knowledge_pb2.KNOWLEDGE_BASE_STATE_READY
            ),
            created_at=timestamp(record.created_at),
            updated_at=timestamp(record.updated_at),
            search_mode=effective_search_mode(record, self.settings.default_search_mode),  # type: ignore[arg-type]
        )

    async def delete(self, name: str, deadline: Deadline) -> int:
        """Tombstone first (the knowledge base is gone for readers and writers from here on),
        then its collections, then its records: a retry after a crash anywhere takes it up."""
        record = await self.store.get_knowledge_base(name)
        if record is None:
            raise NotFound(f"name: knowledge base {name!r} does not exist")
        deleted = await self.store.begin_knowledge_base_delete(name, lease_s=self.settings.write_lease_s, now=time.time()
        )
        crash_point("kb.delete.marked")
        await self.finish_delete(record, deadline)
        return deleted

    async def finish_delete(self, record: KnowledgeBaseRecord, deadline: Deadline) -> None:
        request = retriever_pb2.DropKnowledgeBaseRequest(knowledge_base=record.collection)
        await about(record, self.upstreams.drop_knowledge_base(request, deadline))
        crash_point("kb.delete.dropped")
        await self.store.finish_knowledge_base_delete(record.name)

    def chunking_for(
        self, record: KnowledgeBaseRecord, options: common_pb2.ChunkingOptions, field: str = "chunking"
    ) -> tuple[int, int]:
        return resolve_chunking(
            options,
            default_size=record.chunk_size,
            default_overlap=record.chunk_overlap,
            max_size=self.settings.max_chunk_size,
            field=field,
        )

    def check_metadata(self, record: KnowledgeBaseRecord, metadata: dict[str, Any], where: str) -> None:
        for name, declared in record.metadata_schema:
            typed_value(metadata.get(name), declared, f"{where}.{name}")

    # -- documents -------------------------------------------------------------------------
    def cut(self, write: DocumentWrite, max_chunks: int | None) -> list[SectionChunk]:
        """The document's chunks of text, refused (TooManyChunks) as soon as there are more than
        max_chunks. CPU-bound and linear in the text: callers run it off the event loop
        (asyncio.to_thread) and hand the pieces to plan_chunks. A write planned before overlaps
        were limited to half the size (a task queued then) is cut with the most allowed."""
        overlap = min(write.chunk_overlap, write.chunk_size // 2)
        return chunk_sections(write.sections, write.chunk_size, overlap, max_chunks)

    def plan_chunks(
        self, write: DocumentWrite, version: int, pieces: Sequence[SectionChunk] | None = None
    ) -> list[common_pb2.Chunk]:
        """The chunks to store for a version: from `pieces` (cut off the event loop) where
        given, else write.pieces, else cut here (on the caller's thread, without a limit)."""
        if pieces is None:
            pieces = write.pieces if write.pieces is not None else self.cut(write, None)
        chunks = []
        for index, piece in enumerate(pieces):
            metadata = dict(write.metadata)
            text = piece.text
            if piece.page is not None:
                metadata["page"] = piece.page
            if piece.heading:
                metadata["section"] = piece.heading
                # The heading says what the chunk is about: it helps the embedding find it.
                text = f"{piece.heading}\n\n{text}"
            chunks.append(
                common_pb2.Chunk(
                    id=chunk_id_for(write.knowledge_base.name, write.document_id, version, index),
                    document_id=write.document_id,
                    document_version=version,
                    chunk_index=index,
                    title=write.title,
                    text=text,
                    metadata=struct(metadata),
                )
            )
        return chunks

    async def store_chunks(
        self,
        knowledge_base: KnowledgeBaseRecord,
        chunks: Sequence[common_pb2.Chunk],
        deadline: Deadline,
        *,
        generation: int | None = None,
        start_batch: int = 0,
        after_batch: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> StoreTimings:
        """Embeds and upserts chunks batch by batch; `after_batch(batches_done, chunks_stored)`
        is the checkpoint a task records (and where it notices a cancel)."""
        batch_size = self.settings.ingest_batch_size
        timings = StoreTimings()
        for batch_index, start in enumerate(range(0, len(chunks), batch_size)):
            if batch_index < start_batch:
                continue
            batch = chunks[start : start + batch_size]
            vectors: list[embedder_pb2.Embedding] = []
            model = ""
            embed_started = time.perf_counter()
            for offset in range(0, len(batch), self.settings.embed_batch_size):
                texts = [c.text for c in batch[offset : offset + self.settings.embed_batch_size]]
                reply = await self.upstreams.embed(texts, deadline)
                vectors.extend(reply.embeddings)
                model = reply.model
            upsert = retriever_pb2.UpsertRequest(
                knowledge_base=knowledge_base.collection,
                chunks=[retriever_pb2.VectorChunk(chunk=c, vector=v.values) for c, v in zip(batch, vectors)],
                embedding_model=model,
            )
            if generation is not None:
                upsert.generation = generation
            upsert_started = time.perf_counter()
            await about(knowledge_base, self.upstreams.upsert(upsert, deadline))
            crash_point("doc.write.batch")
            timings.embed_s += upsert_started - embed_started
            timings.upsert_s += time.perf_counter() - upsert_started
            if after_batch is not None:
                await after_batch(batch_index + 1, start + len(batch))
        return timings

    async def remove_versions(
        self,
        knowledge_base: str,
        document_id: str,
        deadline: Deadline,
        *,
        below: int = 0,
        only: int = 0,
        generation: int | None = None,
    ) -> int:
        """Removes a document's stored chunks: those of versions older than `below`, or of
        version `only`, or (neither) all of them."""
        record = await self.store.get_knowledge_base(knowledge_base)
        if record is None:
            return 0  # gone: its collections went with it
        request = retriever_pb2.DeleteRequest(knowledge_base=record.collection, document_ids=[document_id])
        if below:
            request.below_version = below
        if only:
            request.only_version = only
        if generation is not None:
            request.generation = generation
        reply = await about(record, self.upstreams.delete_chunks(request, deadline))
        return reply.deleted

    async def begin_version(self, write: DocumentWrite, owner: str, wait_s: float = 0.0) -> int:
        """Starts writing a new version for `owner` (a request or a task), invisible until
        finish_version; the write holds a lease that `renew` keeps. Another write or a delete
        of the document under way is waited for, up to `wait_s` (then FailedPrecondition): it
        ends, or its lease runs out (its request died) and this write takes over."""
        if write.knowledge_base.rebuilding_generation:
            raise FailedPrecondition(
                f"knowledge_base: {write.knowledge_base.name!r} is being rebuilt; documents can change after the rebuild"
            )
        give_up = time.monotonic() + wait_s
        while True:
            try:
                version = await self.store.begin_document_version(write.knowledge_base.name,
                    write.document_id,
                    title=write.title,
                    metadata=write.metadata,
                    file_name=write.file_name,
                    content_type=write.content_type,
                    now=time.time(),
                    owner=owner,
                    lease_s=self.settings.write_lease_s,
                    content_hash=content_hash(write, write.knowledge_base.embedding_model),
                )
                break
            except FailedPrecondition:
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(OTHER_WRITE_POLL_S)
        crash_point("doc.write.begun")
        return version

    async def renew(self, write: DocumentWrite, version: int, owner: str) -> None:
        """Keeps the write's lease (and takes it back after a restart of its task); FailedPrecondition
        when the version was given up meanwhile (its writer was thought dead)."""
        if not await self.store.renew_document_lease(write.knowledge_base.name,
            write.document_id,
            version,
            owner=owner,
            lease_s=self.settings.write_lease_s,
            now=time.time(),
        ):
            raise FailedPrecondition(
                f"document {write.document_id!r}: the write stopped for too long and was given up; write it again"
            )

    async def unchanged(self, write: DocumentWrite) -> DocumentRecord | None:
        """The visible document when it was made from exactly this content (a write would change
        nothing: a retry, or `askmesh up` loading the samples again)."""
        current = await self.store.get_document(write.knowledge_base.name, write.document_id)
        if current is None or not current.visible or current.pending_version or current.settling:
            return None
        return current if current.content_hash == content_hash(write, write.knowledge_base.embedding_model) else None

    async def finish_version(self, write: DocumentWrite, version: int, chunk_count: int, deadline: Deadline) -> DocumentRecord:
        """Makes `version` the visible one with one store commit, then removes the older chunks.

        Until they are gone the document stays pinned to `version` (the store's "settling"), so
        a search never sees two versions; a question that read the pins just before the commit
        notices the epoch moved and searches again."""
        name = write.knowledge_base.name
        current = await self.store.get_document(name, write.document_id)
        if current is None or current.version != version:
            current = await self.store.commit_document_version(name,
                write.document_id,
                version,
                chunk_count=chunk_count,
                size_bytes=write.size_bytes,
                now=time.time(),
                lease_s=self.settings.write_lease_s,
            )
        crash_point("doc.write.committed")
        await self.settle(name, write.document_id, version, deadline)
        return current

    async def settle(self, knowledge_base: str, document_id: str, version: int, deadline: Deadline) -> None:
        """Removes the versions older than the committed `version`, then unpins the document."""
        await self.remove_versions(knowledge_base, document_id, deadline, below=version)
        crash_point("doc.write.settled_chunks")
        await self.store.finish_settling(knowledge_base, document_id)
        # A version abandoned by a write this one took over had its chunks removed just now.
        await self.store.forget_abandoned_versions_below(knowledge_base, document_id, version)
        await self.store.delete_sources(knowledge_base, document_id, except_version=version)

    async def abandon_version(self, write: DocumentWrite, version: int, deadline: Deadline) -> None:
        """Removes what a failed or cancelled write stored; the visible version stays as it was."""
        name = write.knowledge_base.name
        # Recorded as abandoned first: if this dies before its chunks are gone, the reconciler
        # removes them.
        await self.store.abort_document_version(name, write.document_id, version)
        await self.forget_version(name, write.document_id, version, deadline)

    async def forget_version(self, knowledge_base: str, document_id: str, version: int, deadline: Deadline) -> None:
        """Removes an abandoned version's chunks, then its record."""
        await self.remove_versions(knowledge_base, document_id, deadline, only=version)
        await self.store.forget_abandoned_version(knowledge_base, document_id, version)

    async def write_document(self, write: DocumentWrite, deadline: Deadline) -> tuple[DocumentRecord, StoreTimings]:
        """The whole write of one document, inline (AddDocuments); the same content again is
        answered with the stored document and writes nothing."""
        unchanged = await self.unchanged(write)
        if unchanged is not None:
            return unchanged, StoreTimings()
        owner = f"request-{uuid.uuid4().hex}"
        # A write of the same document under way (or left by a request that died, until its
        # lease runs out) is waited for rather than refused: writes of one document take turns.
        version = await self.begin_version(write, owner, wait_s=min(deadline.unary_timeout(), 2 * self.settings.write_lease_s))
        try:
            chunks = self.plan_chunks(write, version)
            if len(chunks) > self.settings.max_chunks_per_task:
                raise InvalidArgument(
                    "documents", f"{write.document_id!r} makes {len(chunks)} chunks; the limit is {self.settings.max_chunks_per_task}"
                )
            await self.store.save_source(write.knowledge_base.name, write.document_id, version, sections_to_json(write.sections))

            async def renewed(batches_done: int, chunks_stored: int) -> None:
                await self.renew(write, version, owner)

            timings = await self.store_chunks(write.knowledge_base, chunks, deadline, after_batch=renewed)
        except BaseException:
            await asyncio.shield(self.abandon_version(write, version, deadline))
            raise
        return await self.finish_version(write, version, len(chunks), deadline), timings

    async def delete_document(self, knowledge_base: str, document_id: str, deadline: Deadline) -> int:
        record = await self.require(knowledge_base)
        if record.rebuilding_generation:
            raise FailedPrecondition(f"knowledge_base: {knowledge_base!r} is being rebuilt; documents can change after the rebuild")
        await self.store.begin_document_delete(knowledge_base,
            document_id,
            owner=f"request-{uuid.uuid4().hex}",
            lease_s=self.settings.write_lease_s,
            now=time.time(),
        )
        crash_point("doc.delete.marked")
        return await self.finish_document_delete(knowledge_base, document_id, deadline)

    async def finish_document_delete(self, knowledge_base: str, document_id: str, deadline: Deadline) -> int:
        deleted = await self.remove_versions(knowledge_base, document_id, deadline)
        crash_point("doc.delete.removed")
        await self.store.finish_document_delete(knowledge_base, document_id)
        return deleted

    async def search_view(self, name: str) -> catalog_pb2.SearchView:
        """What a search of the knowledge base needs: its generation, and the pins and epoch of
        its documents' visibility (knowledge.py's module docstring says why)."""
        record = await self.require(name)
        epoch, pins = await self.store.read_visibility(name)
        return catalog_pb2.SearchView(
            knowledge_base=name,
            collection=record.collection,
            generation=record.generation,
            epoch=epoch,
            pins=[retriever_pb2.DocumentVersionPin(document_id=d, version=v) for d, v in pins],
            search_mode=effective_search_mode(record, self.settings.default_search_mode),  # type: ignore[arg-type]
        )


def document_info(record: DocumentRecord) -> knowledge_pb2.DocumentInfo:
    return knowledge_pb2.DocumentInfo(
        id=record.id,
        knowledge_base=record.knowledge_base,
        title=record.title,
        metadata=struct(record.metadata),
        version=record.version,
        chunk_count=record.chunk_count,
        size_bytes=record.size_bytes,
        file_name=record.file_name,
        content_type=record.content_type,
        updated_at=timestamp(record.updated_at),
    )
