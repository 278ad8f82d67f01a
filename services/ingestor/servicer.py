"""gRPC edge of the ingestor: validation, deadlines and status codes; everything else is the
engine's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf import timestamp_pb2

from askmesh.runtime.auth import DEFAULT_TENANT, Caller, Role, check_tenant, current_caller, key_hash, new_key
from askmesh.runtime.errors import (
    AskmeshError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    streaming_rpc,
    unary_rpc,
    with_name_for_key,
)
from askmesh.runtime.validation import (
    check_count,
    check_document_id,
    check_knowledge_base_name,
    check_schema,
    check_text,
    check_title,
)
from askmesh.upstream import Deadline
from askmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
)
from services.ingestor.config import IngestorSettings
from services.ingestor.engine import IngestorEngine
from services.ingestor.ingestion import STATE_NAMES, task_message
from services.ingestor.knowledge import document_info
from services.ingestor.store import ApiKeyRecord, DocumentRecord, KnowledgeBaseRecord, TaskRecord
from services.ingestor.tenancy import belongs_to, name_of, store_key


class TenantScope:
    """The caller's tenant, for one call: turns the names a caller uses into the store's keys
    (tenancy.py), and keys in replies and errors back into names."""

    def __init__(self, default_name: str) -> None:
        self.tenant = current_caller().tenant
        self._default_name = default_name
        self._renamed: dict[str, str] = {}

    def key(self, name: str) -> str:
        name = name or self._default_name
        key = store_key(self.tenant, name)
        self._renamed[key] = name
        return key

    def owns(self, key: str) -> bool:
        return belongs_to(key, self.tenant)

    def error(self, error: AskmeshError) -> AskmeshError:
        for key, name in self._renamed.items():
            error = with_name_for_key(error, key, name)
        return error

    @contextlib.contextmanager
    def naming_errors(self) -> Iterator[None]:
        """Errors raised inside name the caller's knowledge bases, never the store's keys."""
        try:
            yield
        except AskmeshError as error:
            raise self.error(error) from error

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
        scope = TenantScope(self.settings.default_knowledge_base)
        request.knowledge_base = scope.key(request.knowledge_base)
        with scope.naming_errors():
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
        tenant = request.tenant or DEFAULT_TENANT
        check_tenant(tenant)
        name = request.knowledge_base or self.engine.settings.default_knowledge_base
        key = store_key(tenant, name)
        try:
            view = await self.engine.search_view(key)
        except AskmeshError as error:
            raise with_name_for_key(error, key, name) from error
        view.knowledge_base = name
        return view

    @unary_rpc
    async def Authenticate(
        self, request: catalog_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.Principal:
        if len(request.key_hash) != 64:
            raise InvalidArgument("key_hash", "must be the 64 hex digits of a SHA-256")
        found = await self.engine.store.find_api_key(request.key_hash)
        if found is None:
            raise NotFound("key_hash: no valid key has this hash")
        return catalog_pb2.Principal(tenant=found.tenant, role=found.role, key_id=found.id)


PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000


def page_size(requested: int) -> int:
    if requested > PAGE_SIZE_MAX:
        raise InvalidArgument("page_size", f"{requested} is out of range 1..{PAGE_SIZE_MAX}")
    return requested or PAGE_SIZE_DEFAULT


class KnowledgeBasesServicer(knowledge_pb2_grpc.KnowledgeBasesServicer):
    """Every call is inside the caller's tenant (TenantScope): another tenant's knowledge bases
    are NOT_FOUND, as if they did not exist."""

    def __init__(self, engine: IngestorEngine) -> None:
        self.engine = engine
        self.knowledge = engine.knowledge

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return self.engine.deadline(context.time_remaining())

    def _scope(self) -> TenantScope:
        return TenantScope(self.engine.settings.default_knowledge_base)

    async def _described(self, record: KnowledgeBaseRecord) -> knowledge_pb2.KnowledgeBase:
        message = await self.knowledge.describe(record)
        message.name = name_of(message.name)
        return message

    @unary_rpc
    async def CreateKnowledgeBase(
        self, request: knowledge_pb2.CreateKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.KnowledgeBase:
        check_knowledge_base_name(request.name, "name")
        check_text("description", request.description, 2000, required=False)
        check_schema(request.metadata_schema)
        scope = self._scope()
        with scope.naming_errors():
            record = await self.knowledge.create(
                scope.key(request.name), self._deadline(context), description=request.description,
                schema=request.metadata_schema, chunking=request.chunking, search_mode=request.search_mode,
            )
            return await self._described(record)

    @unary_rpc
    async def ListKnowledgeBases(
        self, request: knowledge_pb2.ListKnowledgeBasesRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.ListKnowledgeBasesResponse:
        scope = self._scope()
        records = [r for r in await self.engine.list_knowledge_bases() if scope.owns(r.name)]
        return knowledge_pb2.ListKnowledgeBasesResponse(knowledge_bases=[await self._described(r) for r in records])

    @unary_rpc
    async def GetKnowledgeBase(
        self, request: knowledge_pb2.GetKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.KnowledgeBase:
        check_knowledge_base_name(request.name, "name")
        scope = self._scope()
        with scope.naming_errors():
            return await self._described(await self.knowledge.require(scope.key(request.name)))

    @unary_rpc
    async def DeleteKnowledgeBase(
        self, request: knowledge_pb2.DeleteKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteKnowledgeBaseResponse:
        check_knowledge_base_name(request.name, "name")
        scope = self._scope()
        with scope.naming_errors():
            try:
                deleted = await self.knowledge.delete(scope.key(request.name), self._deadline(context))
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
        scope = self._scope()
        with scope.naming_errors():
            queued = await self.engine.ingestion.queue_rebuild(scope.key(request.name), request.chunking, request.search_mode)
        return public_task(queued, self.engine.settings.task_max_attempts)

    @unary_rpc
    async def ListDocuments(
        self, request: knowledge_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.ListDocumentsResponse:
        check_knowledge_base_name(request.knowledge_base)
        limit = page_size(request.page_size)
        scope = self._scope()
        with scope.naming_errors():
            records = await self.engine.list_documents(scope.key(request.knowledge_base), request.page_token, limit + 1)
        more = len(records) > limit
        records = records[:limit]
        return knowledge_pb2.ListDocumentsResponse(
            documents=[public_document(r) for r in records], next_page_token=records[-1].id if more else ""
        )

    @unary_rpc
    async def GetDocument(
        self, request: knowledge_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DocumentInfo:
        check_knowledge_base_name(request.knowledge_base)
        check_document_id(request.id, "id")
        scope = self._scope()
        with scope.naming_errors():
            return public_document(await self.engine.get_document(scope.key(request.knowledge_base), request.id))

    @unary_rpc
    async def DeleteDocument(
        self, request: knowledge_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteDocumentResponse:
        check_knowledge_base_name(request.knowledge_base)
        check_document_id(request.id, "id")
        scope = self._scope()
        with scope.naming_errors():
            try:
                deleted = await self.knowledge.delete_document(scope.key(request.knowledge_base), request.id, self._deadline(context))
            except NotFound:
                if not request.allow_missing:
                    raise
                deleted = 0
        return knowledge_pb2.DeleteDocumentResponse(deleted_chunks=deleted)


def public_task(record: TaskRecord, max_attempts: int) -> ingestion_pb2.Task:
    """A task as its tenant sees it: its knowledge base by name, not by store key."""
    message = task_message(record, max_attempts)
    message.knowledge_base = name_of(message.knowledge_base)
    return message


def public_document(record: DocumentRecord) -> knowledge_pb2.DocumentInfo:
    message = document_info(record)
    if message.knowledge_base:
        message.knowledge_base = name_of(message.knowledge_base)
    return message


class IngestionServicer(ingestion_pb2_grpc.IngestionServicer):
    """Tasks are their knowledge base's tenant's: another tenant's are NOT_FOUND."""

    def __init__(self, engine: IngestorEngine) -> None:
        self.engine = engine
        self.ingestion = engine.ingestion

    def _scope(self) -> TenantScope:
        return TenantScope(self.engine.settings.default_knowledge_base)

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
        scope = self._scope()
        header.knowledge_base = scope.key(header.knowledge_base)

        async def data() -> AsyncIterator[bytes]:
            async for message in messages:
                if message.WhichOneof("part") != "data":
                    raise InvalidArgument("header", "only the first message may be a header")
                yield message.data

        deadline = self.engine.deadline(context.time_remaining())
        with scope.naming_errors():
            return self._message(await self.ingestion.receive_upload(header, data(), deadline))

    async def _task(self, task_id: str) -> TaskRecord:
        if not task_id or len(task_id) > 64:
            raise InvalidArgument("id", "must be a task id")
        record = await self.engine.get_task(task_id)
        if not self._scope().owns(record.knowledge_base):
            raise NotFound(f"id: task {task_id!r} does not exist")
        return record

    @unary_rpc
    async def GetTask(self, request: ingestion_pb2.GetTaskRequest, context: grpc.aio.ServicerContext) -> ingestion_pb2.Task:
        return self._message(await self._task(request.id))

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
        scope = self._scope()
        knowledge_base = scope.key(request.knowledge_base) if request.knowledge_base else ""
        records = await self.engine.list_tasks(knowledge_base, scope.tenant, states, limit + 1, before)
        more = len(records) > limit
        records = records[:limit]
        token = f"{records[-1].created_at!r}/{records[-1].id}" if more else ""
        return ingestion_pb2.ListTasksResponse(tasks=[self._message(r) for r in records], next_page_token=token)

    @unary_rpc
    async def CancelTask(self, request: ingestion_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext) -> ingestion_pb2.Task:
        await self._task(request.id)
        return self._message(await self.ingestion.cancel(request.id))

    def _message(self, record: TaskRecord) -> ingestion_pb2.Task:
        return public_task(record, self.engine.settings.task_max_attempts)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def key_message(record: ApiKeyRecord) -> keys_pb2.ApiKey:
    message = keys_pb2.ApiKey(
        id=record.id, tenant=record.tenant, role=record.role, description=record.description,
        created_at=_timestamp(record.created_at),
    )
    if record.revoked_at:
        message.revoked_at.CopyFrom(_timestamp(record.revoked_at))
    return message


