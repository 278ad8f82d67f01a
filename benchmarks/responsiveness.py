"""Does the generator stay responsive while it generates? Health-check latency, idle and during
a long generation, against a real `askmesh serve generator` process.

    .venv/bin/python -m benchmarks.responsiveness [--checks 200]

The issue's bar: health checks (and other calls) answer within 50 ms while tokens are produced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from askmesh.mesh import free_port
from askmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from benchmarks.common import machine, median, percentile, save


async def health_latencies(health: health_pb2_grpc.HealthStub, count: int, interval_s: float) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        reply = await health.Check(health_pb2.HealthCheckRequest(service="askmesh.v1.Generator"), timeout=5)
        latencies.append((time.perf_counter() - started) * 1000)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(interval_s)
    return latencies


async def measure(address: str, checks: int) -> tuple[list[float], list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        generator = generator_pb2_grpc.GeneratorStub(channel)
        idle = await health_latencies(health, checks, 0.01)
        request = generator_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Write a very long story about the sea.")],
            parameters=common_pb2.GenerationParameters(max_new_tokens=2000, temperature=0.8),
        )
        call = generator.Generate(request)
        await call.read()  # tokens are being produced from here on
        busy = await health_latencies(health, checks, 0.01)
        assert not call.done(), "the generation ended before the measurement did"
        call.cancel()
        return idle, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=200)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "generator.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "askmesh.cli", "serve", "generator"],
                env={**os.environ, "ASKMESH_GENERATOR_PORT": str(port)}, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            for _ in range(600):
                try:
                    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
            idle, busy = asyncio.run(measure(f"127.0.0.1:{port}", args.checks))
        finally:
            process.terminate()
            process.wait(timeout=30)
    rows = [
        ("health check, generator idle", f"{median(idle):.1f}", f"{percentile(idle, 0.99):.1f}", f"{max(idle):.1f}"),
        ("health check, while generating", f"{median(busy):.1f}", f"{percentile(busy, 0.99):.1f}", f"{max(busy):.1f}"),
    ]
    table = Table(title="generator responsiveness (ms)")
    for column in ("", "p50", "p99", "max"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    text = "\n".join([
        "# Generator responsiveness",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python -m benchmarks.responsiveness --checks {args.checks}`.",
        "A real `askmesh serve generator` process (local SmolLM2 on llama.cpp); health checks every 10 ms,",
        f"{args.checks} idle, then {args.checks} while one long generation streams. Target: within 50 ms.",
        "",
        "| | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ])
    Console().print(f"saved to {save('responsiveness', text)}")


if __name__ == "__main__":
    main()
