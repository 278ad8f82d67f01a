"""`askmesh serve gateway`: the public Ask stream."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.tiers import GATEWAY
from askmesh.v1 import gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.engine import GatewayEngine
from services.gateway.servicer import GatewayServicer


def build(settings: GatewaySettings) -> ServiceDefinition:
    engine = GatewayEngine(settings)
    gateway = GatewayServicer(engine)

    def add_to_server(server: object) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(gateway, server)

    return ServiceDefinition(
        "gateway", GATEWAY.grpc_services, add_to_server, start=engine.start, close=engine.close, servicers=[gateway]
    )


def main() -> None:
    run("gateway", GatewaySettings(), build)


if __name__ == "__main__":
    main()
