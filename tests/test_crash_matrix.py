"""The crash-point matrix: every mutating operation, killed (SIGKILL, as `kill -9` or a power
cut) at every step between its writes to the store and to Milvus, then restarted; the gateway
must converge on its own.

Each scenario runs a real gateway process (`askmesh serve gateway`, its own SQLite store) against
real embedder, retriever (Milvus Lite) and generator servers in this process. The gateway is
started with $ASKMESH_CRASH_AT naming one crash point (askmesh.runtime.crashpoints), the operation
is called, and the process must die there (exit by SIGKILL: a point never reached fails the
test). A fresh gateway is started on the same store; its start-up reconciler runs before it
answers SERVING. Then, for every scenario:
- the operation either completed or left no trace (its outcome is in the table);
- nothing is locked: no document is pending, deleting or settling, no version is left abandoned,
  every knowledge base is ready (or gone);
- Milvus holds exactly one version of each document, the one the store shows, and nothing of a
  deleted document or knowledge base;
- the same call again succeeds, and an Ask on the knowledge base is answered.
The table of crash points covered is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.mesh import free_ports
from askmesh.runtime.crashpoints import CRASH_AT_ENV
from askmesh.v1 import (
    common_pb2,
    embedder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    generator_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    retriever_pb2_grpc,
)
from services.embedder.engine import EmbeddingEngine
from services.embedder.servicer import EmbedderServicer
from services.ingestor.store_sqlite import SqliteStore
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer
from services.retriever.config import RetrieverSettings
from services.retriever.engine import RetrievalEngine, alias_name
from services.retriever.servicer import RetrieverServicer
from services.gateway.main import build as build_gateway
from tests.conftest import REPO_ROOT, gateway_settings, start_in_process, start_runner

TEXT_V1 = (REPO_ROOT / "samples" / "travel-policy.md").read_text()
TEXT_V2 = TEXT_V1.replace("260 euros", "275 euros") + "\n\nTaxis are reimbursed up to 40 euros per ride.\n"
SHORT = common_pb2.GenerationParameters(max_new_tokens=2, temperature=0)
TABLE: list[tuple[str, str, str, str]] = []


@dataclass
class Tiers:
    addresses: dict[str, str]
    retrieval: RetrievalEngine


@pytest.fixture(scope="module")
async def tiers(
    embedding_engine: EmbeddingEngine, generation_engine: GenerationEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Tiers]:
    retrieval = RetrievalEngine(RetrieverSettings(milvus_uri=str(tmp_path_factory.mktemp("milvus") / "milvus.db")))
    await retrieval.start()
    servicers = {
        "embedder": ("askmesh.v1.Embedder", embedder_pb2_grpc.add_EmbedderServicer_to_server, EmbedderServicer(embedding_engine)),
        "retriever": ("askmesh.v1.Retriever", retriever_pb2_grpc.add_RetrieverServicer_to_server, RetrieverServicer(retrieval)),
        "generator": ("askmesh.v1.Generator", generator_pb2_grpc.add_GeneratorServicer_to_server, GeneratorServicer(generation_engine)),
    }
    runners, addresses = [], {}
    for name, (service, add, servicer) in servicers.items():
        runner = await start_in_process(name, service, lambda s, add=add, servicer=servicer: add(servicer, s))
        runners.append(runner)
        addresses[name] = f"127.0.0.1:{runner.port}"
    yield Tiers(addresses, retrieval)
    for runner in runners:
        await runner.stop()
    await retrieval.close()
    print_table()


def print_table() -> None:
    if not TABLE:
        return
    width = max(len(row[0]) for row in TABLE)
    lines = [f"{'crash point':<{width}}  {'operation':<22} {'after restart':<22} checks", "-" * (width + 70)]
    lines += [f"{point:<{width}}  {operation:<22} {outcome:<22} {checks}" for point, operation, outcome, checks in TABLE]
    lines.append(f"{len({row[0] for row in TABLE})} crash points, {len(TABLE)} scenarios: every one converged")
    print("\n" + "\n".join(lines))


class Ingestor:
    """One `askmesh serve ingestor` process on the scenario's store."""

    def __init__(self, tiers: Tiers, data: Path, crash_at: str = "") -> None:
        (port,) = free_ports(1)
        self.address = f"127.0.0.1:{port}"
        env = {
            **os.environ,
            "ASKMESH_INGESTOR_PORT": str(port),
            "ASKMESH_INGESTOR_EMBEDDER_ADDRESS": tiers.addresses["embedder"],
            "ASKMESH_INGESTOR_GENERATOR_ADDRESS": tiers.addresses["generator"],
            "ASKMESH_INGESTOR_RETRIEVER_ADDRESS": tiers.addresses["retriever"],
            "ASKMESH_INGESTOR_STORE_URL": str(data / "store.sqlite3"),
            # Short leases: a crashed request's intent is stale by the time the next gateway is up.
            "ASKMESH_INGESTOR_WRITE_LEASE_S": "1",
            "ASKMESH_INGESTOR_TASK_LEASE_S": "2",
            "ASKMESH_INGESTOR_TASK_POLL_INTERVAL_S": "0.2",
            "ASKMESH_INGESTOR_INGEST_BATCH_SIZE": "2",  # several batches, so a crash can fall between them
            "ASKMESH_INGESTOR_GRACE_PERIOD_S": "1",
            "ASKMESH_INGESTOR_RECONCILE_INTERVAL_S": "0.5",
            CRASH_AT_ENV: crash_at,
        }
        log = (data / f"gateway-{time.monotonic_ns()}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "askmesh.cli", "serve", "ingestor"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.log_path = Path(log.name)
        log.close()

    async def serving(self, timeout_s: float = 120.0) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.address)
        health = health_pb2_grpc.HealthStub(channel)
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            assert self.process.poll() is None, f"the ingestor exited: {self.log_path.read_text()[-2000:]}"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return channel
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"the ingestor did not become SERVING: {self.log_path.read_text()[-2000:]}")

    async def died_by_sigkill(self, timeout_s: float = 60.0) -> None:
        give_up = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        assert self.process.returncode == -signal.SIGKILL, (
            f"the ingestor did not crash at its crash point (exit {self.process.returncode}): {self.log_path.read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Api:
    gateway: gateway_pb2_grpc.GatewayStub
    kb: knowledge_pb2_grpc.KnowledgeBasesStub
    ingestion: ingestion_pb2_grpc.IngestionStub


def api(channel: grpc.aio.Channel) -> Api:
    return Api(
        gateway_pb2_grpc.GatewayStub(channel),
        knowledge_pb2_grpc.KnowledgeBasesStub(channel),
        ingestion_pb2_grpc.IngestionStub(channel),
    )


def add(knowledge_base: str, text: str) -> gateway_pb2.AddDocumentsRequest:
    return gateway_pb2.AddDocumentsRequest(
        knowledge_base=knowledge_base,
        documents=[gateway_pb2.Document(id="travel", title="Travel", text=text)],
        chunking=common_pb2.ChunkingOptions(chunk_size=200, chunk_overlap=20),
    )


def create(knowledge_base: str) -> knowledge_pb2.CreateKnowledgeBaseRequest:
    return knowledge_pb2.CreateKnowledgeBaseRequest(name=knowledge_base, chunking=common_pb2.ChunkingOptions(chunk_size=200, chunk_overlap=20))


async def upload(api_: Api, knowledge_base: str, text: str) -> ingestion_pb2.Task:
    async def parts() -> AsyncIterator[ingestion_pb2.UploadFileRequest]:
        yield ingestion_pb2.UploadFileRequest(
            header=ingestion_pb2.UploadFileHeader(knowledge_base=knowledge_base, file_name="travel.md", document_id="travel")
        )
        yield ingestion_pb2.UploadFileRequest(data=text.encode())

    return await api_.ingestion.UploadFile(parts(), timeout=60)


async def task_done(api_: Api, task_id: str, timeout_s: float = 120.0) -> ingestion_pb2.Task:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        task = await api_.ingestion.GetTask(ingestion_pb2.GetTaskRequest(id=task_id), timeout=10)
        if task.state in (ingestion_pb2.TASK_STATE_SUCCEEDED, ingestion_pb2.TASK_STATE_FAILED, ingestion_pb2.TASK_STATE_CANCELLED):
            return task
        await asyncio.sleep(0.2)
    raise AssertionError(f"task {task_id} did not end")


# -- what must hold after the restart -----------------------------------------------------------
# Each knowledge base's collection id, as last seen in its store: a deleted one's record is gone,
# and Milvus must hold nothing under the id it had.
KNOWN_COLLECTIONS: dict[str, str] = {}


def collection_of(data: Path, knowledge_base: str) -> str | None:
    store = SqliteStore(data / "store.sqlite3")
    try:
        record = store.get_knowledge_base(knowledge_base)
    finally:
        store.close()
    if record is not None:
        KNOWN_COLLECTIONS[knowledge_base] = record.collection
    return KNOWN_COLLECTIONS.get(knowledge_base)


def stored_versions(tiers: Tiers, data: Path, knowledge_base: str) -> dict[str, set[int]]:
    """What Milvus holds for the knowledge base: document id -> versions of its chunks."""
    client = tiers.retrieval.client
    collection = collection_of(data, knowledge_base)
    if collection is None:
        return {}
    alias = alias_name(collection)
    if not client.has_collection(alias):
        return {}
    rows = client.query(alias, filter="chunk_index >= 0", output_fields=["document_id", "document_version"], limit=16384)
    versions: dict[str, set[int]] = {}
    for row in rows:
        versions.setdefault(row["document_id"], set()).add(int(row["document_version"]))
    return versions


async def converged(tiers: Tiers, data: Path, knowledge_base: str, timeout_s: float = 60.0) -> str:
    """Waits (generously) until the gateway has converged: an intent whose lease had not run out
    when it started is finished by its next reconciler pass."""
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return check_converged(tiers, data, knowledge_base)
        except AssertionError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.2)


