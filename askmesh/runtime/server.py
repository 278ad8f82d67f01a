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
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from askmesh.runtime import metrics
from askmesh.runtime.auth import AUTH_OFF_WARNING, Authenticator, AuthInterceptor, AuthSettings, KeyLookup, RateLimiter
from askmesh.runtime.config import ServiceSettings, TelemetrySettings
from askmesh.runtime.decoding import RequestDecoding
from askmesh.runtime.jwt_auth import JwtVerifier
from askmesh.runtime.lifecycle import CallTracker
from askmesh.runtime.telemetry import setup_telemetry

log = logging.getLogger("askmesh.server")

# After the grace period, calls still open are told to end; this is how long they get to send
# their final message before the server tears the connections down.
DRAIN_MARGIN_S = 2.0


@dataclass(frozen=True)
class ServiceDefinition:
    name: str
    # Fully qualified gRPC service names, e.g. "askmesh.v1.Embedder" (health and reflection).
    grpc_services: Sequence[str]
    add_to_server: Callable[[grpc.aio.Server], None]
    # Loads the model or connection and makes one warm-up call; raises when it cannot.
    start: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]
    # The servicer objects: the runner gives each its CallTracker (`servicer.calls`), which the
    # unary_rpc / streaming_rpc wrappers count calls in and end them with at a drain's end.
    servicers: Sequence[object] = ()
    # How this tier finds the stored API keys (None: it serves no public RPC, or it has none).
    key_lookup: KeyLookup | None = None


class Engine(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


def define_service(
    name: str,
    service: Any,  # the ServiceDescriptor, e.g. embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]
    add_servicer: Callable[[Any, grpc.aio.Server], None],
    servicer: object,
    engine: Engine,
) -> ServiceDefinition:
    """A service whose engine loads on start and whose servicer is its only gRPC service."""
    return ServiceDefinition(
        name=name,
        grpc_services=[service.full_name],
        add_to_server=lambda server: add_servicer(servicer, server),
        start=engine.start,
        close=engine.close,
        servicers=[servicer],
    )


def configure_logging(level: str, auth: AuthSettings | None = None) -> None:
    # Running without authentication says so on every line, not once among many.
    warning = "" if auth is None or auth.enabled else f"[{AUTH_OFF_WARNING}] "
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {warning}%(name)s: %(message)s",
        force=True,
    )


def auth_interceptor(auth: AuthSettings, key_lookup: KeyLookup | None) -> AuthInterceptor:
    jwt_check = JwtVerifier(auth) if auth.enabled and auth.jwks_file is not None else None
    authenticator = Authenticator(auth, key_lookup, jwt_check)
    return AuthInterceptor(authenticator, RateLimiter(auth.rate_per_s, auth.rate_burst))


