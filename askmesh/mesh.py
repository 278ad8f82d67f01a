"""The local mesh: every service as its own process, a real Envoy in front (`askmesh up`).

Each tier runs N replicas on loopback; Envoy's front listener serves the gateway tier and its
internal listener routes the gateway's calls to the embedder, retriever and generator tiers.
The same class starts the mesh for `make run` and for the end-to-end tests.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh import envoy

SERVICES = ("embedder", "retriever", "generator", "gateway")
GRPC_SERVICE = {
    "embedder": "askmesh.v1.Embedder",
    "retriever": "askmesh.v1.Retriever",
    "generator": "askmesh.v1.Generator",
    "gateway": "askmesh.v1.Gateway",
}
# Unary calls that may be retried on another replica.
IDEMPOTENT_METHODS = {"embedder": ["Embed"], "retriever": ["Search"]}


class MeshError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class MeshLayout:
    data_dir: Path
    host: str = "127.0.0.1"
    front_port: int = 50051
    internal_port: int = 50052
    admin_port: int = 9901
    service_ports: dict[str, list[int]] = field(
        default_factory=lambda: {"embedder": [50061], "retriever": [50062], "generator": [50063], "gateway": [50064]}
    )

    @classmethod
    def on_free_ports(cls, data_dir: Path) -> MeshLayout:
        return cls(
            data_dir=data_dir,
            front_port=free_port(),
            internal_port=free_port(),
            admin_port=free_port(),
            service_ports={name: [free_port()] for name in SERVICES},
        )

    @property
    def front_address(self) -> str:
        return f"{self.host}:{self.front_port}"

    @property
    def internal_address(self) -> str:
        return f"{self.host}:{self.internal_port}"

    def replicas(self, name: str) -> list[str]:
        return [f"{self.host}:{port}" for port in self.service_ports[name]]

    def envoy_layout(self) -> envoy.EnvoyLayout:
        def tier(name: str) -> envoy.Tier:
            return envoy.Tier(name, GRPC_SERVICE[name], self.replicas(name), IDEMPOTENT_METHODS.get(name, []))

        return envoy.EnvoyLayout(
            front=tier("gateway"),
            internal=[tier("embedder"), tier("retriever"), tier("generator")],
            host=self.host,
            front_port=self.front_port,
            internal_port=self.internal_port,
            admin_port=self.admin_port,
            access_log=self.data_dir / "logs" / "envoy-access.log",
        )


def _die_with_parent() -> None:
    """Runs in the child before exec: it gets SIGTERM if the mesh process dies (Linux)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    address: str | None = None  # gRPC address of a service replica


class LocalMesh:
    def __init__(
        self,
        layout: MeshLayout,
        *,
        env: dict[str, str] | None = None,
        telemetry: str = "none",
        say: Callable[[str], None] = print,
    ) -> None:
        self.layout = layout
        self.env = env or {}
        self.telemetry = telemetry
        self.say = say
        self.processes: list[Process] = []

    # -- environment of each process -------------------------------------------------------
    def service_env(self, name: str, index: int, port: int) -> dict[str, str]:
        layout = self.layout
        prefix = f"ASKMESH_{name.upper()}_"
        env = {
            **os.environ,
            prefix + "HOST": layout.host,
            prefix + "PORT": str(port),
            "ASKMESH_RETRIEVER_MILVUS_URI": str(layout.data_dir / "data" / "milvus.db"),
            "ASKMESH_GATEWAY_STORE_PATH": str(layout.data_dir / "data" / "gateway.sqlite3"),
            "ASKMESH_GATEWAY_SPOOL_DIR": str(layout.data_dir / "data" / "uploads"),
            "ASKMESH_GATEWAY_EMBEDDER_ADDRESS": layout.internal_address,
            "ASKMESH_GATEWAY_RETRIEVER_ADDRESS": layout.internal_address,
            "ASKMESH_GATEWAY_GENERATOR_ADDRESS": layout.internal_address,
            "ASKMESH_OTEL_EXPORTER": self.telemetry,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # torch and llama.cpp both use OpenMP; threads that spin while they wait steal the
            # few cores the other tiers need (seen here as 0.5 s stalls of single embeddings).
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
        if self.telemetry == "file":
            env["ASKMESH_OTEL_FILE"] = str(layout.data_dir / "spans" / f"{name}-{index}.jsonl")
        env.update(self.env)
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        log_path = self.layout.data_dir / "logs" / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            return subprocess.Popen(
                command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own session: Ctrl-C in the terminal reaches `askmesh up` only, which then
                # stops every process in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    # -- start -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 600.0) -> None:
        layout = self.layout
        config = envoy.write_config(layout.envoy_layout(), layout.data_dir / "envoy.yaml")
        envoy.validate_config(config)
        for name in SERVICES:
            for index, port in enumerate(layout.service_ports[name]):
                command = [sys.executable, "-m", "askmesh.cli", "serve", name]
                label = f"{name}-{index}"
                popen = self._spawn(name, command, self.service_env(name, index, port), label)
                self.processes.append(Process(label, popen, layout.data_dir / "logs" / f"{label}.log", f"{layout.host}:{port}"))
        envoy_log = layout.data_dir / "logs" / "envoy.log"
        popen = self._spawn("envoy", envoy.envoy_command(config, envoy_log), dict(os.environ), "envoy-stdout")
        self.processes.append(Process("envoy", popen, envoy_log))

        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            if process.address is not None:
                self._wait_serving(process, deadline)
                self.say(f"  {process.name:<12} SERVING on {process.address}")
        self._wait_envoy_healthy(deadline)
        self.say(f"  {'envoy':<12} front door on {layout.front_address}, tiers on {layout.internal_address}")

    def _check_alive(self, process: Process) -> None:
        if process.popen.poll() is not None:
            tail = process.log_path.read_text(errors="replace")[-3000:] if process.log_path.exists() else ""
            raise MeshError(f"{process.name} exited with {process.popen.returncode}; its log ends:\n{tail}")

    def _wait_serving(self, process: Process, deadline: float) -> None:
        assert process.address is not None
        with grpc.insecure_channel(process.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(process)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise MeshError(f"{process.name} did not become SERVING in time; see {process.log_path}")
                time.sleep(0.2)

    def cluster_health(self) -> dict[str, list[bool]]:
        """Envoy's view: for each cluster, whether each replica is healthy."""
        url = f"http://{self.layout.host}:{self.layout.admin_port}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=2) as response:
            clusters = json.load(response)["cluster_statuses"]
        return {
            cluster["name"]: [
                "failed_active_health_check" not in host.get("health_status", {})
                and host.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY"
                for host in cluster.get("host_statuses", [])
            ]
            for cluster in clusters
        }

    def _wait_envoy_healthy(self, deadline: float) -> None:
        envoy_process = self.processes[-1]
        while True:
            self._check_alive(envoy_process)
            try:
                health = self.cluster_health()
                if all(name in health and any(health[name]) for name in SERVICES):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise MeshError(f"Envoy did not see every tier healthy in time; see {envoy_process.log_path}")
            time.sleep(0.2)

    # -- stop ------------------------------------------------------------------------------
    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the gateways first, then the other tiers, then Envoy; SIGKILL what lingers."""
        order = sorted(self.processes, key=lambda p: (p.name == "envoy", not p.name.startswith("gateway")))
        for process in order:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        give_up_at = time.monotonic() + grace_s
        for process in order:
            try:
                process.popen.wait(timeout=max(give_up_at - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        self.processes.clear()

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
