"""`askmesh serve retriever`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, define_service, run
from askmesh.v1 import retriever_pb2, retriever_pb2_grpc
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine
from services.retriever.servicer import RetrieverServicer


def build(settings: RetrieverSettings) -> ServiceDefinition:
    engine = RetrievalEngine(settings)
    return define_service(
        "retriever",
        retriever_pb2.DESCRIPTOR.services_by_name["Retriever"],
        retriever_pb2_grpc.add_RetrieverServicer_to_server,
        RetrieverServicer(engine),
        engine,
    )


def main() -> None:
    run("retriever", RetrieverSettings(), build)


if __name__ == "__main__":
    main()
