"""Chaos scenarios against the real local mesh while a load of concurrent Ask streams runs.

Each scenario breaks or restarts replicas the way an operator or a failure would (rolling
restart, SIGTERM mid-stream, kill -9, a hung process, a model swap) and records every Ask the
load sent: when it started, which phase it started in, whether it ended with its `done`
message, and its status code if not. tests/test_chaos.py runs the scenarios and asserts on
the records; `python -m benchmarks.chaos` runs them and writes the report under
benchmarks/results/.

A phase lasts at least its set time and then until its evidence is in: enough calls sent in
it have ended (after a kill: enough calls sent once the tier should have recovered). A fixed
window once held no finished call on a busy machine, which failed a good run; the bound on
the wait only keeps a scenario that never sees its evidence from running for ever (its report
says so, and the assertions judge what did happen).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from askmesh import client
from askmesh.mesh import SERVICES, LocalMesh, MeshLayout, Process
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from benchmarks.common import RESULTS, machine, percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = "How many days can I work from abroad?"
CONCURRENCY = 16
# How long a phase may wait for its evidence, on the slowest machine we expect.
EVIDENCE_TIMEOUT_S = 300.0


# -- the load -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallRecord:
    phase: str
    started: float  # time.monotonic() when the call was sent
    ended: float
    code: str  # "OK", a status code name, or "INCOMPLETE" (ended without its final message)
    details: str = ""  # the status message of a failed call
    # The status as askmesh's client reports it (a stream reset by Envoy after the gateway
    # died reads INTERNAL "Received RST_STREAM" in gRPC, UNAVAILABLE in askmesh.client).
    client_code: str = ""
    model: str = ""  # the generator model named by the done message
    embedding_model: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


class AskLoad:
    """`concurrency` closed-loop Ask streams through Envoy's front door, on a thread of its own.

    Each worker asks, reads the stream to its end, and asks again; a failed call is recorded
    and the worker pauses briefly before the next (as a client backing off would).
    """

    def __init__(
        self, address: str, concurrency: int = CONCURRENCY, max_new_tokens: int = 12, timeout_s: float = 120.0
    ) -> None:
        self.address = address
        self.concurrency = concurrency
        self.request = gateway_pb2.AskRequest(
            question=QUESTION,
            parameters=common_pb2.GenerationParameters(max_new_tokens=max_new_tokens, temperature=0.0),
        )
        self.timeout_s = timeout_s
        self.phase = "before"
        self.records: list[CallRecord] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="ask-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops sending; the calls in flight finish (and are recorded) first."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 30)

    def set_phase(self, name: str) -> None:
        self.phase = name

    def since(self, moment: float) -> list[CallRecord]:
        with self._lock:
            return [r for r in self.records if r.started >= moment]

    def ended_since(self, moment: float) -> list[CallRecord]:
        with self._lock:
            return [r for r in self.records if r.ended >= moment]

    def in_phase(self, name: str) -> list[CallRecord]:
        with self._lock:
            return [r for r in self.records if r.phase == name]

    def wait_for_calls(
        self, count: int, which: Callable[[CallRecord], bool], timeout_s: float = EVIDENCE_TIMEOUT_S
    ) -> bool:
        """Waits until `count` ended calls match `which` (a call is recorded when it ends);
        False when `timeout_s` passed first."""
        give_up = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = sum(1 for r in self.records if which(r))
            if found >= count:
                return True
            if time.monotonic() > give_up:
                return False
            time.sleep(0.1)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address, compression=grpc.Compression.Gzip) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await asyncio.gather(*(self._worker(stub) for _ in range(self.concurrency)))

    async def _worker(self, stub: gateway_pb2_grpc.GatewayStub) -> None:
        while not self._stopping.is_set():
            record = await self._ask(stub)
            with self._lock:
                self.records.append(record)
            if not record.ok:
                await asyncio.sleep(0.2)

    async def _ask(self, stub: gateway_pb2_grpc.GatewayStub) -> CallRecord:
        phase, started = self.phase, time.monotonic()
        done: gateway_pb2.AskDone | None = None
        try:
            async for message in stub.Ask(self.request, timeout=self.timeout_s):
                if message.HasField("done"):
                    done = message.done
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            return CallRecord(
                phase, started, time.monotonic(), code, error.details() or "", client.status_of(error).name
            )
        if done is None:
            return CallRecord(phase, started, time.monotonic(), "INCOMPLETE", client_code="INCOMPLETE")
        return CallRecord(
            phase, started, time.monotonic(), "OK", model=done.model, embedding_model=done.embedding_model
        )


@contextmanager
def running_load(mesh: LocalMesh, concurrency: int = CONCURRENCY) -> Iterator[AskLoad]:
    load = AskLoad(mesh.layout.front_address, concurrency)
    load.start()
    try:
        yield load
    finally:
        load.stop()


# -- reports ------------------------------------------------------------------------------------
@dataclass
class PhaseSummary:
    phase: str
    sent: int
    failed: Counter[str]
    p50_s: float
    p99_s: float

    @classmethod
    def of(cls, phase: str, records: list[CallRecord]) -> PhaseSummary:
        latencies = [r.latency_s for r in records if r.ok]
        failed = Counter(r.code for r in records if not r.ok)
        return cls(phase, len(records), failed, percentile(latencies, 0.5), percentile(latencies, 0.99))

    def row(self) -> str:
        failures = ", ".join(f"{code} {n}" for code, n in sorted(self.failed.items())) or "0"
        return f"| {self.phase} | {self.sent} | {failures} | {self.p50_s:.2f} | {self.p99_s:.2f} |"


@dataclass
class ScenarioReport:
    """A scenario's phases, summarized when read: after the load stopped, every call has ended
    and is counted (a summary taken while calls still stream would leave out the slowest)."""

    name: str
    load: AskLoad
    phase_names: list[str]
    events: list[str] = field(default_factory=list)

    @property
    def phases(self) -> list[PhaseSummary]:
        return [PhaseSummary.of(name, self.load.in_phase(name)) for name in self.phase_names]

    def table(self) -> str:
        lines = [
            f"### {self.name}",
            "",
            "| phase | Asks sent | failed | p50 s | p99 s |",
            "|---|---|---|---|---|",
            *(phase.row() for phase in self.phases),
            "",
            *(f"- {event}" for event in self.events),
            "",
        ]
        return "\n".join(lines)


# -- the mesh the scenarios run on ------------------------------------------------------------
def chaos_env() -> dict[str, str]:
    return {
        # Room for the whole load on one generator replica while the other restarts, drains
        # or is dead (queued calls wait instead of being refused).
        "ASKMESH_GENERATOR_MAX_QUEUED_GENERATIONS": "32",
        # Long enough for a replica's queue to drain.
        "ASKMESH_GENERATOR_GRACE_PERIOD_S": "90",
    }


def start_chaos_mesh(data_dir: Path, say: Callable[[str], None] = lambda _: None) -> LocalMesh:
    """Two replicas of every tier, Milvus Lite as a server, the sample documents loaded."""
    layout = MeshLayout.on_free_ports(data_dir, {name: 2 for name in SERVICES})
    mesh = LocalMesh(layout, env=chaos_env(), say=say, samples_dir=REPO_ROOT / "samples")
    try:
        mesh.start()
    except BaseException:
        mesh.stop()
        raise
    return mesh


def replace_dead(mesh: LocalMesh, name: str, events: list[str]) -> None:
    """Like an orchestrator: drop dead replicas from the endpoints and start new ones."""
    for dead in mesh.reap():
        events.append(f"{dead.name} removed from Envoy's endpoints (exit code {dead.popen.returncode})")
    while len(mesh.replicas[name]) < 2:
        started = time.monotonic()
        new = mesh.add_replica(name)
        events.append(f"{new.name} started as a replacement, in Envoy's pool after {time.monotonic() - started:.1f} s")


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until `condition()` held; raises TimeoutError when it did not."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - started


def settle(
    load: AskLoad,
    phase: str,
    seconds: float,
    events: list[str],
    calls: int = CONCURRENCY,
    timeout_s: float = EVIDENCE_TIMEOUT_S,
) -> None:
    """Runs the load in `phase` for `seconds`, then until `calls` calls sent in it have ended
    (at most `timeout_s` more; the report says when they did not)."""
    load.set_phase(phase)
    time.sleep(seconds)
    if not load.wait_for_calls(calls, lambda r: r.phase == phase, timeout_s):
        ended = len(load.in_phase(phase))
        events.append(f"{phase}: only {ended} of {calls} calls sent in this phase ended within {timeout_s:.0f} s")


# -- scenarios ----------------------------------------------------------------------------------
def rolling_restart_every_tier(mesh: LocalMesh, load: AskLoad) -> ScenarioReport:
    events: list[str] = []
    settle(load, "before", 8, events)
    load.set_phase("during")
    for name in ("generator", "retriever", "embedder", "ingestor", "gateway"):
        started = time.monotonic()
        mesh.restart_tier(name, say=lambda message, _process: events.append(message))
        events.append(f"{name}: rolling restart of 2 replicas took {time.monotonic() - started:.1f} s")
    settle(load, "after", 8, events)
    return ScenarioReport(
        "Rolling restart of every tier, one after another", load, ["before", "during", "after"], events
    )


def sigterm_generator_mid_stream(mesh: LocalMesh, load: AskLoad) -> tuple[ScenarioReport, Process, float]:
    """SIGTERM straight to a busy generator replica (not taken out of Envoy first): Envoy's
    health check takes it out of the pool, the streams it serves finish."""
    events: list[str] = []
    settle(load, "before", 6, events)
    victim = mesh.replicas["generator"][0]
    load.set_phase("draining")
    signalled = time.monotonic()
    victim.popen.send_signal(signal.SIGTERM)
    victim.popen.wait(timeout=120)
    drain_s = time.monotonic() - signalled
    events.append(f"SIGTERM to {victim.name}: it drained and exited in {drain_s:.1f} s")
    load.set_phase("after")
    replace_dead(mesh, "generator", events)
    settle(load, "after", 6, events)
    return (
        ScenarioReport("SIGTERM to a generator replica mid-stream", load, ["before", "draining", "after"], events),
        victim,
        drain_s,
    )


@dataclass
class KillOutcome:
    tier: str
    victim: str
    killed_at: float
    failures: list[CallRecord]  # calls that failed between this kill and the next
    late_calls: list[CallRecord]  # calls sent from `recover_s` after this kill and ended before the next


@dataclass
class Kills:
    """When each tier's replica was killed; judged once the load has stopped (every call ended)."""

    times: list[tuple[str, str, float]] = field(default_factory=list)  # tier, victim, monotonic time
    ended_at: float = 0.0

    def outcomes(self, load: AskLoad, recover_s: float) -> list[KillOutcome]:
        outcomes = []
        for i, (tier, victim, killed_at) in enumerate(self.times):
            next_at = self.times[i + 1][2] if i + 1 < len(self.times) else self.ended_at
            failures = [r for r in load.records if not r.ok and killed_at <= r.ended < next_at]
            # Calls still streaming at the next kill may be that kill's victims: not counted here.
            late = [r for r in load.records if killed_at + recover_s <= r.started and r.ended < next_at]
            outcomes.append(KillOutcome(tier, victim, killed_at, failures, late))
        return outcomes