class ApiKeysServicer(keys_pb2_grpc.ApiKeysServicer):
    """A tenant's admins manage their tenant's keys; the operator manages every tenant's. A key
    is shown once, when it is made: the store keeps only its hash."""

    def __init__(self, engine: IngestorEngine) -> None:
        self.store = engine.store

    @staticmethod
    def _tenant(caller: Caller, requested: str, field: str = "tenant") -> str:
        tenant = check_tenant(requested, field) if requested else caller.tenant
        if tenant != caller.tenant and not caller.operator:
            raise PermissionDenied(f"{field}: only the operator's key manages the keys of another tenant")
        return tenant

    @unary_rpc
    async def CreateKey(self, request: keys_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.CreatedKey:
        caller = current_caller()
        tenant = self._tenant(caller, request.tenant)
        try:
            role = Role.parse(request.role)
        except ValueError as error:
            raise InvalidArgument("role", str(error)) from None
        check_text("description", request.description, 200, required=False)
        key_id, secret = new_key()
        record = await self.store.create_api_key(
            ApiKeyRecord(id=key_id, key_hash=key_hash(secret), tenant=tenant, role=role.label, description=request.description)
        )
        return keys_pb2.CreatedKey(key=key_message(record), secret=secret)

    @unary_rpc
    async def ListKeys(self, request: keys_pb2.ListKeysRequest, context: grpc.aio.ServicerContext) -> keys_pb2.ListKeysResponse:
        tenant = self._tenant(current_caller(), request.tenant)
        records = await self.store.list_api_keys(tenant, include_revoked=request.include_revoked)
        return keys_pb2.ListKeysResponse(keys=[key_message(r) for r in records])

    @unary_rpc
    async def RevokeKey(self, request: keys_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.ApiKey:
        if not request.id or len(request.id) > 64:
            raise InvalidArgument("id", "must be a key id, as `askmesh keys list` shows")
        caller = current_caller()
        return key_message(await self.store.revoke_api_key(request.id, None if caller.operator else caller.tenant))
