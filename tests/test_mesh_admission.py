"""Admission on the real mesh: two generator replicas behind a real Envoy, each with a short
longest wait, and more questions at once than both can take in that time. Every question is
answered or refused at once (RESOURCE_EXHAUSTED with a retry pushback, before any message);
both replicas serve (Envoy sends a refused call on to the other replica); and a refused question
was neither embedded nor searched: the embedder's and the retriever's own call counters grow by
the answered questions only."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout, Process
from askmesh.runtime.errors import retry_after_of
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.mesh
QUESTIONS = 12


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    layout = MeshLayout.on_free_ports(tmp_path_factory.mktemp("mesh"), {"generator": 2})
    # One generation at a time per replica, first expected to take 2 s: each replica lets in
    # one running and two waiting (2 s and 4 s), so 12 questions at once are more than both take.
    env = {"ASKMESH_GENERATOR_MAX_QUEUE_WAIT_S": "4", "ASKMESH_GENERATOR_PARALLEL_SEQUENCES": "1"}
    mesh = LocalMesh(layout, env=env, say=lambda _: None)
    with mesh:
        with client.connect(layout.front_address) as channel:
            client.load_samples(channel, REPO_ROOT / "samples")
        yield mesh


def calls_ok(replica: Process, method: str) -> float:
    with urllib.request.urlopen(f"http://{replica.metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "askmesh_calls_total" and sample.labels.get("method") == method and sample.labels.get("code") == "OK":
                return sample.value
    return 0.0


def test_more_questions_than_the_generators_take_are_answered_or_refused_before_any_work(mesh: LocalMesh) -> None:
    embedder, retriever = mesh.replicas["embedder"][0], mesh.replicas["retriever"][0]
    embeds, searches = calls_ok(embedder, "Embed"), calls_ok(retriever, "Search")
    served_before = [calls_ok(g, "AdmitAndGenerate") for g in mesh.replicas["generator"]]
    outcomes: list[tuple[list[gateway_pb2.AskResponse], grpc.RpcError | None]] = []
    start = threading.Barrier(QUESTIONS)

    def ask(number: int) -> None:
        request = gateway_pb2.AskRequest(
            question=f"What may a hotel in Paris cost per night ({number})?",
            parameters=common_pb2.GenerationParameters(max_new_tokens=8, temperature=0),
        )
        received: list[gateway_pb2.AskResponse] = []
        with client.connect(mesh.layout.front_address) as channel:
            start.wait()
            try:
                received.extend(gateway_pb2_grpc.GatewayStub(channel).Ask(request, timeout=300))
                outcomes.append((received, None))
            except grpc.RpcError as error:
                outcomes.append((received, error))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(QUESTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    answered = [messages for messages, error in outcomes if error is None]
    refused = [(messages, error) for messages, error in outcomes if error is not None]
    assert answered and refused, f"{len(answered)} answered, {len(refused)} refused"
    for messages in answered:
        kinds = [m.WhichOneof("event") for m in messages]
        assert kinds[-1] == "done" and "sources" in kinds
        assert set(kinds[: kinds.index("sources")]) <= {"queued"}  # waiting comes before the sources
    for messages, error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error  # type: ignore[attr-defined]
        assert messages == []  # refused before anything was sent
        assert (retry_after_of(error) or 0) > 0
    assert calls_ok(embedder, "Embed") - embeds == len(answered)
    assert calls_ok(retriever, "Search") - searches == len(answered)
    served = [calls_ok(g, "AdmitAndGenerate") - before for g, before in zip(mesh.replicas["generator"], served_before)]
    assert sum(served) == len(answered) and min(served) >= 1, served
