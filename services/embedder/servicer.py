"""gRPC edge of the embedder: validation and status codes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from askmesh.runtime.errors import InvalidArgument, unary_rpc
from askmesh.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine


def validate_texts(texts: Sequence[str], settings: EmbedderSettings) -> None:
    if not texts:
        raise InvalidArgument("texts", "must contain at least one text")
    if len(texts) > settings.max_batch_size:
        raise InvalidArgument(
            "texts", f"{len(texts)} texts exceed the limit of {settings.max_batch_size} per call"
        )
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"texts[{index}]", "is empty")
        if len(text) > settings.max_text_chars:
            raise InvalidArgument(
                f"texts[{index}]",
                f"has {len(text)} characters; the limit is {settings.max_text_chars}",
            )


BACKENDS = ("torch", "onnx")


def validate_swap(request: common_pb2.SwapModelRequest) -> None:
    if not request.model_path.strip():
        raise InvalidArgument("model_path", "is empty")
    if request.backend and request.backend not in BACKENDS:
        raise InvalidArgument("backend", f"{request.backend!r} must be one of {', '.join(BACKENDS)} (empty: keep the current one)")


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine

    @unary_rpc
    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        received_at = time.perf_counter()
        validate_texts(request.texts, self.engine.settings)
        batch = await self.engine.embed(request.texts)
        return embedder_pb2.EmbedResponse(
            embeddings=[embedder_pb2.Embedding(values=vector.tolist()) for vector in batch.vectors],
            model=batch.model,
            dimension=batch.dimension,
            timings=embedder_pb2.EmbedTimings(
                queue_ms=batch.queue_ms,
                inference_ms=batch.inference_ms,
                total_ms=(time.perf_counter() - received_at) * 1000,
            ),
        )

    @unary_rpc
    async def GetModel(self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self.engine.model_info()

    @unary_rpc
    async def SwapModel(
        self, request: common_pb2.SwapModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        validate_swap(request)
        return await self.engine.swap(
            Path(request.model_path),
            name=request.model_name.strip(),
            backend=request.backend,
            allow_dimension_change=request.allow_dimension_change,
        )
