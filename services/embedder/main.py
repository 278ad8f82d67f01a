"""`askmesh serve embedder`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer


def build(settings: EmbedderSettings) -> ServiceDefinition:
    engine = EmbeddingEngine(settings)
    servicer = EmbedderServicer(engine)
    return ServiceDefinition(
        name="embedder",
        grpc_services=[embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name],
        add_to_server=lambda server: embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server),
        start=engine.start,
        close=engine.close,
    )


def main() -> None:
    settings = EmbedderSettings()
    run("embedder", settings, lambda: build(settings))


if __name__ == "__main__":
    main()