def check_converged(tiers: Tiers, data: Path, knowledge_base: str) -> str:
    """Nothing locked, and Milvus agrees with the store; returns the document's visible state."""
    store = SqliteStore(data / "store.sqlite3")
    try:
        record = store.get_knowledge_base(knowledge_base)
        assert record is None or record.ready, f"knowledge base left {record.state}"
        assert record is None or record.rebuilding_generation == 0, "a rebuild was left half-done"
        assert store.stale_documents(now=time.time() + 3600) == [], "a document is still pending, deleting or settling"
        assert store.abandoned_versions() == [], "an abandoned version's chunks were not removed"
        stored = stored_versions(tiers, data, knowledge_base)
        if record is None:
            assert stored == {}, f"a deleted knowledge base left chunks: {stored}"
            return "absent"
        document = store.get_document(knowledge_base, "travel")
        if document is None:
            assert "travel" not in stored, f"a deleted document left chunks: {stored}"
            return "no document"
        assert document.visible and stored.get("travel") == {document.version}, (
            f"Milvus holds versions {stored.get('travel')} of a document whose visible version is {document.version}"
        )
        return f"version {document.version}"
    finally:
        store.close()


async def tasks_ended(data: Path, timeout_s: float = 120.0) -> None:
    """Waits until no ingestion task is queued or running; every one that ran succeeded (a task
    killed mid-way is resumed from its checkpoint by the restarted gateway)."""
    store = SqliteStore(data / "store.sqlite3")
    try:
        give_up = time.monotonic() + timeout_s
        while True:
            tasks = store.list_tasks(limit=100)
            if all(task.state in ("succeeded", "failed", "cancelled") for task in tasks):
                assert all(task.state == "succeeded" for task in tasks), [(t.state, t.error) for t in tasks]
                return
            assert time.monotonic() < give_up, f"tasks did not end: {[(t.state, t.stage) for t in tasks]}"
            await asyncio.sleep(0.2)
    finally:
        store.close()


