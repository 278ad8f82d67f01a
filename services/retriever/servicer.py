"""gRPC edge of the retriever: validation and status codes."""

from __future__ import annotations

import math

import grpc

from askmesh.runtime.errors import InvalidArgument, unary_rpc
from askmesh.runtime.validation import (
    check_collection_key,
    check_document_id,
    check_score_threshold,
    check_search_mode,
    search_mode_name,
)
from askmesh.v1 import retriever_pb2, retriever_pb2_grpc
from services.retriever import modes
from services.retriever.engine import RetrievalEngine, validate_chunks

MAX_DIMENSION = 32_768


class RetrieverServicer(retriever_pb2_grpc.RetrieverServicer):
    def __init__(self, engine: RetrievalEngine) -> None:
        self.engine = engine
        self.settings = engine.settings

    @unary_rpc
    async def Search(
        self, request: retriever_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.SearchResponse:
        check_collection_key(request.knowledge_base)
        check_search_mode(request.search_mode, request.HasField("score_threshold"))
        mode = request.search_mode or modes.DENSE
        if not request.vector and mode != modes.KEYWORD:
            raise InvalidArgument("vector", f"is empty; {search_mode_name(mode)} search needs the query's embedding")
        if not all(math.isfinite(x) for x in request.vector):
            raise InvalidArgument("vector", "contains NaN or infinity")
        if mode != modes.DENSE:
            if not request.query_text.strip():
                raise InvalidArgument("query_text", f"is empty; {search_mode_name(mode)} search needs the query's text")
            if len(request.query_text) > self.settings.max_query_chars:
                raise InvalidArgument(
                    "query_text", f"{len(request.query_text)} characters exceed the limit of {self.settings.max_query_chars}"
                )
        if request.top_k > self.settings.max_top_k:
            raise InvalidArgument("top_k", f"{request.top_k} is out of range 1..{self.settings.max_top_k}")
        if request.HasField("score_threshold"):
            check_score_threshold(request.score_threshold)
        for index, pin in enumerate(request.pins):
            check_document_id(pin.document_id, f"pins[{index}].document_id")
        return await self.engine.search(request)

    @unary_rpc
    async def Upsert(
        self, request: retriever_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.UpsertResponse:
        check_collection_key(request.knowledge_base)
        validate_chunks(request.chunks, self.settings.max_upsert_chunks)
        upserted = await self.engine.upsert(request)
        return retriever_pb2.UpsertResponse(upserted=upserted)

    @unary_rpc
    async def Delete(
        self, request: retriever_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.DeleteResponse:
        check_collection_key(request.knowledge_base)
        if not request.document_ids:
            raise InvalidArgument("document_ids", "must list at least one document id")
        for index, document_id in enumerate(request.document_ids):
            check_document_id(document_id, f"document_ids[{index}]")
        deleted = await self.engine.delete(request)
        return retriever_pb2.DeleteResponse(deleted=deleted)

    @unary_rpc
    async def CreateCollection(
        self, request: retriever_pb2.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.CollectionInfo:
        check_collection_key(request.knowledge_base)
        if not 1 <= request.dimension <= MAX_DIMENSION:
            raise InvalidArgument("dimension", f"{request.dimension} is out of range 1..{MAX_DIMENSION}")
        return await self.engine.create_collection(request)

    @unary_rpc
    async def SwitchGeneration(
        self, request: retriever_pb2.SwitchGenerationRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.CollectionInfo:
        check_collection_key(request.knowledge_base)
        if request.generation < 1:
            raise InvalidArgument("generation", "must be at least 1")
        return await self.engine.switch_generation(request.knowledge_base, request.generation)

    @unary_rpc
    async def DropKnowledgeBase(
        self, request: retriever_pb2.DropKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.DropKnowledgeBaseResponse:
        check_collection_key(request.knowledge_base)
        return retriever_pb2.DropKnowledgeBaseResponse(existed=await self.engine.drop(request.knowledge_base))

    @unary_rpc
    async def DescribeCollection(
        self, request: retriever_pb2.DescribeCollectionRequest, context: grpc.aio.ServicerContext
    ) -> retriever_pb2.CollectionInfo:
        check_collection_key(request.knowledge_base)
        generation = request.generation if request.HasField("generation") else None
        return await self.engine.describe(request.knowledge_base, generation)

