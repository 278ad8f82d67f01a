"""The local mesh: every service as its own process, a real Envoy in front (`askmesh up`).

Each tier runs N replicas on loopback; Envoy's front listener serves the gateway tier and its
internal listener routes the gateway's calls to the embedder, retriever and generator tiers. The
web tier (the OpenAI-compatible API and the chat page) serves Envoy's HTTP listener and calls the
gateway and the ingestor through the internal listener with each caller's own key.
Envoy learns each tier's replicas from an endpoint file (filesystem EDS) that the mesh rewrites
as replicas come and go, which makes rolling restarts possible without restarting Envoy.
The same class starts the mesh for `make run`, for the end-to-end tests and for the chaos tests.

Milvus Lite embedded in the retriever admits one process per data folder, so a mesh with more
than one retriever replica (or asked for it) runs Milvus Lite as its own server process, which
every retriever replica reaches by URI.

The front door opens last: Envoy starts with no gateway in its endpoints (its health check
answers UNAVAILABLE "no healthy upstream"), and the gateways are published only once every
replica is SERVING, Envoy routes to every tier, and the sample documents (when asked for) are
loaded through a gateway's own address. The first SERVING at the front door means an Ask can
be answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from askmesh import client, envoy, tiers
from askmesh.runtime.auth import AuthSettings, new_key, new_secret_file, read_secret_file
from askmesh.runtime.config import AskmeshSettings
from askmesh.v1 import gateway_pb2

if TYPE_CHECKING:
    from askmesh.local_postgres import LocalPostgres

SERVICES = tiers.NAMES  # the gRPC tiers, in start-up order
# Every tier the mesh runs: the gRPC tiers, then the web tier (HTTP), which starts serving once
# the front door is open.
ALL_TIERS = tiers.ALL_NAMES
DEFAULT_PORTS = {name: tiers.default_port(name) for name in ALL_TIERS}
MilvusMode = Literal["embedded", "server"]


class MeshError(RuntimeError):
    """A failure of the mesh, as one sentence that names what failed and where to look; a log's
    tail, when there is one, is attached as a note (shown in tracebacks, not in the sentence)."""


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different free ports: each socket stays bound until all are picked (one closed
    before the next is asked for may be handed out again, which once gave Envoy's two listeners
    the same port)."""
    with contextlib.ExitStack() as sockets:
        ports = []
        for _ in range(count):
            sock = sockets.enter_context(socket.socket())
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def parse_replicas(text: str) -> dict[str, int]:
    """`embedder=2,generator=3` -> {"embedder": 2, "generator": 3}; raises ValueError naming the bad part."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, equals, count = part.partition("=")
        if not equals or tier not in ALL_TIERS:
            raise ValueError(f"{part!r}: expected <tier>=<count> with a tier among {', '.join(ALL_TIERS)}")
        if not count.isdigit() or not 1 <= int(count) <= 16:
            raise ValueError(f"{part!r}: the count must be a whole number from 1 to 16")
        counts[tier] = int(count)
    return counts


class MeshSettings(AskmeshSettings):
    """What `askmesh up` reads from ASKMESH_MESH_* (or the `[mesh]` table of $ASKMESH_CONFIG)."""

    section = "mesh"
    model_config = SettingsConfigDict(env_prefix="ASKMESH_MESH_", extra="ignore")

    # The front door serves TLS with this certificate chain and private key (PEM files, both or
    # neither); the internal listener, on loopback, stays plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None


@dataclass
class MeshLayout:
    data_dir: Path
    host: str = "127.0.0.1"
    front_port: int = 50051
    internal_port: int = 50052
    admin_port: int = 9901
    # Envoy's HTTP listener: the OpenAI-compatible API under /v1 and the chat page at /.
    http_port: int = 8080
    control_port: int = 50050
    milvus_port: int = 19530
    # Replica ports of each tier at start; the default puts a tier's replicas 10 ports apart.
    service_ports: dict[str, list[int]] = field(
        default_factory=lambda: {name: [port] for name, port in DEFAULT_PORTS.items()}
    )
    # "server": Milvus Lite as its own process (required for more than one retriever replica).
    milvus: MilvusMode = "embedded"
    metrics: bool = True  # each replica serves Prometheus metrics on a port of its own
    # Where knowledge bases, documents, tasks and uploads are kept: a SQLite file in data_dir
    # (one machine), a local PostgreSQL server the mesh starts ("postgres"), or any PostgreSQL
    # by URL ("postgresql://...").
    store: str = "sqlite"
    postgres_port: int = 55432
    # Every caller needs a key (off only by `askmesh up --no-auth` or ASKMESH_AUTH_ENABLED=false,
    # which every log line then says).
    auth: bool = field(default_factory=lambda: AuthSettings().enabled)
    # TLS on the front door (both or neither): see MeshSettings.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The web tier and Envoy's HTTP listener; False runs the gRPC mesh alone.
    web: bool = True

    def __post_init__(self) -> None:
        if not self.web:
            self.service_ports["web"] = []
        else:
            self.service_ports.setdefault("web", [DEFAULT_PORTS["web"]])

    @classmethod
    def with_replicas(cls, data_dir: Path, replicas: dict[str, int], **options: object) -> MeshLayout:
        """The default ports, with `replicas[tier]` replicas of each tier named there."""
        ports = {name: [port + 10 * i for i in range(replicas.get(name, 1))] for name, port in DEFAULT_PORTS.items()}
        return cls(data_dir=data_dir, service_ports=ports, **options).with_milvus_for_replicas()  # type: ignore[arg-type]

    @classmethod
    def on_free_ports(cls, data_dir: Path, replicas: dict[str, int] | None = None, **options: object) -> MeshLayout:
        replicas = replicas or {}
        counts = {name: replicas.get(name, 1) for name in ALL_TIERS}
        ports = iter(free_ports(7 + sum(counts.values())))
        return cls(
            data_dir=data_dir,
            front_port=next(ports),
            internal_port=next(ports),
            admin_port=next(ports),
            http_port=next(ports),
            control_port=next(ports),
            milvus_port=next(ports),
            postgres_port=next(ports),
            service_ports={name: [next(ports) for _ in range(count)] for name, count in counts.items()},
            **options,  # type: ignore[arg-type]
        ).with_milvus_for_replicas()

    def with_milvus_for_replicas(self) -> MeshLayout:
        if len(self.service_ports["retriever"]) > 1:
            self.milvus = "server"
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def check_tls(self) -> None:
        """MeshError, one sentence, unless TLS is off or both of its files can be read."""
        cert, key = self.tls_cert_file, self.tls_key_file
        if (cert is None) != (key is None):
            given, missing = ("certificate", "key") if cert is not None else ("key", "certificate")
            setting = "tls-cert-file" if missing == "certificate" else "tls-key-file"
            raise MeshError(
                f"TLS on the front door needs a certificate and a key, but only the {given} file is set: "
                f"set --{setting} (ASKMESH_MESH_{setting.upper().replace('-', '_')}) too, or neither for plaintext"
            )
        for kind, path in (("certificate", cert), ("key", key)):
            if path is not None and not os.access(path, os.R_OK):
                raise MeshError(f"the front door's TLS {kind} file {path} cannot be read")

    @property
    def front_address(self) -> str:
        return f"{self.host}:{self.front_port}"

    @property
    def internal_address(self) -> str:
        return f"{self.host}:{self.internal_port}"

    @property
    def http_url(self) -> str:
        """Where browsers and OpenAI clients reach the mesh (the chat page; the API under /v1)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.http_port}"

    @property
    def control_address(self) -> str:
        return f"{self.host}:{self.control_port}"

    @property
    def milvus_uri(self) -> str:
        if self.milvus == "server":
            return f"http://{self.host}:{self.milvus_port}"
        return str(self.data_dir / "data" / "milvus.db")

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "data" / "store.sqlite3"

    @property
    def admin_key_path(self) -> Path:
        """The operator's key, made on the first start: admin of every tenant and of keys."""
        return self.data_dir / "admin-key"

    @property
    def internal_token_path(self) -> Path:
        """The tiers' credential for their calls to each other."""
        return self.data_dir / "internal-token"

    @property
    def endpoints_dir(self) -> Path:
        return self.data_dir / "endpoints"

    def replicas(self, name: str) -> list[str]:
        return [f"{self.host}:{port}" for port in self.service_ports[name]]

    def envoy_layout(self, front_open: bool = True) -> envoy.EnvoyLayout:
        """Envoy's layout; with `front_open` False the gateway tier starts with no replicas in
        its endpoints (the front door answers nothing until they are published)."""

        def published(name: str) -> list[str]:
            return self.replicas(name) if front_open or name not in ("gateway", "web") else []

        def tier(name: str, routes: tuple[str, ...]) -> envoy.Tier:
            spec = tiers.BY_NAME[name]
            return envoy.Tier(
                name,
                spec.health_service,
                published(name),
                list(routes),
                list(spec.idempotent_methods),
                list(spec.resendable_streams),
                capacity_per_replica=spec.capacity_per_replica,
            )

        return envoy.EnvoyLayout(
            front=[tier(name, tiers.BY_NAME[name].public_routes) for name in tiers.FRONT],
            # The gateway is there for the web tier, which calls Ask and Embed with callers' keys.
            internal=[tier(spec.name, tiers.internal_routes(spec)) for spec in tiers.TIERS],
            web=(
                envoy.Tier(tiers.WEB.name, "", published(tiers.WEB.name), health_path=tiers.WEB.health_path)
                if self.service_ports.get(tiers.WEB.name)
                else None
            ),
            host=self.host,
            front_port=self.front_port,
            internal_port=self.internal_port,
            admin_port=self.admin_port,
            http_port=self.http_port,
            access_log=self.data_dir / "logs" / "envoy-access.log",
            endpoints_dir=self.endpoints_dir,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
        )


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    tier: str = ""  # the service tier of a replica; empty for Envoy and Milvus
    address: str | None = None  # gRPC address of a service replica (the web tier's: HTTP)
    metrics_address: str | None = None

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


