"""Zero downtime, proven with real processes and a real Envoy while 16 Ask streams run.

One mesh (two replicas of every tier, Milvus Lite as a server) serves the whole module; the
scenarios in benchmarks/chaos.py restart, SIGTERM, hang and kill its replicas under load, and
each test prints its table (Asks sent, failed, p50/p99 before, during and after) to the test
output. `python -m benchmarks.chaos` writes the same tables to benchmarks/results/.

Each phase runs until its evidence is in (enough calls sent in it have ended, however slow the
machine), so the assertions below judge calls that happened, never an empty window.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from askmesh.mesh import SERVICES, LocalMesh
from askmesh.mesh_control import ControlServer
from benchmarks import chaos

# Restarting replicas under load on 2 cores takes minutes; the default 300 s per test is too tight.
pytestmark = [pytest.mark.mesh, pytest.mark.timeout(900)]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = chaos.start_chaos_mesh(tmp_path_factory.mktemp("chaos"))
    try:
        yield mesh
    finally:
        mesh.stop()


def show(report: chaos.ScenarioReport, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n" + report.table())


def assert_every_call_answered(load: chaos.AskLoad) -> None:
    failed = [r for r in load.records if not r.ok]
    assert not failed, f"{len(failed)} of {len(load.records)} Asks failed: {[(r.phase, r.code) for r in failed][:10]}"


def test_rolling_restart_of_every_tier_under_load_fails_nothing(
    mesh: LocalMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {name: {p.name for p in mesh.replicas[name]} for name in SERVICES}
    with chaos.running_load(mesh) as load:
        report = chaos.rolling_restart_every_tier(mesh, load)
    show(report, capsys)
    assert_every_call_answered(load)
    assert all(phase.sent >= chaos.CONCURRENCY for phase in report.phases)
    for name in SERVICES:
        now = {p.name for p in mesh.replicas[name]}
        assert len(now) == 2 and not now & before[name], f"{name} replicas were not all replaced: {now}"
    assert all(mesh.cluster_health()[name] == [True, True] for name in SERVICES)


def test_model_hot_swap_under_load_fails_nothing_and_later_answers_come_from_the_new_models(
    mesh: LocalMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    with chaos.running_load(mesh) as load:
        report, new_names = chaos.swap_models_under_load(mesh, load)
    show(report, capsys)
    assert_every_call_answered(load)
    assert new_names["generator"].endswith("-swapped") and new_names["embedder"].endswith("-swapped")
    after = load.in_phase("after")
    assert after and all(r.model == new_names["generator"] for r in after)
    assert all(r.embedding_model == new_names["embedder"] for r in after)
    assert any(r.model != new_names["generator"] for r in load.in_phase("before"))


def test_sigterm_to_a_generator_mid_stream_lets_its_streams_finish(
    mesh: LocalMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    with chaos.running_load(mesh) as load:
        report, victim, drain_s = chaos.sigterm_generator_mid_stream(mesh, load)
    show(report, capsys)
    assert_every_call_answered(load)
    assert load.in_phase("after"), report.events
    log = victim.log_path.read_text()
    in_flight_at_sigterm = [int(n) for n in re.findall(r"\[DRAINING\] \S+ (\d+) in flight", log)]
    assert in_flight_at_sigterm and max(in_flight_at_sigterm) > 0, "the replica was not serving a stream when signalled"
    assert "[CLEANUP]" in log and "grace period over" not in log
    assert victim.popen.returncode == 0 and drain_s < 90


def test_a_hung_generator_is_ejected_and_new_calls_go_to_the_live_one(
    mesh: LocalMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    with chaos.running_load(mesh) as load:
        report, ejected_s = chaos.hung_generator_is_ejected(mesh, load)
    show(report, capsys)
    assert ejected_s < 5  # one health-check interval (1 s) plus the check's own timeout (1 s)
    ejected_phase = load.in_phase("ejected")
    assert ejected_phase and all(r.ok for r in ejected_phase)
    # The calls the hung replica held were not lost: they finished once it resumed.
    assert_every_call_answered(load)


def test_kill_minus_9_fails_only_calls_streaming_from_the_victim_and_only_with_unavailable(
    mesh: LocalMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    with chaos.running_load(mesh) as load:
        report, kills = chaos.kill_one_replica_of_each_tier(mesh, load, recover_s=3.0)
    show(report, capsys)
    for outcome in kills.outcomes(load, recover_s=3.0):
        # The scenario kept the load running until this many calls sent 3 s or more after the
        # kill had ended (the report's events say when the bound passed first).
        assert len(outcome.late_calls) >= chaos.CONCURRENCY, (outcome.tier, len(outcome.late_calls), report.events)
        for failure in outcome.failures:
            assert failure.started < outcome.killed_at, f"{outcome.tier}: a call sent after the kill failed: {failure}"
            assert failure.client_code == "UNAVAILABLE", (outcome.tier, failure)
            if outcome.tier != "gateway":
                # The gateway outlived the failure and ended the stream with a proper status.
                assert failure.code == "UNAVAILABLE", (outcome.tier, failure)
        assert outcome.late_calls and all(r.ok for r in outcome.late_calls), (outcome.tier, outcome.late_calls)
    assert all(len(mesh.replicas[name]) == 2 for name in SERVICES)
    assert load.in_phase("after") and all(r.ok for r in load.in_phase("after"))


def test_askmesh_restart_does_a_rolling_restart_through_the_control_channel(mesh: LocalMesh) -> None:
    control = ControlServer(mesh)
    control.start()
    old = {p.name for p in mesh.replicas["gateway"]}
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def run_cli() -> None:
        env = {**os.environ, "COLUMNS": "200"}
        args = ["--control", mesh.layout.control_address]
        result["restart"] = subprocess.run(
            [str(VENV_BIN / "askmesh"), "restart", "gateway", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        result["bad"] = subprocess.run(
            [str(VENV_BIN / "askmesh"), "restart", "search", *args], capture_output=True, text=True, timeout=60, env=env
        )
        result["list"] = subprocess.run(
            [str(VENV_BIN / "askmesh"), "replicas", *args], capture_output=True, text=True, timeout=60, env=env
        )
        result["models"] = subprocess.run(
            [str(VENV_BIN / "askmesh"), "model", "show", "generator", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    cli = threading.Thread(target=run_cli)
    cli.start()
    try:
        # The mesh's own thread starts and stops the processes (as `askmesh up` does).
        while cli.is_alive():
            control.run_pending(wait_s=0.2)
    finally:
        cli.join()
        control.stop()
    restart = result["restart"]
    assert restart.returncode == 0, restart.stderr
    assert restart.stdout.count("is SERVING") == 2 and "gateway restarted" in restart.stdout
    new = {p.name for p in mesh.replicas["gateway"]}
    assert len(new) == 2 and not new & old
    assert result["bad"].returncode == 2 and "search" in result["bad"].stderr
    models = result["models"]
    assert models.returncode == 0, models.stderr
    generators = [p.address for p in mesh.replicas["generator"]]
    assert [line.split(": ")[0] for line in models.stdout.splitlines() if "SmolLM2" in line] == generators
    # Every replica serves its Prometheus metrics on the port the listing shows.
    for name in SERVICES:
        for replica in mesh.replicas[name]:
            assert replica.metrics_address and replica.metrics_address in result["list"].stdout
            with urllib.request.urlopen(f"http://{replica.metrics_address}/metrics", timeout=10) as response:
                exposition = response.read().decode()
            assert f'askmesh_serving{{service="{name}"}} 1.0' in exposition
    listing = result["list"].stdout
    assert all(name in listing for name in new) and listing.count("healthy") >= 8 and "UNHEALTHY" not in listing
