"""`askmesh serve gateway`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, define_service, run
from askmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.engine import GatewayEngine
from services.gateway.servicer import GatewayServicer


def build(settings: GatewaySettings) -> ServiceDefinition:
    engine = GatewayEngine(settings)
    return define_service(
        "gateway",
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
        gateway_pb2_grpc.add_GatewayServicer_to_server,
        GatewayServicer(engine),
        engine,
    )


def main() -> None:
    run("gateway", GatewaySettings(), build)


if __name__ == "__main__":
    main()
