"""Past one machine: two ingestors and two gateways on a real PostgreSQL behind Envoy.

A large file is being ingested by one ingestor when that ingestor is killed (kill -9). The other
ingestor, which shares nothing with it but the PostgreSQL store (the uploaded bytes are kept
there, not on the first one's disk), takes the task over when its lease runs out and resumes it
from the last checkpoint; the knowledge base ends with exactly the file's chunks, once each.
Questions asked through the front door the whole time are all answered."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from services.ingestor.store import open_store
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.mesh
SAMPLES = REPO_ROOT / "samples"
SHORT = common_pb2.GenerationParameters(max_new_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    layout = MeshLayout.on_free_ports(tmp_path_factory.mktemp("pgmesh"), {"ingestor": 2, "gateway": 2}, store="postgres")
    # Short task leases: the dead ingestor's task is taken over within seconds. Small batches:
    # the kill falls between checkpoints. Questions are asked all along: ingestion does not
    # wait for them here (it would, for at most 5 s per batch, by default).
    env = {
        "ASKMESH_INGESTOR_TASK_LEASE_S": "3",
        "ASKMESH_INGESTOR_INGEST_BATCH_SIZE": "8",
        "ASKMESH_INGESTOR_INGEST_YIELD_TO_QUESTIONS_S": "0",
    }
    with LocalMesh(layout, env=env, say=lambda _: None, samples_dir=SAMPLES) as started:
        yield started


def a_large_file() -> bytes:
    paragraphs = [
        f"Section {n}. The travel office number {n} keeps the receipts of trip {n} for {n % 12 + 1} months, "
        f"and a traveller in region {n % 7} books trains for journeys under {n % 5 + 2} hours."
        for n in range(400)
    ]
    return "\n\n".join(paragraphs).encode()


def upload(channel: grpc.Channel, knowledge_base: str, data: bytes) -> ingestion_pb2.Task:
    def parts() -> Iterator[ingestion_pb2.UploadFileRequest]:
        yield ingestion_pb2.UploadFileRequest(
            header=ingestion_pb2.UploadFileHeader(knowledge_base=knowledge_base, file_name="offices.txt", document_id="offices")
        )
        for start in range(0, len(data), 16 * 1024):
            yield ingestion_pb2.UploadFileRequest(data=data[start : start + 16 * 1024])

    return ingestion_pb2_grpc.IngestionStub(channel).UploadFile(parts(), timeout=60)


class Askers:
    """Questions through the front door, one after another, until stopped; every outcome kept."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            while not self._stop.is_set():
                request = gateway_pb2.AskRequest(question="What is the hotel limit in Paris?", parameters=SHORT)
                try:
                    messages = list(stub.Ask(request, timeout=120))
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")  # type: ignore[attr-defined]
                    continue
                if messages and messages[-1].HasField("done"):
                    self.answered += 1
                else:
                    self.failures.append(f"ended without done: {messages[-1] if messages else 'nothing'}")

    def __enter__(self) -> Askers:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=180)


def owner_pid(mesh: LocalMesh, task_id: str) -> int:
    """The pid of the ingestor whose worker holds the task now (worker ids are host-pid-nonce)."""
    store = open_store(mesh.store_url)
    try:
        task = store.get_task(task_id)
    finally:
        store.close()
    assert task is not None and task.owner, task
    return int(task.owner.rsplit("-", 2)[1])


def wait_for(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_task_resumes_on_another_ingestor_after_a_kill_9_while_every_question_is_answered(mesh: LocalMesh) -> None:
    front = mesh.layout.front_address
    with grpc.insecure_channel(front) as channel:
        knowledge = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
        tasks = ingestion_pb2_grpc.IngestionStub(channel)
        knowledge.CreateKnowledgeBase(
            knowledge_pb2.CreateKnowledgeBaseRequest(name="offices", chunking=common_pb2.ChunkingOptions(chunk_size=200, chunk_overlap=20)),
            timeout=60,
        )
        with Askers(front) as askers:
            task = upload(channel, "offices", a_large_file())

            def embedding_has_begun() -> bool:
                current = tasks.GetTask(ingestion_pb2.GetTaskRequest(id=task.id), timeout=10)
                return current.progress.chunks_stored > 0

            wait_for(embedding_has_begun, 120, "the first stored batch")
            victim_pid = owner_pid(mesh, task.id)
            victim = next(p for p in mesh.replicas["ingestor"] if p.popen.pid == victim_pid)
            stored_before_kill = tasks.GetTask(ingestion_pb2.GetTaskRequest(id=task.id), timeout=10).progress.chunks_stored
            victim.popen.kill()
            victim.popen.wait()

            def ended() -> bool:
                current = tasks.GetTask(ingestion_pb2.GetTaskRequest(id=task.id), timeout=10)
                return current.state in (ingestion_pb2.TASK_STATE_SUCCEEDED, ingestion_pb2.TASK_STATE_FAILED)

            wait_for(ended, 300, "the task to end on the other ingestor")
            asked_during = askers.answered
        done = tasks.GetTask(ingestion_pb2.GetTaskRequest(id=task.id), timeout=10)
        assert done.state == ingestion_pb2.TASK_STATE_SUCCEEDED, done.error
        assert done.attempts == 2  # the dead worker's attempt, then the one that finished
        survivor = next(p for p in mesh.replicas["ingestor"] if p.alive)
        assert f"task {task.id} stored offices" in Path(survivor.log_path).read_text()
        assert stored_before_kill < done.progress.chunks_total

        document = knowledge.GetDocument(knowledge_pb2.GetDocumentRequest(knowledge_base="offices", id="offices"), timeout=10)
        assert document.chunk_count == done.progress.chunks_total
    # Exactly the file's chunks in Milvus, once each (a resumed batch re-upserts the same ids).
    with grpc.insecure_channel(mesh.layout.internal_address) as internal:
        view = catalog_pb2_grpc.CatalogStub(internal).GetSearchView(catalog_pb2.GetSearchViewRequest(knowledge_base="offices"), timeout=30)
        info = retriever_pb2_grpc.RetrieverStub(internal).DescribeCollection(
            retriever_pb2.DescribeCollectionRequest(knowledge_base=view.collection), timeout=30
        )
    assert info.chunk_count == done.progress.chunks_total

    assert askers.failures == [], askers.failures[:5]
    assert asked_during >= 3
