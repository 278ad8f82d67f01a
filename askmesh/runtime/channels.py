"""Client channels between tiers (and from the CLI)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.runtime.auth import credential_interceptors
from askmesh.runtime.config import DEFAULT_MAX_MESSAGE_BYTES, check_address

# Streams of a slow model can be silent for a while: keepalive pings keep idle HTTP/2
# connections (and Envoy's) from being dropped without cutting anything. Messages are held to
# the servers' default limit both ways: a larger one would be refused at the other end anyway,
# and a reply that large is not one a tier should buffer.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
]

# A health check sent through a proxy that routes many tiers on one address (the local mesh's
# Envoy) names the tier's gRPC service in this header too, so the proxy can route it: the
# service name inside the request is not visible to it. Elsewhere the header is ignored.
HEALTH_SERVICE_HEADER = "askmesh-health-service"
# While a tier waits for the tiers it calls, at start: how long one health check may take, how
# often each is asked, and how often the wait is logged (a model can take a minute to load).
READY_CHECK_TIMEOUT_S = 2.0
READY_POLL_INTERVAL_S = 0.5
READY_LOG_INTERVAL_S = 10.0


def open_channel(
    address: str, credential: str | None = None, root_certificates: bytes | None = None
) -> grpc.aio.Channel:
    """A channel to `host:port` whose calls carry `credential` as a bearer token (none when
    None): TLS trusting `root_certificates` (PEM) when given, else plaintext (the tiers' own
    calls, on loopback through Envoy's internal listener); raises ValueError for a malformed
    address."""
    check_address(address)
    interceptors = credential_interceptors(credential)
    if root_certificates is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)


async def health_of(channel: grpc.aio.Channel, service: str) -> str:
    """The service's health as one word ("SERVING", "NOT_SERVING"), or why it did not answer
    ("UNAVAILABLE: ...")."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=READY_CHECK_TIMEOUT_S,
            metadata=[(HEALTH_SERVICE_HEADER, service)],
        )
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
