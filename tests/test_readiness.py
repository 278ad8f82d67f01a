"""SERVING means an Ask can be answered: a gateway on its own (as Kubernetes runs it) is
NOT_SERVING until every upstream tier has answered SERVING once, then SERVING, and it stays
SERVING when a tier fails later (Envoy ejects dead replicas; a gateway cannot fix them)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from askmesh.runtime.config import ServiceSettings
from askmesh.runtime.server import ServiceDefinition, ServiceRunner
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2_grpc
from services.gateway.main import build as build_gateway
from services.generator.engine import GenerationEngine
from services.generator.servicer import GeneratorServicer
from tests.conftest import REPO_ROOT, InProcessTiers, gateway_settings, start_ingestor

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def nothing() -> None:
    return None


async def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Polls `condition` until it holds; fails the test when `timeout_s` passes first."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, "the condition did not hold in time"
        await asyncio.sleep(0.05)


async def test_a_gateway_is_not_serving_until_its_generator_is_then_stays_serving_when_it_dies(
    upstreams: InProcessTiers, generation_engine: GenerationEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="askmesh.upstream")
    # A generator whose model is still loading: NOT_SERVING until `loaded` is set.
    loaded = asyncio.Event()
    servicer = GeneratorServicer(generation_engine)
    generator = ServiceRunner(
        ServiceDefinition(
            "generator", ["askmesh.v1.Generator"],
            lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(servicer, s),
            start=loaded.wait, close=nothing,
        ),
        ServiceSettings(port=1, host="127.0.0.1", grace_period_s=1),
    )
    generator.settings.port = 0
    await generator.start()
    ingestor = await start_ingestor(upstreams.addresses, ingest_workers=0)
    settings = gateway_settings(
        {**upstreams.addresses, "generator": f"127.0.0.1:{generator.port}", "ingestor": f"127.0.0.1:{ingestor.port}"}
    )
    gateway = ServiceRunner(build_gateway(settings), ServiceSettings(port=1, grace_period_s=1))
    gateway.settings.port = 0
    await gateway.start()
    assert gateway.warm_up is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def statuses() -> list[int]:
        """The gateway's health without a service name and with its own."""
        return [
            (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
            for service in ("", "askmesh.v1.Gateway")
        ]

    generator_stopped = False
    try:
        # The gateway asked the generator and was told NOT_SERVING (the embedder, the retriever
        # and the ingestor answered SERVING): it waits for the generator alone, and says so.
        def waits_for_the_generator() -> bool:
            return any("waiting for generator at" in r.getMessage() for r in caplog.records)

        await wait_for(waits_for_the_generator)
        waiting = next(r.getMessage() for r in caplog.records if "waiting for generator at" in r.getMessage())
        assert "(NOT_SERVING)" in waiting and not {"embedder", "retriever", "ingestor"} & set(waiting.split())
        assert await statuses() == [NOT_SERVING, NOT_SERVING]
        assert not gateway.warm_up.done()

        loaded.set()
        await asyncio.wait_for(gateway.warm_up, timeout=60)
        assert await statuses() == [SERVING, SERVING]
        # SERVING means answerable: the first Ask after it succeeds.
        stub = gateway_pb2_grpc.GatewayStub(channel)
        text = (REPO_ROOT / "samples" / "travel-policy.md").read_text()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ingestor.port}") as documents:
            await gateway_pb2_grpc.GatewayStub(documents).AddDocuments(
                gateway_pb2.AddDocumentsRequest(
                    knowledge_base="readiness", documents=[gateway_pb2.Document(id="travel", title="Travel", text=text)]
                ),
                timeout=120,
            )
        request = gateway_pb2.AskRequest(
            question="What is the hotel limit in Paris?", knowledge_base="readiness",
            parameters=common_pb2.GenerationParameters(max_new_tokens=4, temperature=0),
        )
        answer = [message async for message in stub.Ask(request, timeout=120)]
        assert answer[-1].HasField("done"), answer[-1]

        # The generator dies: Asks fail naming it, but the gateway's readiness does not follow.
        await generator.stop()
        generator_stopped = True
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [message async for message in stub.Ask(request, timeout=30)]
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (raised.value.details() or "").startswith("generator tier unavailable")
        assert await statuses() == [SERVING, SERVING]
    finally:
        await channel.close()
        await gateway.stop()
        await ingestor.stop()
        if not generator_stopped:
            await generator.stop()