# How long each tier's OpenMP threads spin before they sleep, when every tier shares a few cores
# (torch in the embedder and llama.cpp in the generator both use libgomp). Measured on 2 cores
# (benchmarks/openmp.py; benchmarks/results/2026-11-22-openmp.md): one generator told to sleep at
# once (OMP_WAIT_POLICY=PASSIVE) makes 38 tokens/s, 100-112 with a spin; but two busy generators
# that spin fight over the cores: 0 tokens/s at libgomp's default spin, 8 at 10,000 rounds, 48 at
# 1,000, 116 at PASSIVE. An embedder with the default long spin stalled single embeddings up to
# 0.5 s next to a generating generator; sleeping at once cost 15% of its batch throughput; 10,000
# rounds kept 92% with no stall. So a tier with one replica spins briefly (the generator 1,000
# rounds: a restart's overlap of two still makes 48 tokens/s), a tier with more sleeps at once,
# and tiers without OpenMP work never spin.
OPENMP_SETTINGS = frozenset({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
OPENMP_SINGLE_REPLICA_SPIN: dict[str, str] = {"embedder": "10000", "generator": "1000"}


def openmp_waits(tier: str, replicas: int) -> dict[str, str]:
    """The OpenMP wait settings `askmesh up` gives each replica of `tier` (see above)."""
    if tier in OPENMP_SINGLE_REPLICA_SPIN and replicas == 1:
        return {"GOMP_SPINCOUNT": OPENMP_SINGLE_REPLICA_SPIN[tier]}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


# The command that runs one replica of a tier, given the tier and the replica's environment.
ReplicaCommand = Callable[[str, dict[str, str]], list[str]]


def local_replica_command(tier: str, env: dict[str, str]) -> list[str]:
    """A replica as a process of this Python (what `askmesh up` runs)."""
    return [sys.executable, "-m", "askmesh.cli", "serve", tier]


class LocalMesh:
    def __init__(
        self,
        layout: MeshLayout,
        *,
        env: dict[str, str] | None = None,
        telemetry: str = "none",
        say: Callable[[str], None] = print,
        samples_dir: Path | None = None,
        replica_command: ReplicaCommand = local_replica_command,
    ) -> None:
        self.layout = layout
        self.env = env or {}
        # tests/test_image.py runs each replica from the image instead (`podman run`).
        self.replica_command = replica_command
        self.telemetry = telemetry
        self.say = say
        # Loaded into the `default` knowledge base by `start()` before the front door opens.
        self.samples_dir = samples_dir
        self.samples_loaded: gateway_pb2.AddDocumentsResponse | None = None
        # Set (by a signal handler) to abandon a start-up that is still waiting.
        self.interrupted = threading.Event()
        self.replicas: dict[str, list[Process]] = {name: [] for name in ALL_TIERS}
        self.envoy: Process | None = None
        self.milvus: Process | None = None
        self.postgres: LocalPostgres | None = None
        self.store_url = str(layout.sqlite_path) if layout.store == "sqlite" else layout.store
        self.retired: list[Process] = []  # replicas taken out by a restart or a test
        self._started = {name: 0 for name in ALL_TIERS}  # replica numbers, never reused
        self._endpoints_version = 1
        # One change of replicas at a time (a restart runs on the control channel's thread).
        self.lock = threading.RLock()

    @property
    def processes(self) -> list[Process]:
        """Every process the mesh runs now: replicas, then Milvus and Envoy."""
        running = [p for name in ALL_TIERS for p in self.replicas[name]]
        return running + [p for p in (self.milvus, self.envoy) if p is not None]

    # -- environment of each process -------------------------------------------------------
    def service_env(self, name: str, index: int, port: int, metrics_port: int = 0) -> dict[str, str]:
        layout = self.layout
        prefix = f"ASKMESH_{name.upper()}_"
        env = {
            **os.environ,
            prefix + "HOST": layout.host,
            prefix + "PORT": str(port),
            prefix + "METRICS_PORT": str(metrics_port),
            "ASKMESH_RETRIEVER_MILVUS_URI": layout.milvus_uri,
            "ASKMESH_INGESTOR_STORE_URL": self.store_url,
            "ASKMESH_OTEL_EXPORTER": self.telemetry,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **self.auth_env(),
        }
        # Every tier reaches the others through Envoy's internal listener.
        for other in tiers.calls_of(name):
            env[f"{prefix}{other.upper()}_ADDRESS"] = layout.internal_address
        if not OPENMP_SETTINGS.intersection(os.environ):  # the user's own OpenMP settings win
            env.update(openmp_waits(name, len(layout.service_ports.get(name, []))))
        if self.telemetry == "file":
            env["ASKMESH_OTEL_FILE"] = str(layout.data_dir / "spans" / f"{name}-{index}.jsonl")
        env.update(self.env)
        return env

    def auth_env(self) -> dict[str, str]:
        if not self.layout.auth:
            return {"ASKMESH_AUTH_ENABLED": "false"}
        return {
            "ASKMESH_AUTH_ENABLED": "true",
            "ASKMESH_AUTH_OPERATOR_KEY_FILE": str(self.layout.admin_key_path),
            "ASKMESH_AUTH_INTERNAL_TOKEN_FILE": str(self.layout.internal_token_path),
        }

    def make_secrets(self) -> None:
        """The operator's key and the internal token, each made once and kept (0600) in data_dir."""
        if self.layout.auth:
            new_secret_file(self.layout.admin_key_path, new_key()[1])
            new_secret_file(self.layout.internal_token_path, secrets.token_urlsafe(32))

    @property
    def admin_key(self) -> str | None:
        return read_secret_file(self.layout.admin_key_path) if self.layout.auth else None

    @property
    def internal_token(self) -> str | None:
        return read_secret_file(self.layout.internal_token_path) if self.layout.auth else None

    def _spawn(self, command: list[str], env: dict[str, str], log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.layout.data_dir / "logs" / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "askmesh.die_with_parent", *command],
                env={**env, "ASKMESH_PARENT_PID": str(os.getpid())},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own session: Ctrl-C in the terminal reaches `askmesh up` only, which then
                # stops every process in order.
                start_new_session=True,
            )
        return popen, log_path

    def _free_port_outside_layout(self) -> int:
        """A free port that none of the layout's own ports (some not bound yet) can be."""
        layout = self.layout
        taken = {
            layout.front_port, layout.internal_port, layout.admin_port, layout.control_port, layout.milvus_port,
            layout.postgres_port, layout.http_port,
        }
        taken.update(port for ports in layout.service_ports.values() for port in ports)
        while (port := free_port(layout.host)) in taken:
            pass
        return port

    def _spawn_replica(self, name: str, port: int) -> Process:
        index = self._started[name]
        self._started[name] += 1
        label = f"{name}-{index}"
        metrics_port = self._free_port_outside_layout() if self.layout.metrics else 0
        env = self.service_env(name, index, port, metrics_port)
        popen, log_path = self._spawn(self.replica_command(name, env), env, label)
        host = self.layout.host
        process = Process(
            label,
            popen,
            log_path,
            tier=name,
            address=f"{host}:{port}",
            metrics_address=f"{host}:{metrics_port}" if metrics_port else None,
        )
        self.replicas[name].append(process)
        return process

    # -- start -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 600.0) -> None:
        """Starts every process; returns once the front door answers SERVING, which it does
        only after every replica is SERVING (a gateway only once its tiers are), Envoy routes
        to each of them, and `samples_dir`'s documents are in the `default` knowledge base.
        Raises MeshError (one sentence) when a process exits, time runs out, the samples cannot
        be loaded, or `interrupted` is set."""
        layout = self.layout
        deadline = time.monotonic() + timeout_s
        layout.check_tls()
        self.make_secrets()
        self._start_store()
        if layout.milvus == "server":
            self._start_milvus(deadline)
        config = envoy.write_config(layout.envoy_layout(front_open=False), layout.data_dir / "envoy.yaml")
        envoy.validate_config(config)
        for name in ALL_TIERS:  # the web tier waits for the front door by itself
            for port in layout.service_ports[name]:
                self._spawn_replica(name, port)
        envoy_log = layout.data_dir / "logs" / "envoy.log"
        popen, _ = self._spawn(envoy.envoy_command(config, envoy_log), dict(os.environ), "envoy-stdout")
        self.envoy = Process("envoy", popen, envoy_log)

        for name in SERVICES:
            for replica in self.replicas[name]:
                self._wait_serving(replica, deadline)
                self.say(f"  {replica.name:<12} SERVING on {replica.address}")
        behind_gateway = [name for name in SERVICES if name != "gateway"]
        self._wait_envoy(deadline, lambda hosts: all(self._routes_to_all(hosts, name) for name in behind_gateway))
        if self.samples_dir is not None:
            self.samples_loaded = self._load_samples(self.samples_dir, deadline)
            self.say(
                f"  {'samples':<12} {len(self.samples_loaded.documents)} documents "
                f"({self.samples_loaded.chunk_count} chunks) in 'default'"
            )
        self._publish_endpoints("gateway")
        self._wait_envoy(deadline, lambda hosts: self._routes_to_all(hosts, "gateway"))
        self._wait_front_door(deadline)
        front = f"{layout.front_address} (TLS)" if layout.tls else layout.front_address
        self.say(f"  {'envoy':<12} front door on {front}, tiers on {layout.internal_address}")
        if self.replicas["web"]:
            # Ready once the gateway and the ingestor answer it, which they do from now on.
            for replica in self.replicas["web"]:
                self._wait_serving(replica, deadline)
                self.say(f"  {replica.name:<12} SERVING on {replica.address}")
            self._publish_endpoints("web")
            self._wait_envoy(deadline, lambda hosts: self._routes_to_all(hosts, "web"))
            self.say(f"  {'envoy':<12} chat page and OpenAI-compatible API on {layout.http_url}/")

    def _routes_to_all(self, hosts: dict[str, dict[str, bool]], name: str) -> bool:
        """Whether Envoy routes to every replica of the tier (each in its view and healthy)."""
        view = hosts.get(name, {})
        return all(view.get(p.address or "") is True for p in self.replicas[name])

    def _load_samples(self, samples_dir: Path, deadline: float) -> gateway_pb2.AddDocumentsResponse:
        """The documents of `samples_dir` into `default`, through the first ingestor replica's
        own address (the front door is not open yet)."""
        ingestor = self.replicas["ingestor"][0]
        assert ingestor.address is not None
        try:
            with client.connect(ingestor.address, self.admin_key) as channel:
                return client.load_samples(channel, samples_dir, timeout_s=max(deadline - time.monotonic(), 1.0))
        except grpc.RpcError as error:
            raise MeshError(
                f"loading the sample documents of {samples_dir} into 'default' failed "
                f"({client.describe_rpc_error(error, ingestor.address)}); see {ingestor.log_path}, "
                "or start without them: `askmesh up --no-samples`"
            ) from error

    def _wait_front_door(self, deadline: float) -> None:
        assert self.envoy is not None
        if self.layout.tls:
            self._wait_front_door_tls(deadline)
            return
        with grpc.insecure_channel(self.layout.front_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            failure = f"Envoy's front door did not answer SERVING in time; see {self.envoy.log_path}"
            self._wait_for(self.envoy, deadline, serving, failure)

    def _wait_front_door_tls(self, deadline: float) -> None:
        """The front door's TLS handshake completes with HTTP/2 negotiated. The mesh cannot call
        it over gRPC: the certificate may chain to a CA it does not have, for a name other than
        its own address. Envoy routing to every gateway, which a health check through the front
        door would prove, was checked already."""
        assert self.envoy is not None
        layout = self.layout
        context = ssl.create_default_context()
        # Readiness of this machine's own listener, not trust in it: no verification.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])

        def handshakes() -> bool:
            with (
                socket.create_connection((layout.host, layout.front_port), timeout=1) as raw,
                context.wrap_socket(raw) as tls,
            ):
                return tls.selected_alpn_protocol() == "h2"

        failure = f"Envoy's front door did not complete a TLS handshake in time; see {self.envoy.log_path}"
        self._wait_for(self.envoy, deadline, handshakes, failure)

    def _start_store(self) -> None:
        """A local PostgreSQL server for `store="postgres"`; for SQLite, the file of a mesh made
        before the ingestor tier existed is taken over under its new name."""
        layout = self.layout
        if layout.store == "postgres":
            from askmesh.local_postgres import LocalPostgres

            self.postgres = LocalPostgres(layout.data_dir / "data" / "postgres", port=layout.postgres_port)
            self.store_url = self.postgres.start()
            self.say(f"  {'postgres':<12} on {layout.host}:{layout.postgres_port}")
        elif layout.store == "sqlite" and not layout.sqlite_path.exists():
            old = layout.sqlite_path.with_name("gateway.sqlite3")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{old}{suffix}").exists():
                    os.replace(f"{old}{suffix}", f"{layout.sqlite_path}{suffix}")

    def _start_milvus(self, deadline: float) -> None:
        layout = self.layout
        data = layout.data_dir / "data" / "milvus-server"
        data.mkdir(parents=True, exist_ok=True)
        milvus_lite = Path(sys.executable).parent / "milvus-lite"
        command = [
            str(milvus_lite),
            "server",
            "--data-dir",
            str(data),
            "--host",
            layout.host,
            "--port",
            str(layout.milvus_port),
        ]
        popen, log_path = self._spawn(command, dict(os.environ), "milvus")
        self.milvus = Process("milvus", popen, log_path)

        def port_open() -> bool:
            with socket.create_connection((layout.host, layout.milvus_port), timeout=1):
                return True

        self._wait_for(
            self.milvus, deadline, port_open, f"Milvus Lite server did not open its port in time; see {log_path}"
        )
        self.say(f"  {'milvus':<12} Milvus Lite server on {layout.milvus_uri}")

    def _check_alive(self, process: Process) -> None:
        if not process.alive:
            error = MeshError(f"{process.name} exited with code {process.popen.returncode}; see {process.log_path}")
            if process.log_path.exists():
                error.add_note(f"{process.log_path} ends:\n{process.log_path.read_text(errors='replace')[-3000:]}")
            raise error

    def _wait_for(
        self, process: Process, deadline: float, ready: Callable[[], bool], failure: str, interval_s: float = 0.2
    ) -> None:
        """Polls `ready()` until it holds; MeshError if `process` exits or `deadline` passes.
        `ready` may raise OSError or grpc.RpcError while what it probes is not up yet."""
        while True:
            self._check_alive(process)
            if self.interrupted.is_set():
                raise MeshError(f"interrupted while waiting for {process.name}")
            try:
                if ready():
                    return
            except (OSError, grpc.RpcError):
                pass
            if time.monotonic() > deadline:
                raise MeshError(failure)
            time.sleep(interval_s)

    def _wait_serving(self, process: Process, deadline: float) -> None:
        assert process.address is not None
        if process.tier == tiers.WEB.name:
            self._wait_http_ready(process, deadline)
            return
        with grpc.insecure_channel(process.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            self._wait_for(
                process, deadline, serving, f"{process.name} did not become SERVING in time; see {process.log_path}"
            )

    def _wait_http_ready(self, process: Process, deadline: float) -> None:
        """The web replica's health path answers 200: it has heard from the tiers it calls."""
        url = f"http://{process.address}{tiers.WEB.health_path}"

        def ready() -> bool:
            # 503 until its upstreams answered: urllib raises HTTPError, an OSError (_wait_for).
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)

        self._wait_for(process, deadline, ready, f"{process.name} did not become ready in time; see {process.log_path}")

    # -- Envoy's view ----------------------------------------------------------------------
    def envoy_hosts(self) -> dict[str, dict[str, bool]]:
        """Envoy's view: for each cluster, each host it routes to and whether it is healthy."""
        url = f"http://{envoy.ADMIN_HOST}:{self.layout.admin_port}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=2) as response:
            clusters = json.load(response)["cluster_statuses"]
        view: dict[str, dict[str, bool]] = {}
        for cluster in clusters:
            hosts = view.setdefault(cluster["name"], {})
            for host in cluster.get("host_statuses", []):
                socket_address = host["address"]["socket_address"]
                status = host.get("health_status", {})
                healthy = (
                    "failed_active_health_check" not in status
                    and "failed_outlier_check" not in status
                    and status.get("eds_health_status", "HEALTHY") == "HEALTHY"
                )
                hosts[f"{socket_address['address']}:{socket_address['port_value']}"] = healthy
        return view

    def cluster_health(self) -> dict[str, list[bool]]:
        """For each cluster, whether each of its replicas is healthy in Envoy's view."""
        return {name: list(hosts.values()) for name, hosts in self.envoy_hosts().items()}

    def _wait_envoy(self, deadline: float, condition: Callable[[dict[str, dict[str, bool]]], bool]) -> None:
        assert self.envoy is not None
        failure = f"Envoy did not reach the expected state in time; see {self.envoy.log_path}"
        self._wait_for(self.envoy, deadline, lambda: condition(self.envoy_hosts()), failure, interval_s=0.1)

    def _publish_endpoints(self, name: str) -> None:
        """Tells Envoy the tier's replicas are now the live ones in `self.replicas`."""
        self._endpoints_version += 1
        addresses = [p.address for p in self.replicas[name] if p.address is not None]
        envoy.write_endpoints(self.layout.endpoints_dir, name, addresses, self._endpoints_version)

    # -- replicas while running ------------------------------------------------------------
    def _refuse_second_embedded_retriever(self, name: str) -> None:
        if name == "retriever" and self.milvus is None and self.replicas[name]:
            raise MeshError(
                "the retriever uses embedded Milvus Lite, which one process at a time can open, so a second "
                "retriever replica (as a rolling restart starts before it stops the old one) cannot run: "
                "start the mesh with --milvus server (or --replicas retriever=2)"
            )

    def add_replica(self, name: str, timeout_s: float = 300.0) -> Process:
        """Starts one more replica of a tier and returns once Envoy routes to it."""
        self._refuse_second_embedded_retriever(name)
        with self.lock:
            deadline = time.monotonic() + timeout_s
            process = self._spawn_replica(name, self._free_port_outside_layout())
            try:
                self._wait_serving(process, deadline)
                self._publish_endpoints(name)
                self._wait_envoy(deadline, lambda hosts: hosts.get(name, {}).get(process.address or "") is True)
            except BaseException:
                self.replicas[name].remove(process)
                self._publish_endpoints(name)
                process.popen.kill()
                process.popen.wait()
                raise
            return process

    def retire_replica(self, process: Process, timeout_s: float = 120.0) -> float:
        """Takes a replica out of Envoy's endpoints, then SIGTERMs it and waits while it drains.

        Returns how long the replica took to exit after SIGTERM (its drain); SIGKILLs it if it
        has not exited within `timeout_s`.
        """
        with self.lock:
            self.replicas[process.tier].remove(process)
            self.retired.append(process)
            self._publish_endpoints(process.tier)
            deadline = time.monotonic() + 30
            self._wait_envoy(deadline, lambda hosts: process.address not in hosts.get(process.tier, {}))
        signalled = time.monotonic()
        if process.alive:
            process.popen.send_signal(signal.SIGTERM)
        try:
            process.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
        return time.monotonic() - signalled

    def reap(self) -> list[Process]:
        """Takes replicas that died out of Envoy's endpoints (what Kubernetes does for a dead
        pod); returns them. Envoy's health checks have usually ejected them already."""
        with self.lock:
            dead = [p for name in ALL_TIERS for p in self.replicas[name] if not p.alive]
            for process in dead:
                self.replicas[process.tier].remove(process)
                self.retired.append(process)
            for name in {p.tier for p in dead}:
                self._publish_endpoints(name)
            return dead

    def restart_tier(self, name: str, say: Callable[[str, Process], None] | None = None) -> None:
        """Rolling restart: for each replica, start a new one, wait until Envoy routes to it,
        then retire the old one. The tier never has fewer serving replicas than before."""
        if name not in ALL_TIERS:
            raise ValueError(f"tier: expected one of {', '.join(ALL_TIERS)}, got {name!r}")
        self._refuse_second_embedded_retriever(name)
        report = say or (lambda message, process: self.say(message))
        with self.lock:
            for old in list(self.replicas[name]):
                report(f"starting a replacement for {old.name}", old)
                new = self.add_replica(name)
                report(f"{new.name} is SERVING on {new.address} and Envoy routes to it", new)
                drain_s = self.retire_replica(old)
                report(f"{old.name} left Envoy's endpoints, drained and exited in {drain_s:.1f} s", old)

    # -- stop ------------------------------------------------------------------------------
    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each tier before the tiers it needs (the gateways first), then Milvus, Envoy and
        PostgreSQL; SIGKILL what lingers."""
        order = [p for name in reversed(ALL_TIERS) for p in self.replicas[name]]
        order += [p for p in (self.milvus, self.envoy) if p is not None]
        order += self.retired
        for process in order:
            if process.alive:
                process.popen.send_signal(signal.SIGTERM)
        give_up_at = time.monotonic() + grace_s
        for process in order:
            try:
                process.popen.wait(timeout=max(give_up_at - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        self.replicas = {name: [] for name in ALL_TIERS}
        self.envoy = self.milvus = None
        self.retired.clear()

    def __enter__(self) -> LocalMesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
