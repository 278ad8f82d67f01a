"""`askmesh serve ingestor`: knowledge bases, documents, uploads and ingestion tasks
(KnowledgeBases, Ingestion, the Gateway service's AddDocuments), API keys, and the gateway's
Catalog."""

from __future__ import annotations

from askmesh.runtime.auth import Caller, Role
from askmesh.runtime.server import ServiceDefinition, run
from askmesh.tiers import INGESTOR
from askmesh.v1 import catalog_pb2_grpc, gateway_pb2_grpc, ingestion_pb2_grpc, keys_pb2_grpc, knowledge_pb2_grpc
from services.ingestor.config import IngestorSettings
from services.ingestor.engine import IngestorEngine
from services.ingestor.servicer import (
    ApiKeysServicer,
    CatalogServicer,
    DocumentsServicer,
    IngestionServicer,
    KnowledgeBasesServicer,
)


def build(settings: IngestorSettings) -> ServiceDefinition:
    engine = IngestorEngine(settings)
    knowledge, ingestion = KnowledgeBasesServicer(engine), IngestionServicer(engine)
    documents, catalog, keys = DocumentsServicer(engine), CatalogServicer(engine), ApiKeysServicer(engine)

    async def key_lookup(hashed: str) -> Caller | None:
        found = await engine.store.find_api_key(hashed)
        return None if found is None else Caller(tenant=found.tenant, role=Role.parse(found.role), key_id=found.id)

    def add_to_server(server: object) -> None:
        knowledge_pb2_grpc.add_KnowledgeBasesServicer_to_server(knowledge, server)
        ingestion_pb2_grpc.add_IngestionServicer_to_server(ingestion, server)
        catalog_pb2_grpc.add_CatalogServicer_to_server(catalog, server)
        gateway_pb2_grpc.add_GatewayServicer_to_server(documents, server)
        keys_pb2_grpc.add_ApiKeysServicer_to_server(keys, server)

    return ServiceDefinition(
        "ingestor", INGESTOR.grpc_services, add_to_server, start=engine.start, close=engine.close,
        servicers=[knowledge, ingestion, documents, catalog, keys], key_lookup=key_lookup,
    )


def main() -> None:
    run("ingestor", IngestorSettings(), build)


if __name__ == "__main__":
    main()
