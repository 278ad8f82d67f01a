"""gRPC edge of the gateway: validation, deadlines and status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from askmesh.runtime.errors import InvalidArgument, streaming_rpc, unary_rpc
from askmesh.runtime.validation import check_count, check_knowledge_base_name, check_text
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.engine import Deadline, GatewayEngine

MAX_TITLE_CHARS = 1024
MAX_DOCUMENT_ID_CHARS = 256


def validate_ask(request: gateway_pb2.AskRequest, settings: GatewaySettings) -> None:
    check_text("question", request.question, settings.max_question_chars)
    if request.knowledge_base:
        check_knowledge_base_name(request.knowledge_base)
    if request.top_k > settings.max_top_k:
        raise InvalidArgument("top_k", f"{request.top_k} is out of range 1..{settings.max_top_k}")
    if request.HasField("score_threshold") and not -1.0 <= request.score_threshold <= 1.0:
        raise InvalidArgument("score_threshold", f"{request.score_threshold:g} is outside [-1, 1]")
    check_count("history", len(request.history), settings.max_history_messages)
    total = 0
    for index, message in enumerate(request.history):
        if message.role not in (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT):
            raise InvalidArgument(f"history[{index}].role", "must be ROLE_USER or ROLE_ASSISTANT")
        check_text(f"history[{index}].content", message.content, settings.max_history_chars)
        total += len(message.content)
    if total > settings.max_history_chars:
        raise InvalidArgument("history", f"{total} characters in all exceed the limit of {settings.max_history_chars}")
    # Filters and generation parameters are checked by the retriever and the generator, whose
    # messages name the same fields (filters[i]..., parameters....).


def validate_add_documents(request: gateway_pb2.AddDocumentsRequest, settings: GatewaySettings) -> tuple[int, int]:
    """Checks the request; returns the (chunk size, overlap) to use."""
    if request.knowledge_base:
        check_knowledge_base_name(request.knowledge_base)
    check_count("documents", len(request.documents), settings.max_documents, minimum=1)
    seen: set[str] = set()
    for index, document in enumerate(request.documents):
        where = f"documents[{index}]"
        check_text(f"{where}.text", document.text, settings.max_document_chars)
        check_text(f"{where}.title", document.title, MAX_TITLE_CHARS, required=False)
        if len(document.id) > MAX_DOCUMENT_ID_CHARS or any(ord(c) < 0x20 for c in document.id):
            raise InvalidArgument(f"{where}.id", f"must be at most {MAX_DOCUMENT_ID_CHARS} printable characters")
        if document.id and document.id in seen:
            raise InvalidArgument(f"{where}.id", f"{document.id!r} appears twice in one request")
        seen.add(document.id)
    size = request.chunking.chunk_size or settings.chunk_size
    if not 50 <= size <= settings.max_chunk_size:
        raise InvalidArgument("chunking.chunk_size", f"{size} is out of range 50..{settings.max_chunk_size}")
    overlap = request.chunking.chunk_overlap if request.chunking.HasField("chunk_overlap") else min(settings.chunk_overlap, size // 2)
    if overlap >= size:
        raise InvalidArgument("chunking.chunk_overlap", f"{overlap} must be smaller than chunk_size {size}")
    return size, overlap


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, engine: GatewayEngine) -> None:
        self.engine = engine
        self.settings = engine.settings

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return Deadline(remaining_s=context.time_remaining(), default_s=self.settings.upstream_timeout_s)

    @streaming_rpc(lambda error: gateway_pb2.AskResponse(error=error))
    async def Ask(
        self, request: gateway_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.AskResponse]:
        validate_ask(request, self.settings)
        async for response in self.engine.ask(request, self._deadline(context)):
            yield response

    @unary_rpc
    async def AddDocuments(
        self, request: gateway_pb2.AddDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AddDocumentsResponse:
        size, overlap = validate_add_documents(request, self.settings)
        return await self.engine.add_documents(request, size, overlap, self._deadline(context))
