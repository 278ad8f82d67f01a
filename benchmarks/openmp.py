"""How the embedder and the generator share a few cores, per OpenMP wait setting of each.

    .venv/bin/python -m benchmarks.openmp [--embeds 60] [--seconds 6]

torch (embedder) and llama.cpp (generator) both run on libgomp, whose idle threads spin before
they sleep (OMP_WAIT_POLICY, GOMP_SPINCOUNT). On the local mesh every tier shares the machine's
cores, so that spin is taken from the other tier. For each case this starts a real
`askmesh serve embedder` and `askmesh serve generator` with that case's environment and measures:
- the generator alone: tokens/s of 2 concurrent generations;
- both at once: one Embed call of one ~40-token sentence every 0.1 s while the 2 generations go
  on, its latency p50/p90/max, and the generator's tokens/s meanwhile;
- then two generator replicas, 2 generations each, per setting: total tokens/s.
askmesh.mesh.openmp_waits holds the settings chosen from these figures; the embedder's
throughput under each setting is in the suite (`--sections embedder`), which needs the embedder
alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
from rich.console import Console
from rich.table import Table

from askmesh.mesh import OPENMP_SETTINGS, free_port
from askmesh.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, generator_pb2, generator_pb2_grpc
from benchmarks.common import machine, percentile, save
from benchmarks.suite import SENTENCES, start_service, stop_process

PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
SHORT_SPIN = {"GOMP_SPINCOUNT": "10000"}
CASES: list[tuple[str, dict[str, str], dict[str, str]]] = [
    ("both passive (the mesh before)", PASSIVE, PASSIVE),
    ("both default", {}, {}),
    ("embedder passive, generator default", PASSIVE, {}),
    ("embedder short spin, generator default", SHORT_SPIN, {}),
    ("embedder short spin, generator shorter spin (the mesh, one replica each)", SHORT_SPIN, {"GOMP_SPINCOUNT": "1000"}),
    ("embedder default, generator passive", {}, PASSIVE),
]
GENERATIONS = 2
# Two generator replicas side by side (askmesh up --replicas generator=2, or a restart's overlap).
REPLICATED_GENERATOR_CASES: list[tuple[str, dict[str, str]]] = [
    ("default", {}),
    ("GOMP_SPINCOUNT=10000", SHORT_SPIN),
    ("GOMP_SPINCOUNT=1000 (the mesh, one replica)", {"GOMP_SPINCOUNT": "1000"}),
    ("PASSIVE (the mesh, two or more replicas)", PASSIVE),
]


@dataclass
class CaseResult:
    alone_tokens_per_s: float
    shared_tokens_per_s: float
    embed_ms: list[float]


def start(tier: str, case_env: dict[str, str], folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in OPENMP_SETTINGS}
    env.update({f"ASKMESH_{tier.upper()}_PORT": str(port), "HF_HUB_OFFLINE": "1", **case_env})
    # Each replica of a tier logs to its own file.
    return start_service(tier, port, env, folder / f"{tier}-{port}.log")


class Generations:
    """GENERATIONS generations at a time on each generator, one after another, tokens counted."""

    def __init__(self, addresses: list[str]) -> None:
        self.tokens = 0
        self._channels = [grpc.aio.insecure_channel(address) for address in addresses]
        self._workers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._workers = [
            asyncio.create_task(self._generate_forever(generator_pb2_grpc.GeneratorStub(channel), f"{replica}-{worker}"))
            for replica, channel in enumerate(self._channels)
            for worker in range(GENERATIONS)
        ]
        await asyncio.sleep(2)  # every generation running
        return self

    async def __aexit__(self, *_: object) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    async def _generate_forever(self, generator: generator_pb2_grpc.GeneratorStub, worker: str) -> None:
        for number in range(1_000_000):
            question = f"Write a long story about ticket {worker}-{number}."
            request = generator_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question)],
                parameters=common_pb2.GenerationParameters(max_new_tokens=64),
            )
            async for message in generator.Generate(request):
                self.tokens += message.HasField("delta")

    async def tokens_per_s(self, seconds: float) -> float:
        before, started = self.tokens, time.perf_counter()
        await asyncio.sleep(seconds)
        return (self.tokens - before) / (time.perf_counter() - started)


async def measure(generator_address: str, embedder_address: str, embeds: int, seconds: float) -> CaseResult:
    async with (
        Generations([generator_address]) as generations,
        grpc.aio.insecure_channel(embedder_address) as embedder_channel,
    ):
        embedder = embedder_pb2_grpc.EmbedderStub(embedder_channel)
        alone = await generations.tokens_per_s(seconds)
        before, started = generations.tokens, time.perf_counter()
        latencies = []
        for number in range(embeds):
            sent = time.perf_counter()
            await embedder.Embed(embedder_pb2.EmbedRequest(texts=[SENTENCES[number % len(SENTENCES)]]))
            latencies.append((time.perf_counter() - sent) * 1000)
            await asyncio.sleep(0.1)
        shared = (generations.tokens - before) / (time.perf_counter() - started)
    return CaseResult(alone, shared, latencies)


async def replicated_tokens_per_s(addresses: list[str], seconds: float) -> float:
    """Tokens/s of all `addresses` together."""
    async with Generations(addresses) as generations:
        return await generations.tokens_per_s(seconds)


async def run_cases(embeds: int, seconds: float, console: Console) -> tuple[list[list[str]], list[list[str]]]:
    """The table's rows: each case of CASES, then each two-replica case."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="askmesh-openmp-") as name:
        for label, embedder_env, generator_env in CASES:
            console.print(f"{label} ...", highlight=False)
            embedder, embedder_address = await asyncio.to_thread(start, "embedder", embedder_env, Path(name))
            try:
                generator, generator_address = await asyncio.to_thread(start, "generator", generator_env, Path(name))
                try:
                    result = await measure(generator_address, embedder_address, embeds, seconds)
                finally:
                    await asyncio.to_thread(stop_process, generator)
            finally:
                await asyncio.to_thread(stop_process, embedder)
            described = f"{label}: {embedder_env or 'default'}; {generator_env or 'default'}"
            rows.append([described, f"{result.alone_tokens_per_s:.0f}", f"{result.shared_tokens_per_s:.0f}",
                         *(f"{percentile(result.embed_ms, fraction):.0f}" for fraction in (0.5, 0.9, 1.0))])
    replicated_rows = []
    with tempfile.TemporaryDirectory(prefix="askmesh-openmp-") as name:
        for label, generator_env in REPLICATED_GENERATOR_CASES:
            console.print(f"two generator replicas, {label} ...", highlight=False)
            replicas = []
            try:
                for _ in range(2):
                    replicas.append(await asyncio.to_thread(start, "generator", generator_env, Path(name)))
                rate = await replicated_tokens_per_s([address for _, address in replicas], seconds)
            finally:
                for popen, _ in replicas:
                    await asyncio.to_thread(stop_process, popen)
            replicated_rows.append([label, f"{rate:.0f}"])
            console.print(f"  {rate:.0f} tokens/s", highlight=False)
    return rows, replicated_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeds", type=int, default=60, help="Embed calls per case, one every 0.1 s")
    parser.add_argument("--seconds", type=float, default=6.0, help="window of the generator-alone rate")
    args = parser.parse_args(argv)
    console = Console()
    table = Table(title=f"Embedder and generator on {os.cpu_count()} shared cores, by OpenMP wait setting")
    columns = ["case (embedder; generator)", "generator alone tokens/s", "generator tokens/s with embeds",
               "Embed p50 ms", "Embed p90 ms", "Embed max ms"]
    for column in columns:
        table.add_column(column)
    load_before = os.getloadavg()[0]
    # One event loop for every case: grpc.aio's poller stays bound to the loop it first ran on.
    rows, replicated_rows = asyncio.run(run_cases(args.embeds, args.seconds, console))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    lines = [
        "# OpenMP waits: embedder and generator on shared cores",
        "",
        f"Machine: {machine()}. 1-minute load average before: {load_before:.1f}.",
        f"Command: `python -m benchmarks.openmp --embeds {args.embeds} --seconds {args.seconds}`.",
        "",
        (f"Each case: a real embedder (all-MiniLM-L6-v2, torch) and generator (SmolLM2-135M, llama.cpp) process "
        f"with that environment; {GENERATIONS} concurrent generations of up to 64 tokens, one after another; "
        f"the generator's tokens/s over {args.seconds} s alone, then {args.embeds} Embed calls of one sentence "
        "every 0.1 s while it generates. default = libgomp's own (spin about 300,000 rounds, then sleep); "
        "PASSIVE = sleep at once; GOMP_SPINCOUNT=10000 = a short spin."),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        f"Two generator replicas, {GENERATIONS} generations each, tokens/s of both together over {args.seconds} s:",
        "",
        "| generator setting | tokens/s, two replicas |",
        "|---|---|",
        *["| " + " | ".join(row) + " |" for row in replicated_rows],
        "",
    ]
    console.print(f"saved to {save('openmp', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
