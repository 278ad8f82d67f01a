"""Context passages placed in a prompt within a budget of prompt tokens.

The instructions (the first, system, message) stay first and unchanged, and the passages follow
them: a backend's prefix cache (llama.cpp's, vLLM's automatic prefix caching) then reuses the
instructions from one question to the next, and only the passages and the question are computed
anew. Passages are taken in the order given (best first) while they fit; one that does not fit is
skipped for the next, smaller one; when not even the first fits, it is shortened to fit, so an
answer always has its best source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from askmesh.v1 import generator_pb2

CONTEXT_HEADING = "Sources:"
PASSAGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PlacedPassage:
    index: int  # into the request's passages
    text: str  # as it appears in the prompt


def passage_entry(passage: generator_pb2.ContextPassage) -> str:
    title = " ".join(passage.title.split())
    heading = f"[{passage.number}] {title}" if title else f"[{passage.number}]"
    return f"{heading}\n{passage.text.strip()}"


def _shortened(entry: str, budget: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of `entry` that fits `budget` tokens (binary search on its length)."""
    low, high = 0, len(entry)
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(entry[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    return entry[:low].rstrip()


def fit_passages(
    passages: Sequence[generator_pb2.ContextPassage], budget: int, count_tokens: Callable[[str], int]
) -> list[PlacedPassage]:
    """The passages that go into the prompt, in order, within `budget` tokens."""
    if not passages:
        return []
    placed: list[PlacedPassage] = []
    left = budget - count_tokens(CONTEXT_HEADING + "\n")
    for index, passage in enumerate(passages):
        entry = passage_entry(passage)
        cost = count_tokens(entry + PASSAGE_SEPARATOR)
        if cost <= left:
            placed.append(PlacedPassage(index, entry))
            left -= cost
    if not placed:
        shortened = _shortened(passage_entry(passages[0]), max(left, 1), count_tokens)
        if shortened:
            placed.append(PlacedPassage(0, shortened))
    return placed


def with_context(messages: list[dict[str, str]], placed: Sequence[PlacedPassage]) -> list[dict[str, str]]:
    """The conversation with the passages appended to its system message (one is added first
    when there is none)."""
    if not placed:
        return messages
    block = CONTEXT_HEADING + "\n" + PASSAGE_SEPARATOR.join(p.text for p in placed)
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": messages[0]["content"] + PASSAGE_SEPARATOR + block}
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
