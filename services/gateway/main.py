"""`askmesh serve gateway`."""

from __future__ import annotations

from askmesh.runtime.server import ServiceDefinition, run
from askmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewaySettings
from services.gateway.engine import GatewayEngine
from services.gateway.servicer import GatewayServicer


def build(settings: GatewaySettings) -> ServiceDefinition:
    engine = GatewayEngine(settings)
    servicer = GatewayServicer(engine)
    return ServiceDefinition(
        name="gateway",
        grpc_services=[gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name],
        add_to_server=lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server),
        start=engine.start,
        close=engine.close,
    )


def main() -> None:
    settings = GatewaySettings()
    run("gateway", settings, lambda: build(settings))


if __name__ == "__main__":
    main()
