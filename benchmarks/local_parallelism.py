"""Does running more than one sequence at once pay for the local model on this CPU?

    .venv/bin/python -m benchmarks.local_parallelism [--answers 8] [--repeats 3]

The generator's local backend runs one generation at a time on one llama.cpp context with a
thread per core. The alternative measured here: one context per core (one thread each), two
generations at once. Each answer is a 300-token prompt (distinct text, so no prefix is shared)
and 32 new tokens, greedy, as the concurrency benchmark's answers are. Reported: answers/s of
each way, per repeat, and their ratio. (llama.cpp's own server decoding 8 streams in one batch
was measured before at 78 tokens/s against 69 for one stream: ../shared/design.md.)
Prints a table and writes benchmarks/results/<date>-local-parallelism.md.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, median, save
from services.generator.config import bundled_model_path

PROMPT_TOKENS = 300
NEW_TOKENS = 32


def context(threads: int):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    return Llama(model_path=str(bundled_model_path()), n_ctx=2048, n_threads=threads, verbose=False)


def prompts(llama, count: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    tokens = llama.tokenize(text.encode(), add_bos=False)
    return [tokens[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for i in range(count)]


def answer(llama, prompt: list[int]) -> None:  # type: ignore[no-untyped-def]
    for _ in llama.create_completion(prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    one = context(cores)
    pair = [context(1), context(1)]
    work = prompts(one, args.answers + 2)
    for llama in (one, *pair):  # warm-up
        answer(llama, work[-1])
    sequential, parallel = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for prompt in work[: args.answers]:
            answer(one, prompt)
        sequential.append(args.answers / (time.perf_counter() - started))
        started = time.perf_counter()
        threads = [
            threading.Thread(target=lambda llama=llama, k=k: [answer(llama, p) for p in work[k : args.answers : 2]])
            for k, llama in enumerate(pair)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        parallel.append(args.answers / (time.perf_counter() - started))

    table = Table(title=f"Local model: {args.answers} answers ({PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens)")
    for column in ("way", "answers/s per repeat", "median"):
        table.add_column(column)
    rows = [
        (f"one context, {cores} threads, one at a time", sequential),
        ("two contexts, 1 thread each, two at a time", parallel),
    ]
    lines = ["| way | answers/s per repeat | median |", "|---|---|---|"]
    for label, rates in rows:
        cells = [label, ", ".join(f"{r:.2f}" for r in rates), f"{median(rates):.2f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console = Console()
    console.print(table)
    ratio = median(parallel) / median(sequential)
    console.print(f"two at a time / one at a time: {ratio:.2f}x")
    path = save(
        "local-parallelism",
        "# Local model: one generation at a time or two\n\n"
        f"Machine: {machine()}\n\n" + "\n".join(lines) + f"\n\nTwo at a time / one at a time: {ratio:.2f}x.\n",
    )
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
