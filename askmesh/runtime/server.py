"""The lifecycle every service shares: start, warm up, serve, drain, stop.

- Start: the port opens at once with health NOT_SERVING, so orchestrators can probe it while
  the model loads; `start()` loads the model and makes one warm-up call; then SERVING.
- SIGTERM/SIGINT: health turns NOT_SERVING at once, new calls are refused, calls in flight get
  `grace_period_s` to finish; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from askmesh.runtime.config import ServiceSettings, TelemetrySettings
from askmesh.runtime.telemetry import setup_telemetry

log = logging.getLogger("askmesh.server")


@dataclass(frozen=True)
class ServiceDefinition:
    name: str
    # Fully qualified gRPC service names, e.g. "askmesh.v1.Embedder" (health and reflection).
    grpc_services: Sequence[str]
    add_to_server: Callable[[grpc.aio.Server], None]
    # Loads the model or connection and makes one warm-up call; raises when it cannot.
    start: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def create_server(settings: ServiceSettings) -> grpc.aio.Server:
    return grpc.aio.server(
        # Every response is gzip-compressed (for clients that accept it, as grpc clients do).
        compression=grpc.Compression.Gzip,
        options=[
            # grpc sets SO_REUSEPORT by default: a second process on the same port would start
            # and silently share traffic instead of failing.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ],
    )


async def serve(definition: ServiceDefinition, settings: ServiceSettings) -> None:
    name = definition.name
    started_at = time.monotonic()
    log.info("[STARTUP] %s on %s", name, settings.listen_address)

    server = create_server(settings)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    all_names = ["", *definition.grpc_services]
    for service in all_names:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    definition.add_to_server(server)
    reflection.enable_server_reflection(
        [*definition.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        server.add_insecure_port(settings.listen_address)
    except RuntimeError as error:
        raise SystemExit(f"{name}: cannot listen on {settings.listen_address}: {error}") from error
    await server.start()

    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("[SHUTDOWN] %s received %s", name, signal.Signals(signum).name)
            stop_requested.set()
        else:
            log.warning("[SHUTDOWN] second signal: stopping %s at once", name)
            asyncio.get_running_loop().create_task(server.stop(0))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    warm_up = asyncio.ensure_future(definition.start())
    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({warm_up, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if warm_up.done() and warm_up.exception() is None:
        for service in all_names:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("[READY] %s (load took %.1f s)", name, time.monotonic() - started_at)
        await stopping
    elif warm_up.done():
        log.error("[SHUTDOWN] %s failed to start: %r", name, warm_up.exception())
        stop_requested.set()
    else:
        warm_up.cancel()

    await health_servicer.enter_graceful_shutdown()
    drain_started = time.monotonic()
    log.info("[DRAINING] %s: up to %.0f s for calls in flight", name, settings.grace_period_s)
    await server.stop(settings.grace_period_s)
    log.info("[CLEANUP] %s (drained in %.1f s)", name, time.monotonic() - drain_started)
    await definition.close()
    if warm_up.done() and not warm_up.cancelled() and warm_up.exception() is not None:
        raise SystemExit(1)


def run(
    name: str,
    settings: ServiceSettings,
    build: Callable[[], ServiceDefinition],
) -> None:
    """Entry point of `askmesh serve <name>`: logging, telemetry, then serve until stopped."""
    configure_logging(settings.log_level)
    setup_telemetry(name, TelemetrySettings())

    async def build_and_serve() -> None:
        # Built inside the event loop: grpc.aio channels and locks bind to the running loop.
        await serve(build(), settings)

    asyncio.run(build_and_serve())
