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

    def add_to_server(server: object) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(engine), server)
        knowledge_pb2_grpc.add_KnowledgeBasesServicer_to_server(KnowledgeBasesServicer(engine), server)
        ingestion_pb2_grpc.add_IngestionServicer_to_server(IngestionServicer(engine), server)

    return ServiceDefinition("gateway", GRPC_SERVICES, add_to_server, start=engine.start, close=engine.close)


def main() -> None:
    run("gateway", GatewaySettings(), build)


if __name__ == "__main__":
    main()