def create_server(settings: ServiceSettings, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=list(interceptors),
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


class ServiceRunner:
    """One service's gRPC server and its health, from start to stop.

    `serve()` drives it from signals for a real process; tests drive it directly.
    """

    def __init__(self, definition: ServiceDefinition, settings: ServiceSettings, auth: AuthSettings | None = None) -> None:
        self.definition = definition
        self.settings = settings
        self.auth = auth if auth is not None else AuthSettings()
        self.server = create_server(settings, [auth_interceptor(self.auth, definition.key_lookup), RequestDecoding()])
        self.health = health.aio.HealthServicer()
        self._health_names = ["", *definition.grpc_services]
        self.port = 0
        self.warm_up: asyncio.Future[None] | None = None
        self.calls = CallTracker(definition.name)
        self.metrics: metrics.MetricsServer | None = None
        for servicer in definition.servicers:
            servicer.calls = self.calls  # type: ignore[attr-defined]

    async def start(self) -> None:
        """Opens the port NOT_SERVING and begins the warm-up in the background."""
        name = self.definition.name
        self.started_at = time.monotonic()
        log.info("[STARTUP] %s on %s", name, self.settings.listen_address)
        if not self.auth.enabled:
            log.warning("[STARTUP] %s: %s", name, AUTH_OFF_WARNING)
        metrics.SERVING.labels(name).set(0)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.definition.add_to_server(self.server)
        reflection.enable_server_reflection(
            [*self.definition.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        try:
            self.port = self.server.add_insecure_port(self.settings.listen_address)
        except RuntimeError as error:
            raise SystemExit(f"{name}: cannot listen on {self.settings.listen_address}: {error}") from error
        if self.settings.metrics_port:
            # Up before the model loads: a slow or failing load is visible there too.
            self.metrics = metrics.start_metrics_server(name, self.settings.host, self.settings.metrics_port)
        await self.server.start()
        self.warm_up = asyncio.ensure_future(self._warm_up())

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in self._health_names:
            await self.health.set(service, status)

    async def _warm_up(self) -> None:
        await self.definition.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        load_s = time.monotonic() - self.started_at
        metrics.MODEL_LOAD.labels(self.definition.name).set(load_s)
        metrics.SERVING.labels(self.definition.name).set(1)
        log.info("[READY] %s (load took %.1f s)", self.definition.name, load_s)

    async def stop(self) -> None:
        """NOT_SERVING at once and new calls refused; calls in flight get the grace period to
        finish; those still open then end with UNAVAILABLE ("server shutting down"), a stream
        after its final error message, rather than being reset."""
        name = self.definition.name
        if self.warm_up is not None and not self.warm_up.done():
            self.warm_up.cancel()
        await self.health.enter_graceful_shutdown()
        metrics.SERVING.labels(name).set(0)
        drain_started = time.monotonic()
        grace = self.settings.grace_period_s
        # The server refuses new calls from now on; it would cancel (reset) what is left after
        # its own grace, so that is set past ours: our expiry ends them properly first.
        stopping = asyncio.ensure_future(self.server.stop(grace + DRAIN_MARGIN_S))
        if not await self.calls.drain(grace, name):
            log.warning("[DRAINING] %s: grace period over, ending %d calls with UNAVAILABLE", name, self.calls.total)
            self.calls.expire()
        await stopping
        drain_s = time.monotonic() - drain_started
        metrics.DRAIN.labels(name).set(drain_s)
        log.info("[CLEANUP] %s (drained in %.1f s)", name, drain_s)
        try:
            await self.definition.close()
        finally:
            # Last: the metrics stay up through the drain and the cleanup.
            await self._close_metrics()

    async def _close_metrics(self) -> None:
        server, self.metrics = self.metrics, None
        if server is not None:
            await asyncio.to_thread(server.close)


async def serve(definition: ServiceDefinition, settings: ServiceSettings) -> None:
    """Serves until SIGTERM or SIGINT; a second signal stops at once. Exits 1 if warm-up fails."""
    runner = ServiceRunner(definition, settings)
    await runner.start()
    assert runner.warm_up is not None
    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("[SHUTDOWN] %s received %s", definition.name, signal.Signals(signum).name)
            stop_requested.set()
        else:
            log.warning("[SHUTDOWN] second signal: stopping %s at once", definition.name)
            asyncio.get_running_loop().create_task(runner.server.stop(0))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({runner.warm_up, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed = runner.warm_up.done() and not runner.warm_up.cancelled() and runner.warm_up.exception() is not None
    if failed:
        log.error("[SHUTDOWN] %s failed to start: %r", definition.name, runner.warm_up.exception())
    else:
        await stopping
    await runner.stop()
    if failed:
        raise SystemExit(1)


Settings = TypeVar("Settings", bound=ServiceSettings)


def run(name: str, settings: Settings, build: Callable[[Settings], ServiceDefinition]) -> None:
    """Entry point of `askmesh serve <name>`: logging, telemetry, then serve until stopped."""
    configure_logging(settings.log_level, AuthSettings())
    setup_telemetry(name, TelemetrySettings())

    async def build_and_serve() -> None:
        # Built inside the event loop: grpc.aio channels and locks bind to the running loop.
        await serve(build(settings), settings)

    asyncio.run(build_and_serve())
