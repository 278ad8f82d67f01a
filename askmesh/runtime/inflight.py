"""Counting calls in flight, so background work can step aside for interactive work."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self, at_most_s: float) -> None:
        """Returns when nothing is in flight, or after `at_most_s` (so waiting never starves)."""
        if self.count == 0:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=at_most_s)
        except TimeoutError:
            pass
