"""Prometheus metrics shared by every service, and the HTTP server that exposes them.

The metrics are module-level, so each is registered once per process however many services run
in it (tests run several in one process); every one is labelled by `service`. A service exposes
them on `http://<host>:<metrics_port>/metrics` when its settings give a metrics port (see
`ServiceSettings.metrics_port`); the server is a daemon thread, stopped at the end of the
service's shutdown, so a scrape during the drain still sees the calls in flight falling.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("askmesh.server")

# -- every service -------------------------------------------------------------------------------
# Most calls take milliseconds; streams and uploads run for seconds to minutes.
CALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

CALLS_IN_FLIGHT = Gauge("askmesh_calls_in_flight", "gRPC calls being served now, per method.", ["service", "method"])
CALLS = Counter("askmesh_calls", "gRPC calls finished, per method and status code.", ["service", "method", "code"])
CALL_DURATION = Histogram(
    "askmesh_call_duration_seconds",
    "Time from a call's arrival to its last message or status, per method.",
    ["service", "method"],
    buckets=CALL_BUCKETS,
)
MODEL_LOAD = Gauge(
    "askmesh_model_load_seconds",
    "Time from start to SERVING: loading the model (or connecting) and the warm-up call.",
    ["service"],
)
SERVING = Gauge("askmesh_serving", "1 while health says SERVING, else 0.", ["service"])
DRAIN = Gauge(
    "askmesh_drain_seconds",
    "Time the last shutdown waited for calls in flight (at most the grace period plus a margin).",
    ["service"],
)

# -- retriever ---------------------------------------------------------------------------------
SEARCH_LATENCY = Histogram(
    "askmesh_search_latency_seconds",
    "Time of one Search in Milvus (resolving the collection, filtering and the vector search).",
    ["service"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)

# -- generator ---------------------------------------------------------------------------------
# A short prompt on a GPU answers in tens of milliseconds; a long one on 2 CPU cores in seconds,
# and a full queue adds whole generations on top.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30)

GENERATION_TTFT = Histogram(
    "askmesh_generation_time_to_first_token_seconds",
    "Time from a generation's arrival (queue included) to its first token.",
    ["service"],
    buckets=TTFT_BUCKETS,
)
GENERATION_TOKENS_PER_SECOND = Histogram(
    "askmesh_generation_tokens_per_second",
    "Decode speed of one finished generation (tokens after the first, per second after it).",
    ["service"],
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000),
)
GENERATION_QUEUE = Gauge("askmesh_generation_queue_length", "Generations waiting in line for a concurrency slot.", ["service"])
GENERATION_QUEUE_WAIT = Histogram(
    "askmesh_generation_queue_wait_seconds",
    "Time a generation waited in line for its slot.",
    ["service"],
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120),
)
GENERATIONS_RUNNING = Gauge("askmesh_generations_running", "Generations holding a concurrency slot.", ["service"])
GENERATIONS_REJECTED = Counter(
    "askmesh_generations_rejected",
    "Generations refused at once with RESOURCE_EXHAUSTED because their expected wait was too long.",
    ["service"],
)

# -- embedder ----------------------------------------------------------------------------------
EMBED_BATCH_SIZE = Histogram(
    "askmesh_embed_batch_size",
    "Texts in one model batch (from one or more Embed calls).",
    ["service"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
EMBED_BATCH_TOKENS = Histogram(
    "askmesh_embed_batch_tokens",
    "Tokens in one model batch.",
    ["service"],
    buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
)
EMBED_QUEUE = Gauge("askmesh_embed_queue_length", "Texts waiting for a model batch.", ["service"])
EMBED_REJECTED = Counter(
    "askmesh_embed_rejected", "Embed calls refused with RESOURCE_EXHAUSTED: the queue was full.", ["service"]
)

# -- gateway -----------------------------------------------------------------------------------
ASK_TTFT = Histogram(
    "askmesh_ask_time_to_first_token_seconds",
    "Time from an Ask's arrival to the first answer token sent (embed, search and generation).",
    ["service"],
    buckets=TTFT_BUCKETS,
)
INGESTION_TASKS_RUNNING = Gauge(
    "askmesh_ingestion_tasks_running", "Ingestion tasks this replica's workers are running.", ["service"]
)


@dataclass
class MetricsServer:
    """The /metrics HTTP server of one service."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        """Stops serving and frees the port (blocks up to half a second: the serve loop's poll)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_server(service: str, host: str, port: int) -> MetricsServer:
    """Serves this process's metrics on http://host:port/metrics in a daemon thread."""
    address = host.strip("[]")  # an IPv6 host is written "[::1]" for gRPC; sockets want "::1"
    try:
        server, thread = start_http_server(port, addr=address)
    except OSError as error:
        raise SystemExit(f"{service}: cannot serve metrics on {host}:{port}: {error}") from error
    metrics = MetricsServer(server, thread)
    url_host = f"[{address}]" if ":" in address else address
    log.info("[METRICS] %s on http://%s:%d/metrics", service, url_host, metrics.port)
    return metrics
