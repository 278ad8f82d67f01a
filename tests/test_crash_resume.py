"""kill -9 of an ingestor in the middle of an ingestion task: a restarted ingestor resumes the task
from its last checkpoint, and the knowledge base ends with every chunk exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.mesh import free_port
from askmesh.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    ingestion_pb2,
    ingestion_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from tests.conftest import InProcessTiers

pytestmark = pytest.mark.mesh


class IngestorProcess:
    """`askmesh serve ingestor` as a real process, in front of this test's in-process tiers."""

    def __init__(self, addresses: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        data = addresses["data"]
        self.env = {
            **os.environ,
            "ASKMESH_INGESTOR_PORT": str(self.port),
            "ASKMESH_INGESTOR_EMBEDDER_ADDRESS": addresses["embedder"],
            "ASKMESH_INGESTOR_GENERATOR_ADDRESS": addresses["generator"],
            "ASKMESH_INGESTOR_RETRIEVER_ADDRESS": addresses["retriever"],
            "ASKMESH_INGESTOR_STORE_URL": f"{data}/crash.sqlite3",
            "ASKMESH_INGESTOR_INGEST_BATCH_SIZE": "4",
            "ASKMESH_INGESTOR_TASK_LEASE_S": "2",
            "ASKMESH_INGESTOR_TASK_POLL_INTERVAL_S": "0.2",
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "askmesh.cli", "serve", "ingestor"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                assert self.process.poll() is None, self.log_path.read_text()
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("the ingestor did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
async def ingestor_process(upstreams: InProcessTiers, tmp_path: Path) -> AsyncIterator[IngestorProcess]:
    process = IngestorProcess(upstreams.addresses, tmp_path / "ingestor.log")
    yield process
    process.stop()


async def test_a_killed_task_resumes_from_its_checkpoint_and_stores_every_chunk_once(
    ingestor_process: IngestorProcess, upstreams: InProcessTiers
) -> None:
    await ingestor_process.start()
    text = " ".join(f"Inventory line {i} lists crate {i} on pallet {i % 17}." for i in range(900)).encode()
    async with grpc.aio.insecure_channel(ingestor_process.address) as channel:
        kb = knowledge_pb2_grpc.KnowledgeBasesStub(channel)
        ingest = ingestion_pb2_grpc.IngestionStub(channel)
        await kb.CreateKnowledgeBase(
            knowledge_pb2.CreateKnowledgeBaseRequest(name="crash", chunking=common_pb2.ChunkingOptions(chunk_size=100, chunk_overlap=0))
        )

        async def parts() -> AsyncIterator[ingestion_pb2.UploadFileRequest]:
            yield ingestion_pb2.UploadFileRequest(header=ingestion_pb2.UploadFileHeader(knowledge_base="crash", file_name="inventory.txt"))
            yield ingestion_pb2.UploadFileRequest(data=text)

        task = await ingest.UploadFile(parts())
        while True:
            status = await ingest.GetTask(ingestion_pb2.GetTaskRequest(id=task.id))
            if status.progress.chunks_stored >= 40:
                break
            assert status.state in (ingestion_pb2.TASK_STATE_QUEUED, ingestion_pb2.TASK_STATE_RUNNING), status
            await asyncio.sleep(0.02)
    ingestor_process.kill()
    stored_at_kill = status.progress.chunks_stored
    assert stored_at_kill < status.progress.chunks_total, "the task finished before the kill"

    await ingestor_process.start()  # a new process on the same store: it reclaims the expired lease
    async with grpc.aio.insecure_channel(ingestor_process.address) as channel:
        ingest = ingestion_pb2_grpc.IngestionStub(channel)
        updates = [t async for t in ingest.WatchTask(ingestion_pb2.WatchTaskRequest(id=task.id), timeout=300)]
        final = updates[-1]
        assert final.state == ingestion_pb2.TASK_STATE_SUCCEEDED, final.error
        assert final.progress.chunks_stored == final.progress.chunks_total
        described = await knowledge_pb2_grpc.KnowledgeBasesStub(channel).GetKnowledgeBase(knowledge_pb2.GetKnowledgeBaseRequest(name="crash"))
        assert described.document_count == 1 and described.chunk_count == final.progress.chunks_total
        view = await catalog_pb2_grpc.CatalogStub(channel).GetSearchView(catalog_pb2.GetSearchViewRequest(knowledge_base="crash"))

    async with grpc.aio.insecure_channel(upstreams.addresses["retriever"]) as channel:
        retriever = retriever_pb2_grpc.RetrieverStub(channel)
        collection = await retriever.DescribeCollection(retriever_pb2.DescribeCollectionRequest(knowledge_base=view.collection))
    assert collection.chunk_count == final.progress.chunks_total  # every chunk exactly once

    log = ingestor_process.log_path.read_text()
    resumed = [line for line in log.splitlines() if f"task {task.id} (ingest_file) resumed at stage embedding" in line]
    assert resumed, log[-3000:]
    batches_done = int(resumed[0].rsplit(" ", 1)[-1])
    assert batches_done * 4 >= stored_at_kill - 4, "it resumed from its checkpoint, not from the start"
