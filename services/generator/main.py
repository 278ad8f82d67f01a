"""`askmesh serve generator`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.v1 import generator_pb2, generator_pb2_grpc
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer


def build(settings: GeneratorSettings) -> ServiceDefinition:
    engine = GenerationEngine(settings)
    servicer = GeneratorServicer(engine)
    return ServiceDefinition(
        name="generator",
        grpc_services=[generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name],
        add_to_server=lambda server: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, server),
        start=engine.start,
        close=engine.close,
    )


def main() -> None:
    settings = GeneratorSettings()
    run("generator", settings, lambda: build(settings))


if __name__ == "__main__":
    main()
