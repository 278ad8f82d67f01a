"""The interface every generation backend implements."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from askmesh.v1 import common_pb2


@dataclass(frozen=True)
class GenerationInput:
    # {"role": "system" | "user" | "assistant", "content": ...}, oldest first.
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    text: str


@dataclass(frozen=True)
class FinishEvent:
    reason: common_pb2.FinishReason.ValueType
    completion_tokens: int
    prompt_tokens: int = 0  # 0 when the backend does not report it
    # Of prompt_tokens, those taken from the backend's prefix cache (0 when it does not say).
    cached_prompt_tokens: int = 0


BackendEvent = TokenEvent | FinishEvent


class GenerationBackend(Protocol):
    async def start(self) -> None:
        """Loads the model or checks the server, then runs one short warm-up generation."""

    def generate(self, request: GenerationInput) -> AsyncIterator[BackendEvent]:
        """Token events, then exactly one FinishEvent. Raises AskmeshError on failure.

        Closing the iterator early (the caller went away) must stop the generation upstream.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Prompt tokens `text` takes (exact with a local tokenizer, else estimated)."""
        ...

    async def close(self) -> None: ...


def estimated_tokens(text: str, chars_per_token: float) -> int:
    """For a backend whose tokenizer is on its server."""
    return max(1, round(len(text) / chars_per_token)) if text else 0


async def warm_up(backend: GenerationBackend, max_new_tokens: int = 1) -> None:
    """One short generation: the model (or server) answers before the replica says SERVING."""
    request = GenerationInput(
        messages=[{"role": "user", "content": "Say OK."}], max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0
    )
    async with contextlib.aclosing(backend.generate(request)) as events:  # type: ignore[type-var]
        async for _ in events:
            pass


ZERO_WIDTH_SPACE = "\u200b"
# The start of what a server's tokenizer, given a raw prompt string, would read as a special
# token: `<|im_start|>`, `<|endoftext|>` (the ChatML family's markers all begin `<|`) and named
# ones such as SmolLM2's `<file_sep>` or Llama's `</s>`. The generator's own source quotes
# (`<source>`, `</source>`, see prompting.py) are left as they are: prompting already broke any
# written inside a document, so every one left is ours.
_SPECIAL_TOKEN_START = re.compile(r"<(?!/?source>)(?=\||/?[A-Za-z_][\w.\-]*>)")


def as_plain_text(content: str) -> str:
    """`content` with a zero-width space after each `<` that could start a special token, so a
    raw-prompt server tokenizes it as text (it reads the same to a person)."""
    return _SPECIAL_TOKEN_START.sub("<" + ZERO_WIDTH_SPACE, content)


def chatml_prompt(messages: list[dict[str, str]]) -> str:
    """ChatML, the template of SmolLM2, Qwen and most small instruct models served by TGI.

    The contents are spliced into one string that the server tokenizes with special tokens
    parsed, so they go in as plain text (`as_plain_text`): a question or a document cannot
    open a turn of its own.
    """
    turns = "".join(f"<|im_start|>{m['role']}\n{as_plain_text(m['content'])}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


CHATML_STOP = "<|im_end|>"


class StopSequenceMatcher:
    """Cuts a token stream at the first stop sequence.

    A stop sequence can span tokens, so text that could still be the start of one is held back
    until the next token settles it.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text that is safe to emit now, whether a stop sequence was reached)."""
        self.pending += text
        found = [index for index in (self.pending.find(s) for s in self.stops) if index >= 0]
        if found:
            emitted, self.pending = self.pending[: min(found)], ""
            return emitted, True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if stop.startswith(self.pending[-length:]):
                    hold = max(hold, length)
                    break
        cut = len(self.pending) - hold
        emitted, self.pending = self.pending[:cut], self.pending[cut:]
        return emitted, False

    def flush(self) -> str:
        emitted, self.pending = self.pending, ""
        return emitted
