"""llama.cpp's fused (flash) attention for the local model on this CPU: prompt reading and
decoding speed, and whether the greedy answers stay the same.

    .venv/bin/python -m benchmarks.flash_attention [--prompts 6]

Each prompt is 300 tokens of distinct text (no prefix shared), 32 new tokens, greedy; the two
settings alternate prompt by prompt so that the machine's drifting pace hits both alike.
Prints a table and writes benchmarks/results/<date>-flash-attention.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import machine, median, save
from services.generator.config import bundled_model_path

PROMPT_TOKENS = 300
NEW_TOKENS = 32


def main() -> None:
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    args = parser.parse_args()
    models = {
        flash: Llama(model_path=str(bundled_model_path()), n_ctx=2048, n_threads=os.cpu_count() or 2, flash_attn=flash, verbose=False)
        for flash in (False, True)
    }
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    tokens = models[False].tokenize(text.encode(), add_bos=False)
    prompts = [tokens[i * PROMPT_TOKENS : (i + 1) * PROMPT_TOKENS] for i in range(args.prompts + 1)]
    figures: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
    answers: dict[bool, list[str]] = {False: [], True: []}
    for index, prompt in enumerate(prompts):
        for flash, llama in models.items():
            llama.reset()
            started = time.perf_counter()
            first: float | None = None
            pieces = []
            for chunk in llama.create_completion(prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True):
                first = first or time.perf_counter()
                pieces.append(chunk["choices"][0]["text"])
            ended = time.perf_counter()
            if index == 0 or first is None:
                continue  # the first prompt warms both up
            figures[flash][0].append(len(prompt) / (first - started))
            figures[flash][1].append((len(pieces) - 1) / (ended - first))
            answers[flash].append("".join(pieces))
    same = sum(a == b for a, b in zip(answers[False], answers[True]))

    table = Table(title=f"{args.prompts} prompts of {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, greedy")
    for column in ("attention", "prompt tokens/s (median)", "decode tokens/s (median)"):
        table.add_column(column)
    lines = ["| attention | prompt tokens/s (median) | decode tokens/s (median) |", "|---|---|---|"]
    for flash in (False, True):
        cells = ["flash" if flash else "default", f"{median(figures[flash][0]):.0f}", f"{median(figures[flash][1]):.0f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console = Console()
    console.print(table)
    console.print(f"greedy answers identical: {same} of {len(answers[True])}")
    path = save(
        "flash-attention",
        "# Local model: llama.cpp's flash attention on the CPU\n\n"
        f"Machine: {machine()}\n\n" + "\n".join(lines)
        + f"\n\nGreedy answers identical with and without: {same} of {len(answers[True])}.\n",
    )
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