def kill_one_replica_of_each_tier(
    mesh: LocalMesh, load: AskLoad, recover_s: float = 3.0, late_calls: int = CONCURRENCY
) -> tuple[ScenarioReport, Kills]:
    """kill -9 one replica of each tier in turn. After each kill the load runs until
    `late_calls` calls sent `recover_s` or more after it have ended (the evidence that the tier
    recovered), and only then is the victim replaced and the next tier's replica killed."""
    events: list[str] = []
    kills = Kills()
    phases = ["before"]
    settle(load, "before", 6, events)
    for name in ("generator", "retriever", "embedder", "ingestor", "gateway"):
        victim = mesh.replicas[name][0]
        phases.append(f"kill {name}")
        load.set_phase(f"kill {name}")
        killed_at = time.monotonic()
        kills.times.append((name, victim.name, killed_at))
        victim.popen.kill()
        victim.popen.wait()
        events.append(f"kill -9 {victim.name}")
        if not load.wait_for_calls(late_calls, lambda r: r.started >= killed_at + recover_s):
            late = len(load.since(killed_at + recover_s))
            events.append(
                f"only {late} of {late_calls} calls sent {recover_s:g} s or more after the kill of {victim.name} "
                f"ended within {EVIDENCE_TIMEOUT_S:.0f} s"
            )
        replace_dead(mesh, name, events)
    settle(load, "after", 6, events)
    phases.append("after")
    kills.ended_at = time.monotonic()
    return ScenarioReport("kill -9 of one replica of each tier", load, phases, events), kills


