"""A small closed-loop load driver for gRPC calls (asyncio, grpc.aio).

`drive` runs `concurrency` workers; each calls `call(number)` again and again until the window
(`duration_s`) closes or `max_calls` calls have been started, then the calls in flight finish.
A call returns what it measured (`Outcome`); a failure is counted by its status code name and
the worker pauses before its next call, as a client backing off would: for the time the server
asked for (gRPC retry pushback, with jitter so refused clients do not come back together) when
it did, else `error_backoff_s` (a refusal comes back at once: without the pause the driver would
only measure how fast it can be refused, and steal the CPU of the thing it measures).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from askmesh.runtime.errors import retry_after_of
from benchmarks.common import median, percentile


@dataclass(frozen=True)
class Outcome:
    items: int = 1  # e.g. sentences embedded by the call
    first_s: float | None = None  # time to the first streamed message that counts (first token)
    prompt_tokens: int | None = None  # of an answer, as the generator counted them


class StreamFailed(Exception):
    """A stream that ended with an error message, or without its final message."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Run:
    concurrency: int
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # of successful calls, whole call
    firsts_s: list[float] = field(default_factory=list)  # of successful calls, time to first token
    items: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # Whole-call times of failed calls, by status (how long a refusal took).
    failed_s: dict[str, list[float]] = field(default_factory=dict)
    prompt_tokens: list[int] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def calls(self) -> int:
        return self.ok + sum(self.errors.values())

    def rate(self, items: bool = True) -> float:
        """Items (or successful calls) per second over the whole run, its drain included."""
        done = self.items if items else self.ok
        return done / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    def p(self, fraction: float, first: bool = False) -> float:
        return percentile(self.firsts_s if first else self.latencies_s, fraction)


def pushback_s(error: BaseException) -> float | None:
    """The time a failed call's server asked the caller to wait before asking again."""
    if isinstance(error, grpc.aio.AioRpcError):
        return retry_after_of(error)
    return getattr(error, "retry_after_s", None)


def error_code(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    if isinstance(error, StreamFailed):
        return error.code
    if isinstance(error, asyncio.TimeoutError):
        return "CLIENT_TIMEOUT"
    return type(error).__name__


async def drive(
    call: Callable[[int], Awaitable[Outcome]],
    *,
    concurrency: int,
    duration_s: float | None = None,
    max_calls: int | None = None,
    error_backoff_s: float = 0.5,
    first_number: int = 0,
) -> Run:
    """One closed-loop run; see the module docstring."""
    if duration_s is None and max_calls is None:
        raise ValueError("drive needs duration_s or max_calls")
    run = Run(concurrency)
    numbers = itertools.count(first_number)
    started = time.perf_counter()
    window_ends = started + duration_s if duration_s is not None else float("inf")
    last_call = first_number + max_calls if max_calls is not None else None

    async def worker() -> None:
        while time.perf_counter() < window_ends:
            number = next(numbers)
            if last_call is not None and number >= last_call:
                return
            call_started = time.perf_counter()
            try:
                outcome = await call(number)
            except Exception as error:  # every failure is counted, none stops the run
                code = error_code(error)
                run.errors[code] += 1
                run.failed_s.setdefault(code, []).append(time.perf_counter() - call_started)
                asked = pushback_s(error)
                pause = asked * random.uniform(1.0, 1.5) if asked is not None else error_backoff_s
                if pause:
                    await asyncio.sleep(min(pause, max(window_ends - time.perf_counter(), 0.0)))
                continue
            run.latencies_s.append(time.perf_counter() - call_started)
            if outcome.first_s is not None:
                run.firsts_s.append(outcome.first_s)
            if outcome.prompt_tokens is not None:
                run.prompt_tokens.append(outcome.prompt_tokens)
            run.items += outcome.items

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.elapsed_s = time.perf_counter() - started
    return run


# -- figures over repeated runs ------------------------------------------------------------------
def median_of(runs: list[Run], figure: Callable[[Run], float]) -> float:
    """The median over runs of one figure of each run (runs where it is undefined are skipped)."""
    values = [value for value in (figure(run) for run in runs) if value == value]  # drop NaN
    return median(values)


def errors_text(runs: list[Run]) -> str:
    """Failed calls by status over all runs, out of all calls: `RESOURCE_EXHAUSTED 12 / 40`."""
    total: Counter[str] = Counter()
    for run in runs:
        total.update(run.errors)
    calls = sum(run.calls for run in runs)
    if not total:
        return f"0 / {calls}"
    return ", ".join(f"{code} {count}" for code, count in total.most_common()) + f" / {calls}"
