"""gRPC edge of the gateway: validation, deadlines and status codes; the rest is the engine's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from askmesh.runtime.auth import current_caller

from askmesh.runtime.errors import InvalidArgument, streaming_rpc, unary_rpc
from askmesh.runtime.validation import (
    check_count,
    check_generation_parameters,
    check_knowledge_base_name,
    check_score_threshold,
    check_search_mode,
    check_text,
)
from askmesh.v1 import common_pb2, embedder_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.engine import GatewayEngine


def validate_query(request: gateway_pb2.AskRequest | gateway_pb2.SearchQuery, settings: GatewaySettings) -> None:
    """What an Ask and a Search share: the question and how its sources are found."""
    check_text("question", request.question, settings.max_question_chars)
    if request.knowledge_base:
        check_knowledge_base_name(request.knowledge_base)
    if request.top_k > settings.max_top_k:
        raise InvalidArgument("top_k", f"{request.top_k} is out of range 1..{settings.max_top_k}")
    if request.HasField("score_threshold"):
        check_score_threshold(request.score_threshold)
    check_search_mode(request.search_mode, request.HasField("score_threshold"))


def validate_ask(request: gateway_pb2.AskRequest, settings: GatewaySettings) -> None:
    validate_query(request, settings)
    if request.context_token_budget > settings.max_context_token_budget:
        raise InvalidArgument(
            "context_token_budget", f"{request.context_token_budget} is out of range 1..{settings.max_context_token_budget}"
        )
    check_count("history", len(request.history), settings.max_history_messages)
    total = 0
    for index, message in enumerate(request.history):
        if message.role not in (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT):
            raise InvalidArgument(f"history[{index}].role", "must be ROLE_USER or ROLE_ASSISTANT")
        check_text(f"history[{index}].content", message.content, settings.max_history_chars)
        total += len(message.content)
    if total > settings.max_history_chars:
        raise InvalidArgument("history", f"{total} characters in all exceed the limit of {settings.max_history_chars}")
    # Checked here, before any work or any message: the ranges every generator shares. The
    # limits of one generator's configuration, and the filters, are checked by the generator and
    # the retriever, whose messages name the same fields (parameters...., filters[i]...).
    check_generation_parameters(request.parameters)


def validate_embed(request: gateway_pb2.EmbedTextsRequest) -> None:
    """The knowledge base's name and that there is a text; the embedder checks each text (its
    messages name the same field, texts[i])."""
    if request.knowledge_base:
        check_knowledge_base_name(request.knowledge_base)
    if not request.texts:
        raise InvalidArgument("texts", "must contain at least one text")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, engine: GatewayEngine) -> None:
        self.engine = engine
        self.settings = engine.settings

    @streaming_rpc(lambda error: gateway_pb2.AskResponse(error=error))
    async def Ask(
        self, request: gateway_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.AskResponse]:
        validate_ask(request, self.settings)
        async with contextlib.aclosing(self.engine.ask(request, current_caller(), self.engine.deadline(context.time_remaining()))) as responses:
            async for response in responses:
                yield response

    @unary_rpc
    async def Search(self, request: gateway_pb2.SearchQuery, context: grpc.aio.ServicerContext) -> gateway_pb2.SearchResults:
        validate_query(request, self.settings)
        return await self.engine.search(request, current_caller(), self.engine.deadline(context.time_remaining()))

    @unary_rpc
    async def Embed(
        self, request: gateway_pb2.EmbedTextsRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        validate_embed(request)
        return await self.engine.embed(request, current_caller(), self.engine.deadline(context.time_remaining()))
