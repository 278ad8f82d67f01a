"""`askmesh serve gateway`: the public API (Gateway, KnowledgeBases, Ingestion) in one process."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.v1 import gateway_pb2_grpc, ingestion_pb2_grpc, knowledge_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.engine import GatewayEngine
from services.gateway.servicer import GatewayServicer, IngestionServicer, KnowledgeBasesServicer

GRPC_SERVICES = ["askmesh.v1.Gateway", "askmesh.v1.KnowledgeBases", "askmesh.v1.Ingestion"]


def build(settings: GatewaySettings) -> ServiceDefinition:
    engine = GatewayEngine(settings)
    gateway, knowledge, ingestion = GatewayServicer(engine), KnowledgeBasesServicer(engine), IngestionServicer(engine)

    def add_to_server(server: object) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)
        knowledge_pb2_grpc.add_KnowledgeBasesServicer_to_server(knowledge, server)
        ingestion_pb2_grpc.add_IngestionServicer_to_server(ingestion, server)

    return ServiceDefinition(
        "gateway", GRPC_SERVICES, add_to_server, start=engine.start, close=engine.close,
        servicers=[gateway, knowledge, ingestion],
    )


def main() -> None:
    run("gateway", GatewaySettings(), build)


if __name__ == "__main__":
    main()
