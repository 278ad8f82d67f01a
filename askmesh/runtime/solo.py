"""One background job at a time that runs to its end even if its caller leaves (model swaps).

A swap loads a model for seconds; a caller that disconnects meanwhile must not leave the replica
half-swapped, so the job runs in its own task and the caller awaits it through a shield.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

from askmesh.runtime.errors import FailedPrecondition

Result = TypeVar("Result")


class SoloJob(Generic[Result]):
    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "embedder: a model swap", for the refusal's message
        self._task: asyncio.Task[Result] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def refuse_if_running(self) -> None:
        if self._task is not None:
            raise FailedPrecondition(f"{self.what} is already in progress")

    async def run(self, job: Coroutine[Any, Any, Result], name: str) -> Result:
        """Runs `job` to its end (FAILED_PRECONDITION if one already runs); returns its result."""
        if self._task is not None:
            job.close()
            self.refuse_if_running()
        task = asyncio.create_task(job, name=name)
        self._task = task
        task.add_done_callback(self._ended)  # before the caller's: a new job may follow at once
        return await asyncio.shield(task)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _ended(self, task: asyncio.Task[Result]) -> None:
        self._task = None
        if not task.cancelled():
            task.exception()  # retrieved here too: the caller may have left
