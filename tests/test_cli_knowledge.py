"""The CLI's knowledge-base, ingestion and task commands, run as subprocesses against the real
local mesh (four service processes and Envoy on loopback), started once for the module; and
how the CLI reports failures (one sentence, never a Python repr), which needs no mesh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from askmesh import cli, client
from askmesh.mesh import LocalMesh, MeshError, MeshLayout, free_port

pytestmark = pytest.mark.mesh
ASKMESH = Path(sys.executable).parent / "askmesh"


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    layout = MeshLayout.on_free_ports(tmp_path_factory.mktemp("mesh"))
    with LocalMesh(layout, say=lambda _: None):
        yield layout.front_address


def askmesh(address: str, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    # Wide enough that no table cell wraps.
    return subprocess.run(
        [str(ASKMESH), *args, "--address", address],
        capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "COLUMNS": "250"},
    )


def line_with(text: str, output: str) -> str:
    lines = [line for line in output.splitlines() if text in line]
    assert len(lines) == 1, f"expected one line with {text!r} in:\n{output}"
    return lines[0]


def test_a_knowledge_base_is_created_filled_listed_and_deleted(address: str, tmp_path: Path) -> None:
    created = askmesh(address, "kb", "create", "team_notes", "--description", "Notes of the team", "--field", "year:int")
    assert created.returncode == 0, created.stderr
    listed = askmesh(address, "kb", "list")
    assert listed.returncode == 0, listed.stderr
    row = line_with("team_notes", listed.stdout)
    assert "all-MiniLM-L6-v2" in row and "384" in row and "ready" in row

    notes = tmp_path / "notes.md"
    notes.write_text("# Team notes\n\nThe office opens at 9 am. Coffee is free on Fridays.\n\n"
                     "## Parking\n\nParking badges come from the facilities team.\n")
    review = tmp_path / "review.txt"
    review.write_text("The quarterly review happens in the last week of each quarter.\n")
    ingested = askmesh(
        address, "ingest", str(notes), str(review), "--kb", "team_notes",
        "--metadata", "year=2024", "--metadata", "owner=ops", "--metadata", "public=true",
    )
    assert ingested.returncode == 0, ingested.stdout + ingested.stderr
    assert "notes.md: succeeded (" in ingested.stdout and "review.txt: succeeded (" in ingested.stdout

    docs = askmesh(address, "kb", "docs", "team_notes")
    assert docs.returncode == 0, docs.stderr
    assert "Team notes" in line_with("notes.md", docs.stdout)
    assert line_with("review.txt", docs.stdout).split("│")[1].strip() == "review"
    # The metadata arrived typed.
    with client.connect(address) as channel:
        metadata = {d.id: dict(d.metadata) for d in client.list_documents(channel, "team_notes")}
    assert metadata["notes"] == metadata["review"] == {"year": 2024, "owner": "ops", "public": True}

    tasks = askmesh(address, "tasks", "--kb", "team_notes")
    assert tasks.returncode == 0, tasks.stderr
    for file_name in ("notes.md", "review.txt"):
        row = line_with(file_name, tasks.stdout)
        assert "ingest_file" in row and "succeeded" in row and "done" in row

    deleted = askmesh(address, "kb", "delete", "team_notes", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "team_notes" not in askmesh(address, "kb", "list").stdout
    gone = askmesh(address, "kb", "show", "team_notes")
    assert gone.returncode == 1 and "error: NOT_FOUND:" in gone.stderr


def test_a_file_the_server_cannot_read_fails_with_the_tasks_reason(address: str, tmp_path: Path) -> None:
    assert askmesh(address, "kb", "create", "odd_files").returncode == 0
    odd = tmp_path / "data.xyz"
    odd.write_bytes(b"\x00\x01binary stuff\xff")
    ingested = askmesh(address, "ingest", str(odd), "--kb", "odd_files")
    assert ingested.returncode == 1, ingested.stdout + ingested.stderr
    assert "data.xyz: failed (unsupported file type" in ingested.stdout
    failed = askmesh(address, "tasks", "--kb", "odd_files", "--state", "failed")
    assert "unsupported file type" in line_with("data.xyz", failed.stdout)
    assert askmesh(address, "tasks", "--kb", "odd_files", "--state", "succeeded").stdout.count("data.xyz") == 0
    assert askmesh(address, "kb", "delete", "odd_files", "--yes").returncode == 0


def test_bad_local_input_exits_2_and_server_errors_exit_1(address: str, tmp_path: Path) -> None:
    bad_field = askmesh(address, "kb", "create", "never", "--field", "year:date")
    assert bad_field.returncode == 2 and "--field" in bad_field.stderr
    missing = askmesh(address, "ingest", str(tmp_path / "missing.md"), "--kb", "default")
    assert missing.returncode == 2 and "missing.md: no such file or directory" in missing.stderr
    (tmp_path / "a.md").write_text("# A\n\nSome text.\n")
    bad_metadata = askmesh(address, "ingest", str(tmp_path), "--kb", "default", "--metadata", "novalue")
    assert bad_metadata.returncode == 2 and "--metadata: 'novalue' is not key=value" in bad_metadata.stderr
    no_kb = askmesh(address, "ingest", str(tmp_path / "a.md"), "--kb", "nope")
    assert no_kb.returncode == 1 and "error: NOT_FOUND: knowledge_base: 'nope' does not exist" in no_kb.stderr
    no_task = askmesh(address, "cancel", "0" * 32)
    assert no_task.returncode == 1 and "error: NOT_FOUND:" in no_task.stderr


# -- failures as one sentence (no mesh needed) ---------------------------------------------------
def assert_one_sentence(stderr: str, starts_with: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(starts_with), stderr
    assert "_InactiveRpcError" not in stderr and "<" not in stderr and "Traceback" not in stderr, stderr


def test_a_failed_call_is_one_line_naming_what_failed_and_what_to_do() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    for args in (["ask", "hello", "--address", nobody], ["kb", "list", "--address", nobody], ["replicas", "--control", nobody]):
        result = subprocess.run([str(ASKMESH), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (args, result.stderr)
        assert_one_sentence(result.stderr, f"error: UNAVAILABLE: nothing answers at {nobody}")
        assert "askmesh up" in result.stderr  # what to do
    debug = subprocess.run(
        [str(ASKMESH), "--debug", "kb", "list", "--address", nobody], capture_output=True, text=True, timeout=60
    )
    assert debug.returncode == 1 and "_InactiveRpcError" in debug.stderr  # --debug shows the rest


def failed_call() -> grpc.RpcError:
    """A real failed call, the kind `askmesh up` once printed as `<_InactiveRpcError of RPC ...>`."""
    with client.connect(f"127.0.0.1:{free_port()}") as channel:
        try:
            client.list_knowledge_bases(channel, timeout_s=10)
        except grpc.RpcError as error:
            return error
    raise AssertionError("a call to a free port succeeded")


def crashed_replica() -> MeshError:
    error = MeshError("gateway-0 exited with code 1; see .askmesh/logs/gateway-0.log")
    error.add_note("Traceback (most recent call last):\n  File <stdin>, line 1\nRuntimeError: <boom>")
    return error


@pytest.mark.parametrize(
    ("failure", "sentence"),
    [
        (failed_call, "askmesh up failed: UNAVAILABLE: nothing answers at"),
        (crashed_replica, "askmesh up failed: gateway-0 exited with code 1; see .askmesh/logs/gateway-0.log"),
    ],
)
def test_askmesh_up_reports_a_failure_as_one_sentence(
    failure: object, sentence: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = failure()  # type: ignore[operator]

    def failing_start(self: LocalMesh, timeout_s: float = 600.0) -> None:
        raise error

    monkeypatch.setattr(LocalMesh, "start", failing_start)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:  # `up` installs its own signal handlers
        result = CliRunner().invoke(cli.app, ["up", "--data-dir", str(tmp_path)])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert result.exit_code == 1, result.output
    assert_one_sentence(result.stderr, sentence)
