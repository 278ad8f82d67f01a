"""`askmesh serve embedder`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, define_service, run
from askmesh.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.config import EmbedderSettings
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer


def build(settings: EmbedderSettings) -> ServiceDefinition:
    engine = EmbeddingEngine(settings)
    return define_service(
        "embedder",
        embedder_pb2.DESCRIPTOR.services_by_name["Embedder"],
        embedder_pb2_grpc.add_EmbedderServicer_to_server,
        EmbedderServicer(engine),
        engine,
    )


def main() -> None:
    run("embedder", EmbedderSettings(), build)


if __name__ == "__main__":
    main()
