"""Every service: NOT_SERVING until its warm-up succeeded, then SERVING; reflection lists it."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from askmesh.runtime.config import ServiceSettings
from askmesh.runtime.server import ServiceDefinition, ServiceRunner
from askmesh.v1 import embedder_pb2_grpc


async def test_not_serving_until_warm_then_serving_then_not_serving_on_stop() -> None:
    model_loaded = asyncio.Event()

    async def load_model() -> None:
        await model_loaded.wait()

    async def close() -> None:
        return None

    definition = ServiceDefinition(
        "embedder", ["askmesh.v1.Embedder"], lambda s: embedder_pb2_grpc.add_EmbedderServicer_to_server(embedder_pb2_grpc.EmbedderServicer(), s),
        start=load_model, close=close,
    )
    settings = ServiceSettings(port=1, grace_period_s=1)
    settings.port = 0
    runner = ServiceRunner(definition, settings)
    await runner.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str = "") -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("askmesh.v1.Embedder") == health_pb2.HealthCheckResponse.NOT_SERVING
        model_loaded.set()
        assert runner.warm_up is not None
        await runner.warm_up
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        assert await status("askmesh.v1.Embedder") == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name async for reply in call for s in reply.list_services_response.service}
        assert {"askmesh.v1.Embedder", "grpc.health.v1.Health"} <= services

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(runner.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
