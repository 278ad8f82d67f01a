"""askmesh.public_api (the web tier's client of the public API) against a real grpc.aio server
on loopback whose Ingestion service ends its streams the ways the ingestor's do."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from askmesh.public_api import CallerCredentials, PublicApi
from askmesh.runtime.errors import AskmeshError
from askmesh.v1 import ingestion_pb2, ingestion_pb2_grpc
from tests.conftest import start_in_process

RUNNING = ingestion_pb2.Task(id="t-running", state=ingestion_pb2.TASK_STATE_RUNNING)
SUCCEEDED = ingestion_pb2.Task(id="t-done", state=ingestion_pb2.TASK_STATE_SUCCEEDED)


class EndingIngestion(ingestion_pb2_grpc.IngestionServicer):
    """WatchTask by task id: "t-running" fails mid-stream as the ingestor's streaming_rpc does
    (a Task carrying only the error, then the status); "t-done" says one more thing after it
    has ended; "t-reset" ends as a stream Envoy reset when its gateway replica died."""

    async def WatchTask(
        self, request: ingestion_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingestion_pb2.Task]:
        if request.id == "t-running":
            yield RUNNING
            yield ingestion_pb2.Task(error="UNAVAILABLE: ingestor: the store did not answer")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "ingestor: the store did not answer")
        elif request.id == "t-done":
            yield SUCCEEDED
            yield ingestion_pb2.Task(id="t-done", state=ingestion_pb2.TASK_STATE_RUNNING)
        else:
            await context.abort(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2")


@pytest.fixture
async def api() -> AsyncIterator[PublicApi]:
    servicer = EndingIngestion()
    runner = await start_in_process(
        "ingestor", "askmesh.v1.Ingestion", lambda server: ingestion_pb2_grpc.add_IngestionServicer_to_server(servicer, server)
    )
    address = f"127.0.0.1:{runner.port}"
    public = PublicApi(address, address)
    yield public
    await public.close()
    await runner.stop()


async def watched(api: PublicApi, task_id: str, seen: list[ingestion_pb2.Task]) -> None:
    async for task in api.watch_task(task_id, CallerCredentials()):
        seen.append(task)


async def test_a_watch_that_fails_yields_its_tasks_then_raises_its_status_not_the_error_message(api: PublicApi) -> None:
    seen: list[ingestion_pb2.Task] = []
    with pytest.raises(AskmeshError) as raised:
        await watched(api, "t-running", seen)
    assert seen == [RUNNING]
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(raised.value) == "ingestor: the store did not answer"


async def test_a_watch_ends_with_the_task_s_end(api: PublicApi) -> None:
    seen: list[ingestion_pb2.Task] = []
    await watched(api, "t-done", seen)
    assert seen == [SUCCEEDED]


async def test_a_stream_reset_by_envoy_is_unavailable(api: PublicApi) -> None:
    with pytest.raises(AskmeshError) as raised:
        await watched(api, "t-reset", [])
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
