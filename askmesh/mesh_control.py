"""The control channel of a running `askmesh up`: `askmesh replicas` and `askmesh restart <tier>`.

A small synchronous gRPC server on loopback. Work that starts or stops processes is handed to
the thread that runs `askmesh up` (`ControlServer.run_pending`): a child started from a
short-lived thread would get its parent-death signal when that thread ends (prctl's
PDEATHSIG follows the thread that forked, not the process).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from askmesh.runtime.auth import InternalOnly

from askmesh.mesh import ALL_TIERS, LocalMesh, MeshError, Process
from askmesh.v1 import mesh_pb2, mesh_pb2_grpc


def replica_message(process: Process, healthy: bool) -> mesh_pb2.Replica:
    return mesh_pb2.Replica(
        tier=process.tier,
        name=process.name,
        address=process.address or "",
        pid=process.popen.pid,
        healthy=healthy,
        metrics_address=process.metrics_address or "",
    )


@dataclass
class _Job:
    """A restart handed to the main thread; its events flow back to the caller's stream."""

    tier: str
    events: queue.Queue[mesh_pb2.RestartEvent | BaseException | None] = field(default_factory=queue.Queue)


class MeshControlServicer(mesh_pb2_grpc.MeshControlServicer):
    def __init__(self, mesh: LocalMesh, submit: Callable[[_Job], None]) -> None:
        self.mesh = mesh
        self.submit = submit
        self._restarting: set[str] = set()
        self._guard = threading.Lock()

    def ListReplicas(
        self, request: mesh_pb2.ListReplicasRequest, context: grpc.ServicerContext
    ) -> mesh_pb2.ListReplicasResponse:
        try:
            hosts = self.mesh.envoy_hosts()
        except OSError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"Envoy's admin interface does not answer: {error}")
        replicas = [
            replica_message(p, hosts.get(p.tier, {}).get(p.address or "", False))
            for name in ALL_TIERS
            for p in list(self.mesh.replicas[name])
        ]
        return mesh_pb2.ListReplicasResponse(replicas=replicas)

    def RestartTier(
        self, request: mesh_pb2.RestartTierRequest, context: grpc.ServicerContext
    ) -> Iterator[mesh_pb2.RestartEvent]:
        if request.tier not in ALL_TIERS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"tier: expected one of {', '.join(ALL_TIERS)}, got {request.tier!r}"
            )
        with self._guard:
            if self._restarting:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"tier: a rolling restart of {', '.join(sorted(self._restarting))} is in progress; one at a time",
                )
            self._restarting.add(request.tier)
        try:
            job = _Job(request.tier)
            self.submit(job)
            while True:
                event = job.events.get()
                if event is None:
                    return
                if isinstance(event, MeshError):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(event))
                if isinstance(event, BaseException):
                    context.abort(grpc.StatusCode.INTERNAL, f"restart of {request.tier} failed: {event}")
                yield event
        finally:
            with self._guard:
                self._restarting.discard(request.tier)


class ControlServer:
    """Serves MeshControl for `mesh`; `run_pending()` on the mesh's own thread does the work."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.so_reuseport", 0)],
            interceptors=[InternalOnly(_made_token(mesh))],
        )
        mesh_pb2_grpc.add_MeshControlServicer_to_server(MeshControlServicer(mesh, self.jobs.put), self.server)

    def start(self) -> str:
        address = self.mesh.layout.control_address
        try:
            self.server.add_insecure_port(address)
        except RuntimeError as error:
            raise MeshError(f"cannot open the control port {address}: {error}") from error
        self.server.start()
        return address

    def stop(self) -> None:
        self.server.stop(grace=1).wait()

    def run_pending(self, wait_s: float) -> None:
        """Runs the restarts asked for, or returns after `wait_s` when there are none."""
        try:
            job = self.jobs.get(timeout=wait_s)
        except queue.Empty:
            return

        def report(message: str, process: Process) -> None:
            self.mesh.say(f"[restart {job.tier}] {message}")
            job.events.put(mesh_pb2.RestartEvent(message=message, replica=replica_message(process, process.alive)))

        try:
            self.mesh.restart_tier(job.tier, say=report)
        except BaseException as error:  # the caller hears of every failure; the mesh keeps running
            job.events.put(error)
        finally:
            job.events.put(None)


def _made_token(mesh: LocalMesh) -> str | None:
    mesh.make_secrets()  # the control port may open before the tiers start
    return mesh.internal_token
