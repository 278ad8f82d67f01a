"""`askmesh serve generator`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, define_service, run
from askmesh.v1 import generator_pb2, generator_pb2_grpc
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer


def build(settings: GeneratorSettings) -> ServiceDefinition:
    engine = GenerationEngine(settings)
    return define_service(
        "generator",
        generator_pb2.DESCRIPTOR.services_by_name["Generator"],
        generator_pb2_grpc.add_GeneratorServicer_to_server,
        GeneratorServicer(engine),
        engine,
    )


def main() -> None:
    run("generator", GeneratorSettings(), build)


if __name__ == "__main__":
    main()
