"""gRPC edge of the embedder: validation and status codes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from askmesh.runtime.errors import FailedPrecondition, InvalidArgument, shown, unary_rpc
from askmesh.runtime.validation import check_text
from askmesh.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, reranker_pb2, reranker_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.reranking import RerankingEngine

NO_RERANKER = (
    "embedder: no reranker is configured on this replica "
    "(set ASKMESH_EMBEDDER_RERANKER_MODEL_PATH to a cross-encoder folder or ASKMESH_EMBEDDER_RERANKER_URL to a TEI server)"
)


def validate_texts(texts: Sequence[str], max_texts: int, max_chars: int) -> None:
    if not texts:
        raise InvalidArgument("texts", "must contain at least one text")
    if len(texts) > max_texts:
        raise InvalidArgument("texts", f"{len(texts)} texts exceed the limit of {max_texts} per call")
    for index, text in enumerate(texts):
        check_text(f"texts[{index}]", text, max_chars)


def embedding_wire_form(vector: np.ndarray) -> bytes:
    """An `Embedding` message, serialized: field 1 packed, which is the vector's own float32
    little-endian bytes after a tag and a length. Parsing it is ~4x faster than
    `Embedding(values=vector.tolist())`, which makes a Python float of each value first."""
    data = vector.astype("<f4", copy=False).tobytes()
    length = bytearray()
    size = len(data)
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return b"\x0a" + bytes(length) + data


BACKENDS = ("torch", "onnx")


def validate_swap(request: common_pb2.SwapModelRequest) -> None:
    if not request.model_path.strip():
        raise InvalidArgument("model_path", "is empty")
    if request.backend and request.backend not in BACKENDS:
        raise InvalidArgument("backend", f"{shown(request.backend)} must be one of {', '.join(BACKENDS)} (empty: keep the current one)")


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine

    @unary_rpc
    async def Embed(
        self, request: embedder_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedder_pb2.EmbedResponse:
        received_at = time.perf_counter()
        validate_texts(request.texts, self.engine.settings.max_batch_size, self.engine.settings.max_text_chars)
        batch = await self.engine.embed(request.texts)
        response = embedder_pb2.EmbedResponse(
            model=batch.model,
            dimension=batch.dimension,
            token_count=batch.tokens,
            timings=embedder_pb2.EmbedTimings(
                queue_ms=batch.queue_ms,
                inference_ms=batch.inference_ms,
                total_ms=(time.perf_counter() - received_at) * 1000,
            ),
        )
        for vector in batch.vectors:
            response.embeddings.add().ParseFromString(embedding_wire_form(vector))
        # Float vectors hardly compress (gzip saves ~7% of one), and gzipping every response
        # costs more CPU per call than the rest of building it: sent as they are.
        context.disable_next_message_compression()
        return response

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


def validate_rerank(request: reranker_pb2.RerankRequest, settings: EmbedderSettings) -> None:
    check_text("query", request.query, settings.max_text_chars)
    validate_texts(request.texts, settings.reranker_max_texts, settings.max_text_chars)
    if request.HasField("top_n") and request.top_n == 0:
        raise InvalidArgument("top_n", "must be at least 1 when set")


class RerankerServicer(reranker_pb2_grpc.RerankerServicer):
    """The Reranker service; a replica without a reranker (engine None) answers every call
    FAILED_PRECONDITION in one sentence, rather than UNIMPLEMENTED."""

    def __init__(self, engine: RerankingEngine | None) -> None:
        self.engine = engine

    def _engine(self) -> RerankingEngine:
        if self.engine is None:
            raise FailedPrecondition(NO_RERANKER)
        return self.engine

    @unary_rpc
    async def Rerank(
        self, request: reranker_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> reranker_pb2.RerankResponse:
        received_at = time.perf_counter()
        engine = self._engine()
        validate_rerank(request, engine.settings)
        ranking = await engine.rerank(
            request.query, request.texts, request.top_n if request.HasField("top_n") else None
        )
        return reranker_pb2.RerankResponse(
            ranks=[reranker_pb2.RankedText(index=index, score=score) for index, score in ranking.ranks],
            model=ranking.model,
            timings=reranker_pb2.RerankTimings(
                queue_ms=ranking.queue_ms,
                inference_ms=ranking.inference_ms,
                total_ms=(time.perf_counter() - received_at) * 1000,
            ),
        )

    @unary_rpc
    async def GetModel(self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        return self._engine().model_info()
