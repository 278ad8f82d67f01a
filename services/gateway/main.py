"""`askmesh serve gateway`: the public Ask stream."""

from __future__ import annotations

from askmesh.runtime.auth import AuthSettings, CachedLookup
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

    # The ingestor owns the keys; an answer about one is trusted for a few seconds, so that a
    # caller's every question does not cost another call.
    key_lookup = CachedLookup(engine.upstreams.authenticate, AuthSettings().lookup_ttl_s)
    return ServiceDefinition(
        "gateway", GATEWAY.grpc_services, add_to_server, start=engine.start, close=engine.close, servicers=[gateway],
        key_lookup=key_lookup,
    )


def main() -> None:
    run("gateway", GatewaySettings(), build)


if __name__ == "__main__":
    main()