async def answered(tiers: Tiers, ingestor: Ingestor, knowledge_base: str) -> None:
    """An Ask on the knowledge base is answered, by a gateway (in this process) in front of the ingestor."""
    gateway = await start_runner(build_gateway(gateway_settings({**tiers.addresses, "ingestor": ingestor.address})))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            ask = gateway_pb2.AskRequest(question="How much is a hotel in Paris?", knowledge_base=knowledge_base, parameters=SHORT)
            messages = [m async for m in gateway_pb2_grpc.GatewayStub(channel).Ask(ask, timeout=120)]
    finally:
        await gateway.stop()
    assert messages[-1].HasField("done"), messages[-1]


# -- the scenarios --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    operation: str
    crash_at: str
    # Brings the knowledge base to where the operation starts (on a gateway that does not crash).
    setup: Callable[[Api, str], Awaitable[None]]
    # The operation; called on the crashing gateway, then again (the retry) after the restart.
    call: Callable[[Api, str], Awaitable[object]]


async def nothing(api_: Api, knowledge_base: str) -> None:
    return None


async def with_v1(api_: Api, knowledge_base: str) -> None:
    await api_.gateway.AddDocuments(add(knowledge_base, TEXT_V1), timeout=60)


async def update_to_v2(api_: Api, knowledge_base: str) -> object:
    return await api_.gateway.AddDocuments(add(knowledge_base, TEXT_V2), timeout=60)


