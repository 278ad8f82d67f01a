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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from askmesh.mesh import free_port
from askmesh.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, generator_pb2, generator_pb2_grpc
from benchmarks.common import machine, percentile, save
from benchmarks.suite import SENTENCES, stop_process, wait_serving

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
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({f"ASKMESH_{tier.upper()}_PORT": str(port), "HF_HUB_OFFLINE": "1", **case_env})
    log = folder / f"{tier}.log"
    with log.open("ab") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", "askmesh.cli", "serve", tier],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, popen, log)
    except BaseException:
        stop_process(popen)
        raise
    return popen, address


async def measure(generator_address: str, embedder_address: str, embeds: int, seconds: float) -> CaseResult:
    tokens = 0
    async with (
        grpc.aio.insecure_channel(generator_address) as generator_channel,
        grpc.aio.insecure_channel(embedder_address) as embedder_channel,
    ):
        generator = generator_pb2_grpc.GeneratorStub(generator_channel)
        embedder = embedder_pb2_grpc.EmbedderStub(embedder_channel)

        async def generate_forever(worker: int) -> None:
            nonlocal tokens
            for number in range(1_000_000):
                question = f"Write a long story about ticket {worker}-{number}."
                request = generator_pb2.GenerateRequest(
                    messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question)],
                    parameters=common_pb2.GenerationParameters(max_new_tokens=64),
                )
                async for message in generator.Generate(request):
                    tokens += message.HasField("delta")

        async def tokens_per_s(window_s: float) -> float:
            before, started = tokens, time.perf_counter()
            await asyncio.sleep(window_s)
            return (tokens - before) / (time.perf_counter() - started)

        workers = [asyncio.create_task(generate_forever(worker)) for worker in range(GENERATIONS)]
        try:
            await asyncio.sleep(2)  # both generations running
            alone = await tokens_per_s(seconds)
            before, started = tokens, time.perf_counter()
            latencies = []
            for number in range(embeds):
                sent = time.perf_counter()
                await embedder.Embed(embedder_pb2.EmbedRequest(texts=[SENTENCES[number % len(SENTENCES)]]))
                latencies.append((time.perf_counter() - sent) * 1000)
                await asyncio.sleep(0.1)
            shared = (tokens - before) / (time.perf_counter() - started)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return CaseResult(alone, shared, latencies)


async def replicated_tokens_per_s(addresses: list[str], seconds: float) -> float:
    """Tokens/s of all `addresses` together, each running GENERATIONS generations at a time."""
    tokens = 0
    channels = [grpc.aio.insecure_channel(address) for address in addresses]

    async def generate_forever(stub: generator_pb2_grpc.GeneratorStub, worker: str) -> None:
        nonlocal tokens
        for number in range(1_000_000):
            request = generator_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"Write a long story {worker}-{number}.")],
                parameters=common_pb2.GenerationParameters(max_new_tokens=64),
            )
            async for message in stub.Generate(request):
                tokens += message.HasField("delta")

    workers = [
        asyncio.create_task(generate_forever(generator_pb2_grpc.GeneratorStub(channel), f"{replica}-{worker}"))
        for replica, channel in enumerate(channels)
        for worker in range(GENERATIONS)
    ]
    try:
        await asyncio.sleep(2)
        before, started = tokens, time.perf_counter()
        await asyncio.sleep(seconds)
        return (tokens - before) / (time.perf_counter() - started)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for channel in channels:
            await channel.close()


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
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="askmesh-openmp-") as name:
        for label, embedder_env, generator_env in CASES:
            console.print(f"{label} ...", highlight=False)
            embedder, embedder_address = start("embedder", embedder_env, Path(name))
            try:
                generator, generator_address = start("generator", generator_env, Path(name))
                try:
                    result = asyncio.run(measure(generator_address, embedder_address, args.embeds, args.seconds))
                finally:
                    stop_process(generator)
            finally:
                stop_process(embedder)
            described = f"{label}: {embedder_env or 'default'}; {generator_env or 'default'}"
            row = [described, f"{result.alone_tokens_per_s:.0f}", f"{result.shared_tokens_per_s:.0f}",
                   *(f"{percentile(result.embed_ms, fraction):.0f}" for fraction in (0.5, 0.9, 1.0))]
            rows.append(row)
            table.add_row(*row)
    console.print(table)
    replicated_rows = []
    with tempfile.TemporaryDirectory(prefix="askmesh-openmp-") as name:
        for label, generator_env in REPLICATED_GENERATOR_CASES:
            console.print(f"two generator replicas, {label} ...", highlight=False)
            replicas = []
            try:
                for _ in range(2):
                    replicas.append(start("generator", generator_env, Path(name)))
                rate = asyncio.run(replicated_tokens_per_s([address for _, address in replicas], args.seconds))
            finally:
                for popen, _ in replicas:
                    stop_process(popen)
            replicated_rows.append([label, f"{rate:.0f}"])
            console.print(f"  {rate:.0f} tokens/s", highlight=False)
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
