"""The ingestor's engine: what its servicers call, over the store and the embedder and retriever
tiers; no server here.

It owns everything that writes: knowledge bases, documents (AddDocuments and uploads), ingestion
and rebuild tasks, the reconciler, and the search view the gateway reads before each search.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from google.protobuf import json_format

from askmesh.runtime.errors import InvalidArgument, NotFound
from askmesh.tiers import INGESTOR
from askmesh.runtime.auth import AuthSettings
from askmesh.upstream import Deadline, Upstreams
from askmesh.v1 import catalog_pb2, gateway_pb2
from services.ingestor.chunking import SectionChunk, TooManyChunks, chunk_sections
from services.ingestor.config import IngestorSettings
from services.ingestor.ingestion import Ingestion
from services.ingestor.knowledge import DocumentWrite, KnowledgeEngine, resolve_chunking
from services.ingestor.parsing import Section
from services.ingestor.reconciler import Reconciler
from services.ingestor.repository import Repository
from services.ingestor.store import DocumentRecord, KnowledgeBaseRecord, TaskRecord, open_store
from services.ingestor.tenancy import key_range


def document_id_for(document: gateway_pb2.Document) -> str:
    return document.id or "sha256-" + hashlib.sha256(document.text.encode()).hexdigest()[:32]


class IngestorEngine:
    def __init__(self, settings: IngestorSettings) -> None:
        self.settings = settings
        self.upstreams = Upstreams(
            {
                "embedder": settings.embedder_address,
                "retriever": settings.retriever_address,
                "generator": settings.generator_address,
            },
            AuthSettings().internal_token(),
        )
        self.store = Repository(open_store(settings.store_url))
        self.knowledge = KnowledgeEngine(settings, self.store, self.upstreams)
        self.ingestion = Ingestion(settings, self.store, self.knowledge, self.upstreams)
        self.reconciler = Reconciler(settings, self.store, self.knowledge)

    async def start(self) -> None:
        """Ready (SERVING) once the embedder and the retriever have answered SERVING once and
        what a crash left half done is finished or undone; the workers start then."""
        await self.upstreams.wait_until_serving(list(INGESTOR.needs))
        await self.reconciler.run_once_logged()
        self.reconciler.start()
        self.ingestion.start()

    async def close(self) -> None:
        await self.reconciler.stop()
        await self.ingestion.stop()
        await self.upstreams.close()
        self.store.close()

    def deadline(self, remaining_s: float | None) -> Deadline:
        return Deadline(remaining_s=remaining_s, default_s=self.settings.upstream_timeout_s)

    # -- what the gateway reads ----------------------------------------------------------------
    async def search_view(self, knowledge_base: str) -> catalog_pb2.SearchView:
        return await self.knowledge.search_view(knowledge_base or self.settings.default_knowledge_base)

    # -- knowledge bases and documents ---------------------------------------------------------
    async def list_knowledge_bases(self) -> list[KnowledgeBaseRecord]:
        """Those that exist: one being created or deleted is not there yet, or any more."""
        return [record for record in await self.store.list_knowledge_bases() if record.ready]

    async def list_documents(self, knowledge_base: str, after_id: str, limit: int) -> list[DocumentRecord]:
        await self.knowledge.require(knowledge_base)
        return await self.store.list_documents(knowledge_base, after_id=after_id, limit=limit)

    async def get_document(self, knowledge_base: str, document_id: str) -> DocumentRecord:
        await self.knowledge.require(knowledge_base)
        record = await self.store.get_document(knowledge_base, document_id)
        if record is None or not record.visible:
            raise NotFound(f"id: document {document_id!r} does not exist in {knowledge_base!r}")
        return record

    # -- tasks ---------------------------------------------------------------------------------
    async def get_task(self, task_id: str) -> TaskRecord:
        record = await self.store.get_task(task_id)
        if record is None:
            raise NotFound(f"id: task {task_id!r} does not exist")
        return record

    async def list_tasks(
        self, knowledge_base: str, tenant: str, states: list[str], limit: int, before: tuple[float, str] | None
    ) -> list[TaskRecord]:
        """Newest first: those of `knowledge_base` (a store key), else all of `tenant`'s."""
        return await self.store.list_tasks(
            knowledge_base=knowledge_base, states=states, limit=limit, before=before,
            key_range=key_range(tenant), bare_keys_only=key_range(tenant) is None,
        )

    # -- AddDocuments --------------------------------------------------------------------------
    async def add_documents(
        self, request: gateway_pb2.AddDocumentsRequest, deadline: Deadline
    ) -> gateway_pb2.AddDocumentsResponse:
        """Stores text documents inline; each replaces its earlier version atomically. A missing
        knowledge base is created (with the server's defaults) once the request is known good."""
        name = request.knowledge_base or self.settings.default_knowledge_base
        record = await self.store.get_knowledge_base(name)
        if record is not None and not record.ready:
            record = None  # being created (perhaps by a request that crashed): create takes it over
        if record is None:
            chunk_size, chunk_overlap = resolve_chunking(
                request.chunking,
                default_size=self.settings.chunk_size,
                default_overlap=self.settings.chunk_overlap,
                max_size=self.settings.max_chunk_size,
            )
        else:
            chunk_size, chunk_overlap = self.knowledge.chunking_for(record, request.chunking)
        most = self.settings.max_chunks_per_request

        def cut() -> list[list[SectionChunk]]:
            """Each document's chunks of text, at most max_chunks_per_request in all."""
            pieces: list[list[SectionChunk]] = []
            left = most
            for document in request.documents:
                pieces.append(chunk_sections([Section(text=document.text)], chunk_size, chunk_overlap, left))
                left -= len(pieces[-1])
            return pieces

        # Cut before anything is created or stored, and off the event loop (a 2 MB document is
        # up to seconds of CPU); the request's chunk limit stops it as soon as it is exceeded.
        try:
            pieces = await asyncio.to_thread(cut)
        except TooManyChunks:
            raise InvalidArgument(
                "documents", f"the documents make more than {most} chunks, the limit per request (max_chunks_per_request)"
            ) from None
        if record is None:
            record = await self.knowledge.create(name, deadline)
        writes = []
        for index, document in enumerate(request.documents):
            metadata: dict[str, Any] = json_format.MessageToDict(document.metadata)
            self.knowledge.check_metadata(record, metadata, f"documents[{index}].metadata")
            writes.append(
                DocumentWrite(
                    knowledge_base=record,
                    document_id=document_id_for(document),
                    title=document.title,
                    metadata=metadata,
                    sections=[Section(text=document.text)],
                    chunk_size=chunk_size,
                    chunk_overlap=chunk_overlap,
                    pieces=pieces[index],
                )
            )
        results = []
        embed_s = upsert_s = 0.0
        for write in writes:
            stored, timings = await self.knowledge.write_document(write, deadline)
            results.append(gateway_pb2.DocumentResult(id=stored.id, chunk_count=stored.chunk_count))
            embed_s += timings.embed_s
            upsert_s += timings.upsert_s
        return gateway_pb2.AddDocumentsResponse(
            documents=results,
            chunk_count=sum(r.chunk_count for r in results),
            embed_ms=embed_s * 1000,
            upsert_ms=upsert_s * 1000,
        )