async def create_kb(api_: Api, knowledge_base: str) -> object:
    return await api_.kb.CreateKnowledgeBase(create(knowledge_base), timeout=60)


async def delete_document(api_: Api, knowledge_base: str) -> object:
    request = knowledge_pb2.DeleteDocumentRequest(knowledge_base=knowledge_base, id="travel", allow_missing=True)
    return await api_.kb.DeleteDocument(request, timeout=60)


async def delete_kb(api_: Api, knowledge_base: str) -> object:
    return await api_.kb.DeleteKnowledgeBase(knowledge_pb2.DeleteKnowledgeBaseRequest(name=knowledge_base, allow_missing=True), timeout=60)


async def ingest_v2(api_: Api, knowledge_base: str) -> object:
    task = await upload(api_, knowledge_base, TEXT_V2)
    done = await task_done(api_, task.id)
    assert done.state == ingestion_pb2.TASK_STATE_SUCCEEDED, done.error
    return done


async def rebuild(api_: Api, knowledge_base: str) -> object:
    request = knowledge_pb2.RebuildKnowledgeBaseRequest(
        name=knowledge_base, chunking=common_pb2.ChunkingOptions(chunk_size=300, chunk_overlap=30)
    )
    task = await api_.kb.RebuildKnowledgeBase(request, timeout=60)
    done = await task_done(api_, task.id)
    assert done.state == ingestion_pb2.TASK_STATE_SUCCEEDED, done.error
    return done


WRITE_POINTS = ["doc.write.begun", "doc.write.batch", "doc.write.committed", "doc.write.settled_chunks"]
TASK_POINTS = ["task.parsing", "task.source_saved", *WRITE_POINTS]
REBUILD_POINTS = ["rebuild.planned", "rebuild.document", "rebuild.switched"]
SCENARIOS = [
    *(Scenario("AddDocuments (update)", point, with_v1, update_to_v2) for point in WRITE_POINTS),
    *(Scenario("AddDocuments (new kb)", point, nothing, update_to_v2) for point in ["kb.create.recorded", "kb.create.collection"]),
    *(Scenario("CreateKnowledgeBase", point, nothing, create_kb) for point in ["kb.create.recorded", "kb.create.collection"]),
    *(Scenario("DeleteDocument", point, with_v1, delete_document) for point in ["doc.delete.marked", "doc.delete.removed"]),
    *(Scenario("DeleteKnowledgeBase", point, with_v1, delete_kb) for point in ["kb.delete.marked", "kb.delete.dropped"]),
    *(Scenario("UploadFile (task)", point, with_v1, ingest_v2) for point in TASK_POINTS),
    *(Scenario("RebuildKnowledgeBase", point, with_v1, rebuild) for point in REBUILD_POINTS),
]


