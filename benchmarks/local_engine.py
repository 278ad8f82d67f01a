"""The local generator's engine against llama-cpp-python's own completion loop, same model.

    .venv/bin/python -m benchmarks.local_engine [--answers 12]

Each answer: the gateway's instructions (the same in every prompt, as in askmesh), ~180 tokens
of distinct source text, a question, through SmolLM2's chat template; 32 new tokens, greedy.
Measured, interleaved so the machine's drifting pace hits every way alike:
- `Llama.create_completion` (what the Chatchat-style baseline and askmesh's earlier local
  backend use), one at a time, its own prefix cache on, flash attention off and on;
- askmesh's engine (services/generator/backends/local.py: the batch API, continuous batching,
  a prefix cache per slot) with one sequence at a time, and with 4 generations at once.
Reported: answers/s, time to first token p50, prompt tokens read per answer (not from a cache).
Prints a table and writes benchmarks/results/<date>-local-engine.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, median, save
from services.gateway.config import DEFAULT_SYSTEM_PROMPT
from services.generator.backends.base import FinishEvent, GenerationInput, TokenEvent
from services.generator.backends.local import LlamaCppBackend
from services.generator.config import GeneratorSettings, bundled_model_path

NEW_TOKENS = 32
SOURCE_CHARS = 700


def conversations(count: int) -> list[list[dict[str, str]]]:
    # Distinct source text for every prompt: the repository's own Python code, enough for
    # hundreds of prompts (a repeated prompt would be read from the cache).
    root = Path(__file__).resolve().parent.parent
    text = " ".join(" ".join(p.read_text().split()) for p in sorted((root / "services").rglob("*.py")))
    assert len(text) >= count * SOURCE_CHARS, "not enough distinct text for the prompts"
    return [
        [
            {"role": "system", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\nSources:\n[1] Source\n{text[i * SOURCE_CHARS:(i + 1) * SOURCE_CHARS]}"},
            {"role": "user", "content": f"What does this code do?"},
        ]
        for i in range(count)
    ]


class Figures:
    def __init__(self) -> None:
        self.rates: list[float] = []
        self.firsts: list[float] = []
        self.read: list[float] = []


def high_level(flash: bool) -> Callable[[list[list[dict[str, str]]]], Awaitable[tuple[float, list[float], list[float]]]]:
    from llama_cpp import Llama

    llama = Llama(
        model_path=str(bundled_model_path()), n_ctx=4096, n_threads=os.cpu_count() or 2, flash_attn=flash, verbose=False
    )

    async def run(batch: list[list[dict[str, str]]]) -> tuple[float, list[float], list[float]]:
        firsts, read = [], []
        started = time.perf_counter()
        for messages in batch:
            begun = time.perf_counter()
            first = None
            for chunk in llama.create_chat_completion(messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True):
                if first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - begun
            firsts.append(first or 0.0)
            read.append(float(llama.n_tokens))  # an upper bound: the cache's reuse is not reported
        return len(batch) / (time.perf_counter() - started), firsts, read

    return run


def engine(parallel: int) -> tuple[LlamaCppBackend, Callable[[list[list[dict[str, str]]]], Awaitable[tuple[float, list[float], list[float]]]]]:
    backend = LlamaCppBackend(GeneratorSettings(parallel_sequences=max(parallel, 1)))

    async def one(messages: list[dict[str, str]]) -> tuple[float, float]:
        begun = time.perf_counter()
        first = None
        read = 0.0
        request = GenerationInput(messages=messages, max_new_tokens=NEW_TOKENS, temperature=0.0, top_p=1.0)
        async with contextlib.aclosing(backend.generate(request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent) and first is None:
                    first = time.perf_counter() - begun
                elif isinstance(event, FinishEvent):
                    read = float(event.prompt_tokens - event.cached_prompt_tokens)
        return first or 0.0, read

    async def run(batch: list[list[dict[str, str]]]) -> tuple[float, list[float], list[float]]:
        started = time.perf_counter()
        if parallel == 1:
            results = [await one(messages) for messages in batch]
        else:
            gate = asyncio.Semaphore(parallel)

            async def gated(messages: list[dict[str, str]]) -> tuple[float, float]:
                async with gate:
                    return await one(messages)

            results = await asyncio.gather(*(gated(m) for m in batch))
        return len(batch) / (time.perf_counter() - started), [r[0] for r in results], [r[1] for r in results]

    return backend, run


async def measure(answers: int, repeats: int) -> dict[str, Figures]:
    ways: dict[str, Callable[[list[list[dict[str, str]]]], Awaitable[tuple[float, list[float], list[float]]]]] = {
        "create_completion, flash attention off": high_level(False),
        "create_completion, flash attention on": high_level(True),
    }
    backends = []
    for parallel in (1, 4):
        backend, run = engine(parallel)
        await backend.start()
        backends.append(backend)
        ways[f"askmesh engine, {parallel} at once"] = run
    figures = {label: Figures() for label in ways}
    prompts = conversations(answers * (repeats + 1) * len(ways))
    cursor = 0
    for label, run in ways.items():  # warm-up
        await run(prompts[cursor : cursor + 2])
        cursor += 2
    for _ in range(repeats):
        for label, run in ways.items():
            rate, firsts, read = await run(prompts[cursor : cursor + answers])
            cursor += answers
            figures[label].rates.append(rate)
            figures[label].firsts.extend(firsts)
            figures[label].read.extend(read)
    for backend in backends:
        await backend.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.answers, args.repeats))
    columns = ["way", "answers/s (median of runs)", "runs", "TTFT p50 s"]
    table = Table(title=f"Local model, {args.answers} answers a run, {NEW_TOKENS} new tokens, greedy")
    for column in columns:
        table.add_column(column)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for label, figure in figures.items():
        cells = [label, f"{median(figure.rates):.2f}", ", ".join(f"{r:.2f}" for r in figure.rates), f"{median(figure.firsts):.2f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console = Console()
    console.print(table)
    path = save(
        "local-engine",
        "# The local generator's engine beside llama-cpp-python's completion loop\n\n"
        f"Machine: {machine()}\n\nSmolLM2-135M-Instruct Q4_1; prompts of the gateway's instructions, ~180 tokens of "
        f"distinct source text and a question; {NEW_TOKENS} new tokens, greedy; {args.repeats} interleaved runs of "
        f"{args.answers} answers each way.\n\n" + "\n".join(lines) + "\n",
    )
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
