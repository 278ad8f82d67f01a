"""`askmesh serve embedder`: the Embedder service, and the Reranker service when a reranker is
configured (a model server, as TEI serves /embed and /rerank)."""

from __future__ import annotations

import asyncio

import grpc

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.tiers import EMBEDDER
from askmesh.v1 import embedder_pb2_grpc, reranker_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.reranking import RerankingEngine
from services.embedder.servicer import EmbedderServicer, RerankerServicer

def build(settings: EmbedderSettings) -> ServiceDefinition:
    return define_embedder(EmbeddingEngine(settings), RerankingEngine.configured(settings))


def define_embedder(embedding: EmbeddingEngine, reranking: RerankingEngine | None) -> ServiceDefinition:
    """The tier's services. The Reranker service always answers (FAILED_PRECONDITION without a
    reranker), but its health is reported only when one is configured; the replica turns SERVING
    once the embedding model and the reranker have both loaded and answered a warm-up call."""
    embedder = EmbedderServicer(embedding)
    reranker = RerankerServicer(reranking)

    def add_to_server(server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServicer_to_server(embedder, server)
        reranker_pb2_grpc.add_RerankerServicer_to_server(reranker, server)

    async def start() -> None:
        if reranking is None:
            await embedding.start()
        else:
            await asyncio.gather(embedding.start(), reranking.start())

    async def close() -> None:
        try:
            if reranking is not None:
                await reranking.close()
        finally:
            await embedding.close()

    services = [EMBEDDER.health_service] if reranking is None else list(EMBEDDER.grpc_services)
    return ServiceDefinition("embedder", services, add_to_server, start=start, close=close, servicers=[embedder, reranker])


def main() -> None:
    run("embedder", EmbedderSettings(), build)


if __name__ == "__main__":
    main()
