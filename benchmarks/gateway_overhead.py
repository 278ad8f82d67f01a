"""The gateway's own cost per Ask, at 16 concurrent streams, on the real local mesh.

    .venv/bin/python -m benchmarks.gateway_overhead [--streams 16] [--rounds 3]

Every `done` message carries `gateway_overhead_ms`: the Ask's total time minus the time the
gateway spent waiting on the embedder, retriever and generator. The issue's bar: under 5 ms p50
at 16 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from askmesh import client
from askmesh.mesh import LocalMesh, MeshLayout
from askmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from benchmarks.common import machine, median, percentile, save

REPO_ROOT = Path(__file__).resolve().parent.parent


async def one_round(address: str, streams: int, offset: int) -> tuple[list[float], list[float], int]:
    overheads: list[float] = []
    totals: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def ask(number: int) -> None:
            nonlocal errors
            request = gateway_pb2.AskRequest(
                # A different question each time: llama.cpp would reuse the cache of a repeated prompt.
                question=f"Question {number}: how many days may I work from abroad, and who approves it?",
                parameters=common_pb2.GenerationParameters(max_new_tokens=8, temperature=0),
            )
            try:
                async for message in stub.Ask(request, timeout=600):
                    if message.HasField("done"):
                        overheads.append(message.done.timings.gateway_overhead_ms)
                        totals.append(message.done.timings.total_ms)
            except grpc.aio.AioRpcError:
                errors += 1

        await asyncio.gather(*(ask(offset + n) for n in range(streams)))
    return overheads, totals, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        layout = MeshLayout.on_free_ports(Path(folder))
        # Room for every stream in the generator's queue: this measures the gateway, not refusals.
        with LocalMesh(layout, env={"ASKMESH_GENERATOR_MAX_QUEUED_GENERATIONS": str(args.streams)}, say=lambda _: None):
            with client.connect(layout.front_address) as channel:
                client.load_samples(channel, REPO_ROOT / "samples")
            for index in range(args.rounds):
                console.print(f"round {index + 1} of {args.rounds}: {args.streams} concurrent streams ...")
                rounds.append(asyncio.run(one_round(layout.front_address, args.streams, index * args.streams)))
    per_round = [(median(o), percentile(o, 0.99), median(t), e) for o, t, e in rounds]
    p50 = median([r[0] for r in per_round])
    p99 = median([r[1] for r in per_round])
    total = median([r[2] for r in per_round])
    errors = sum(r[3] for r in per_round)
    table = Table(title=f"gateway overhead at {args.streams} concurrent Ask streams")
    for column in ("gateway overhead p50", "p99", "Ask total p50", "errors"):
        table.add_column(column)
    table.add_row(f"{p50:.2f} ms", f"{p99:.2f} ms", f"{total:.0f} ms", str(errors))
    console.print(table)
    text = "\n".join([
        "# Gateway overhead",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python -m benchmarks.gateway_overhead --streams {args.streams} --rounds {args.rounds}`.",
        f"Real local mesh with Envoy; {args.streams} concurrent Ask streams (8 new tokens, greedy, distinct",
        f"questions), {args.rounds} rounds; figures are the median over rounds of each round's p50 and p99 of",
        "`done.timings.gateway_overhead_ms` (total minus time waiting on the three tiers). Target: < 5 ms p50.",
        "",
        "| gateway overhead p50 | p99 | Ask total p50 | errors |",
        "|---|---|---|---|",
        f"| {p50:.2f} ms | {p99:.2f} ms | {total:.0f} ms | {errors} |",
        "",
    ])
    console.print(f"saved to {save('gateway-overhead', text)}")


if __name__ == "__main__":
    main()
