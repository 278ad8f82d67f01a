"""gRPC edge of the ingestor: validation, deadlines and status codes; everything else is the
engine's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from askmesh.runtime.errors import InvalidArgument, NotFound, streaming_rpc, unary_rpc
from askmesh.runtime.validation import (
    check_count,
    check_document_id,
    check_knowledge_base_name,
    check_schema,
    check_text,
    check_title,
)
from askmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
)
from services.ingestor.config import IngestorSettings
from services.ingestor.engine import IngestorEngine
from services.ingestor.ingestion import STATE_NAMES, task_message
from services.ingestor.knowledge import document_info
from services.ingestor.store import TaskRecord
from askmesh.upstream import Deadline

def validate_add_documents(request: gateway_pb2.AddDocumentsRequest, settings: IngestorSettings) -> None:
    """Checks the documents (chunking is checked against the knowledge base's defaults later)."""
    if request.knowledge_base:
        check_knowledge_base_name(request.knowledge_base)
    check_count("documents", len(request.documents), settings.max_documents, minimum=1)
    seen: set[str] = set()
    for index, document in enumerate(request.documents):
        where = f"documents[{index}]"
        check_text(f"{where}.text", document.text, settings.max_document_chars)
        check_title(document.title, f"{where}.title")
        check_document_id(document.id, f"{where}.id", required=False)
        if document.id and document.id in seen:
            raise InvalidArgument(f"{where}.id", f"{document.id!r} appears twice in one request")
        seen.add(document.id)


class DocumentsServicer(gateway_pb2_grpc.GatewayServicer):
    """The Gateway service's AddDocuments, which Envoy's front door routes to this tier; its Ask
    is the gateway tier's and is not served here (UNIMPLEMENTED)."""

    def __init__(self, engine: IngestorEngine) -> None:
        self.engine = engine
        self.settings = engine.settings

    @unary_rpc
    async def AddDocuments(
        self, request: gateway_pb2.AddDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AddDocumentsResponse:
        validate_add_documents(request, self.settings)
        return await self.engine.add_documents(request, self.engine.deadline(context.time_remaining()))


class CatalogServicer(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, engine: IngestorEngine) -> None:
        self.engine = engine

    @unary_rpc
    async def GetSearchView(
        self, request: catalog_pb2.GetSearchViewRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.SearchView:
        if request.knowledge_base:
            check_knowledge_base_name(request.knowledge_base)
        return await self.engine.search_view(request.knowledge_base)


PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000


def page_size(requested: int) -> int:
    if requested > PAGE_SIZE_MAX:
        raise InvalidArgument("page_size", f"{requested} is out of range 1..{PAGE_SIZE_MAX}")
    return requested or PAGE_SIZE_DEFAULT


class KnowledgeBasesServicer(knowledge_pb2_grpc.KnowledgeBasesServicer):
    def __init__(self, engine: IngestorEngine) -> None:
        self.engine = engine
        self.knowledge = engine.knowledge

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return self.engine.deadline(context.time_remaining())

    @unary_rpc
    async def CreateKnowledgeBase(
        self, request: knowledge_pb2.CreateKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.KnowledgeBase:
        check_knowledge_base_name(request.name, "name")
        check_text("description", request.description, 2000, required=False)
        check_schema(request.metadata_schema)
        record = await self.knowledge.create(
            request.name, self._deadline(context), description=request.description,
            schema=request.metadata_schema, chunking=request.chunking,
        )
        return await self.knowledge.describe(record)

    @unary_rpc
    async def ListKnowledgeBases(
        self, request: knowledge_pb2.ListKnowledgeBasesRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.ListKnowledgeBasesResponse:
        records = await self.engine.list_knowledge_bases()
        return knowledge_pb2.ListKnowledgeBasesResponse(knowledge_bases=[await self.knowledge.describe(r) for r in records])

    @unary_rpc
    async def GetKnowledgeBase(
        self, request: knowledge_pb2.GetKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.KnowledgeBase:
        check_knowledge_base_name(request.name, "name")
        return await self.knowledge.describe(await self.knowledge.require(request.name))

    @unary_rpc
    async def DeleteKnowledgeBase(
        self, request: knowledge_pb2.DeleteKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteKnowledgeBaseResponse:
        check_knowledge_base_name(request.name, "name")
        try:
            deleted = await self.knowledge.delete(request.name, self._deadline(context))
        except NotFound:
            if not request.allow_missing:
                raise
            deleted = 0
        return knowledge_pb2.DeleteKnowledgeBaseResponse(deleted_documents=deleted)

    @unary_rpc
    async def RebuildKnowledgeBase(
        self, request: knowledge_pb2.RebuildKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.Task:
        check_knowledge_base_name(request.name, "name")
        queued = await self.engine.ingestion.queue_rebuild(request.name, request.chunking)
        return task_message(queued, self.engine.settings.task_max_attempts)

    @unary_rpc
    async def ListDocuments(
        self, request: knowledge_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.ListDocumentsResponse:
        check_knowledge_base_name(request.knowledge_base)
        limit = page_size(request.page_size)
        records = await self.engine.list_documents(request.knowledge_base, request.page_token, limit + 1)
        more = len(records) > limit
        records = records[:limit]
        return knowledge_pb2.ListDocumentsResponse(
            documents=[document_info(r) for r in records], next_page_token=records[-1].id if more else ""
        )

    @unary_rpc
    async def GetDocument(
        self, request: knowledge_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DocumentInfo:
        check_knowledge_base_name(request.knowledge_base)
        check_document_id(request.id, "id")
        return document_info(await self.engine.get_document(request.knowledge_base, request.id))

    @unary_rpc
    async def DeleteDocument(
        self, request: knowledge_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteDocumentResponse:
        check_knowledge_base_name(request.knowledge_base)
        check_document_id(request.id, "id")
        try:
            deleted = await self.knowledge.delete_document(request.knowledge_base, request.id, self._deadline(context))
        except NotFound:
            if not request.allow_missing:
                raise
            deleted = 0
        return knowledge_pb2.DeleteDocumentResponse(deleted_chunks=deleted)


class IngestionServicer(ingestion_pb2_grpc.IngestionServicer):
    def __init__(self, engine: IngestorEngine) -> None:
        self.engine = engine
        self.ingestion = engine.ingestion

    @unary_rpc
    async def UploadFile(
        self, request_iterator: AsyncIterator[ingestion_pb2.UploadFileRequest], context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.Task:
        messages = request_iterator.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("header", "the first message must be the header") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the header")
        header = first.header
        check_knowledge_base_name(header.knowledge_base, "header.knowledge_base")
        if header.document_id:
            check_document_id(header.document_id, "header.document_id")
        check_title(header.title, "header.title")

        async def data() -> AsyncIterator[bytes]:
            async for message in messages:
                if message.WhichOneof("part") != "data":
                    raise InvalidArgument("header", "only the first message may be a header")
                yield message.data

        deadline = self.engine.deadline(context.time_remaining())
        return self._message(await self.ingestion.receive_upload(header, data(), deadline))

    async def _task(self, task_id: str) -> ingestion_pb2.Task:
        if not task_id or len(task_id) > 64:
            raise InvalidArgument("id", "must be a task id")
        return self._message(await self.engine.get_task(task_id))

    @unary_rpc
    async def GetTask(self, request: ingestion_pb2.GetTaskRequest, context: grpc.aio.ServicerContext) -> ingestion_pb2.Task:
        return await self._task(request.id)

    @streaming_rpc(lambda error: ingestion_pb2.Task(error=f"{error.code}: {error.message}"))
    async def WatchTask(
        self, request: ingestion_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingestion_pb2.Task]:
        await self._task(request.id)
        async for record in self.ingestion.watch(request.id):
            yield self._message(record)

    @unary_rpc
    async def ListTasks(
        self, request: ingestion_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.ListTasksResponse:
        if request.knowledge_base:
            check_knowledge_base_name(request.knowledge_base)
        limit = page_size(request.page_size)
        before = None
        if request.page_token:
            created, _, task_id = request.page_token.partition("/")
            try:
                before = (float(created), task_id)
            except ValueError:
                raise InvalidArgument("page_token", "is not a token this server gave") from None
        states = [STATE_NAMES[s] for s in request.states if s in STATE_NAMES]
        records = await self.engine.list_tasks(request.knowledge_base, states, limit + 1, before)
        more = len(records) > limit
        records = records[:limit]
        token = f"{records[-1].created_at!r}/{records[-1].id}" if more else ""
        return ingestion_pb2.ListTasksResponse(tasks=[self._message(r) for r in records], next_page_token=token)

    @unary_rpc
    async def CancelTask(self, request: ingestion_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext) -> ingestion_pb2.Task:
        await self._task(request.id)
        return self._message(await self.ingestion.cancel(request.id))

    def _message(self, record: TaskRecord) -> ingestion_pb2.Task:
        return task_message(record, self.engine.settings.task_max_attempts)
