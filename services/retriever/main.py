"""`askmesh serve retriever`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.v1 import retriever_pb2, retriever_pb2_grpc
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine
from services.retriever.servicer import RetrieverServicer


def build(settings: RetrieverSettings) -> ServiceDefinition:
    engine = RetrievalEngine(settings)
    servicer = RetrieverServicer(engine)
    return ServiceDefinition(
        name="retriever",
        grpc_services=[retriever_pb2.DESCRIPTOR.services_by_name["Retriever"].full_name],
        add_to_server=lambda server: retriever_pb2_grpc.add_RetrieverServicer_to_server(servicer, server),
        start=engine.start,
        close=engine.close,
    )


def main() -> None:
    settings = RetrieverSettings()
    run("retriever", settings, lambda: build(settings))


if __name__ == "__main__":
    main()