def hung_generator_is_ejected(mesh: LocalMesh, load: AskLoad) -> tuple[ScenarioReport, float]:
    """SIGSTOP a generator replica: it keeps its port but answers nothing, health checks included."""
    events: list[str] = []
    settle(load, "before", 6, events)
    victim = mesh.replicas["generator"][0]
    load.set_phase("hung")
    os.kill(victim.popen.pid, signal.SIGSTOP)
    try:
        ejected_s = wait_until(lambda: mesh.envoy_hosts()["generator"].get(victim.address or "") is False, timeout_s=15)
        events.append(f"SIGSTOP {victim.name}: Envoy marked it unhealthy after {ejected_s:.1f} s")
        # The calls the hung replica holds must still finish within their deadline once it
        # resumes: the evidence here is fewer calls (the live replica's), with a shorter bound.
        settle(load, "ejected", 8, events, calls=CONCURRENCY // 2, timeout_s=load.timeout_s / 3)
    finally:
        os.kill(victim.popen.pid, signal.SIGCONT)
    events.append(f"SIGCONT {victim.name}: the calls it held resumed")
    wait_until(lambda: mesh.envoy_hosts()["generator"].get(victim.address or "") is True, timeout_s=15)
    settle(load, "after", 6, events)
    return ScenarioReport(
        "A hung generator replica (SIGSTOP) is ejected", load, ["before", "hung", "ejected", "after"], events
    ), ejected_s


def swap_models_under_load(mesh: LocalMesh, load: AskLoad) -> tuple[ScenarioReport, dict[str, str]]:
    """Every generator and embedder replica switches to another model file while Asks stream.

    The "other" models are the same weights under another name (a link), since these are the
    only models on this machine: what is swapped is the loaded model object, and the name each
    answer reports tells which one served it.
    """
    events: list[str] = []
    settle(load, "before", 6, events)
    load.set_phase("swapping")
    new_names: dict[str, str] = {}
    for tier in ("generator", "embedder"):
        for replica in list(mesh.replicas[tier]):
            assert replica.address is not None
            with grpc.insecure_channel(replica.address) as channel:
                current = Path(client.get_model(channel, tier).path)
                link = mesh.layout.data_dir / "models" / f"{current.stem}-swapped{current.suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(current)
                started = time.monotonic()
                info = client.swap_model(channel, tier, str(link))
            new_names[tier] = info.name
            events.append(
                f"{replica.name}: {info.replaced} -> {info.name} in {time.monotonic() - started:.1f} s "
                f"(load {info.load_seconds:.1f} s; {info.retiring_calls} calls still on the old model)"
            )
    settle(load, "after", 12, events)
    return ScenarioReport(
        "Model hot swap of every generator and embedder replica", load, ["before", "swapping", "after"], events
    ), new_names


# -- the report ---------------------------------------------------------------------------------
def write_report(reports: list[ScenarioReport], path: Path) -> None:
    header = [
        f"# Chaos report ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Mesh: two replicas of every tier, Milvus Lite server, real Envoy; load: {CONCURRENCY} concurrent",
        "closed-loop Ask streams through the front door (one question, 12 new tokens, greedy).",
        "A call counts in the phase it started in (so a stream cut by the gateway's kill may show in",
        "the row of the kill before it); latency is the whole stream (p50/p99 of the",
        "calls that succeeded). Produced by `python -m benchmarks.chaos` (tests/test_chaos.py runs",
        "the same scenarios and asserts on them).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + [report.table() for report in reports]))


def main() -> None:
    reports: list[ScenarioReport] = []
    with tempfile.TemporaryDirectory() as data_dir:
        mesh = start_chaos_mesh(Path(data_dir), say=print)
        try:
            for scenario in (
                rolling_restart_every_tier,
                swap_models_under_load,
                sigterm_generator_mid_stream,
                hung_generator_is_ejected,
                kill_one_replica_of_each_tier,
            ):
                with running_load(mesh) as load:
                    result = scenario(mesh, load)
                report = result[0] if isinstance(result, tuple) else result
                if isinstance(result, tuple) and isinstance(result[1], Kills):
                    for outcome in result[1].outcomes(load, recover_s=3.0):
                        codes = Counter(f.code for f in outcome.failures)
                        before = all(f.started < outcome.killed_at for f in outcome.failures)
                        report.events.append(
                            f"{outcome.victim}: {len(outcome.failures)} calls failed "
                            f"({', '.join(f'{c} {n}' for c, n in codes.items()) or 'none'}), "
                            f"{'all' if before else 'NOT all'} sent before the kill; "
                            f"{sum(r.ok for r in outcome.late_calls)}/{len(outcome.late_calls)} calls sent 3 s or more "
                            "after it succeeded"
                        )
                print(report.table())
                reports.append(report)
        finally:
            mesh.stop()
    path = RESULTS / f"{time.strftime('%Y-%m-%d')}-chaos.md"
    write_report(reports, path)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