@pytest.fixture
def scenario_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: f"{s.operation}@{s.crash_at}")
async def test_an_operation_killed_at_a_crash_point_converges_after_a_restart(
    tiers: Tiers, scenario_dir: Path, scenario: Scenario
) -> None:
    knowledge_base = "crash_" + scenario.crash_at.replace(".", "_") + "_" + str(SCENARIOS.index(scenario))
    setup = Ingestor(tiers, scenario_dir)
    try:
        channel = await setup.serving()
        await scenario.setup(api(channel), knowledge_base)
        await channel.close()
    finally:
        setup.stop()
    collection_of(scenario_dir, knowledge_base)  # remembered: a delete takes the record with it

    crashing = Ingestor(tiers, scenario_dir, crash_at=scenario.crash_at)
    try:
        channel = await crashing.serving()
        try:
            await scenario.call(api(channel), knowledge_base)
        except (grpc.aio.AioRpcError, AssertionError):
            pass  # the process died under the call (an upload's task dies after the call returned)
        await crashing.died_by_sigkill()
        await channel.close()
    finally:
        crashing.stop()

    restarted = Ingestor(tiers, scenario_dir)
    try:
        channel = await restarted.serving()  # the start-up reconciler has run
        await tasks_ended(scenario_dir)  # an ingestion task that was running resumes and ends
        outcome = await converged(tiers, scenario_dir, knowledge_base)
        again = api(channel)
        await scenario.call(again, knowledge_base)  # the same call again succeeds
        final = check_converged(tiers, scenario_dir, knowledge_base)
        if scenario.call is not delete_kb:
            await answered(tiers, restarted, knowledge_base)
        else:
            # The name is free again, and a new knowledge base of that name starts empty.
            await create_kb(again, knowledge_base)
            assert stored_versions(tiers, scenario_dir, knowledge_base) == {}
        await channel.close()
        TABLE.append((scenario.crash_at, scenario.operation, outcome, f"retry ok -> {final}; nothing locked; Milvus agrees"))
    finally:
        restarted.stop()


@pytest.mark.timeout(600)
async def test_a_task_whose_worker_dies_on_every_attempt_fails_after_the_last_and_is_never_claimed_again(
    tiers: Tiers, scenario_dir: Path
) -> None:
    """A poison task: every ingestor that claims it dies while parsing it (as on a file that
    crashes its parser). After task_max_attempts (3) dead workers, the next ingestor, armed to die
    at the same point, ends the task FAILED with the reason instead of claiming it again, and
    its stored upload is gone; the knowledge base takes the next upload."""
    knowledge_base = "poison"
    setup = Ingestor(tiers, scenario_dir)
    try:
        channel = await setup.serving()
        await create_kb(api(channel), knowledge_base)
        await channel.close()
    finally:
        setup.stop()
    task_id = ""
    for _ in range(3):
        dying = Ingestor(tiers, scenario_dir, crash_at="task.parsing")
        try:
            if not task_id:
                channel = await dying.serving()
                task_id = (await upload(api(channel), knowledge_base, TEXT_V1)).id
                await channel.close()
            # A later one may claim the task (and die) before it is seen SERVING.
            await dying.died_by_sigkill()
        finally:
            dying.stop()
    last = Ingestor(tiers, scenario_dir, crash_at="task.parsing")
    try:
        channel = await last.serving()
        ended = await task_done(api(channel), task_id)
        assert ended.state == ingestion_pb2.TASK_STATE_FAILED
        assert ended.error == "the worker processing it stopped 3 times (crashed or was killed)", ended.error
        assert last.process.poll() is None, "the ended task was claimed again"
        store = SqliteStore(scenario_dir / "store.sqlite3")
        try:
            assert store.upload_size(task_id) == 0, "the ended task's upload is still stored"
        finally:
            store.close()
        await channel.close()
    finally:
        last.stop()
    healthy = Ingestor(tiers, scenario_dir)
    try:
        channel = await healthy.serving()
        done = await task_done(api(channel), (await upload(api(channel), knowledge_base, TEXT_V2)).id)
        assert done.state == ingestion_pb2.TASK_STATE_SUCCEEDED, done.error
        assert await converged(tiers, scenario_dir, knowledge_base) == "version 1"
        await answered(tiers, healthy, knowledge_base)
        await channel.close()
        TABLE.append(("task.parsing x3", "UploadFile (poison)", "failed after 3", "not claimed again; spool removed; next upload ok"))
    finally:
        healthy.stop()
