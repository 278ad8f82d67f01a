"""Calls in flight on one server, and ending them cleanly when a drain runs out of time.

Every servicer method wrapped by `unary_rpc` / `streaming_rpc` is counted here (and in the
Prometheus metrics: in flight, finished per status code, duration). On SIGTERM the
server waits for the count to reach zero within the grace period; if it does not, `expire()`
makes every call still open end with UNAVAILABLE ("server shutting down") — a stream first sends
its final error message — instead of being reset when the server is torn down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from askmesh.runtime import metrics

log = logging.getLogger("askmesh.server")

SHUTTING_DOWN = "server shutting down"


class CallTracker:
    def __init__(self, service: str) -> None:
        self.service = service
        self.in_flight: Counter[str] = Counter()
        self._changed = asyncio.Event()
        self._expired: asyncio.Future[None] | None = None

    @property
    def total(self) -> int:
        return sum(self.in_flight.values())

    @property
    def expired(self) -> asyncio.Future[None]:
        """Resolves when the grace period has run out (one shared future, awaited by every call)."""
        if self._expired is None:
            self._expired = asyncio.get_running_loop().create_future()
        return self._expired

    @contextmanager
    def track(self, method: str) -> Iterator[None]:
        """Counts the call while it runs; its metrics record the status its exception maps to."""
        self.in_flight[method] += 1
        self._changed.set()
        in_flight = metrics.CALLS_IN_FLIGHT.labels(self.service, method)
        in_flight.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except BaseException as error:
            code = _status_of(error)
            raise
        finally:
            self.in_flight[method] -= 1
            if not self.in_flight[method]:
                del self.in_flight[method]
            self._changed.set()
            in_flight.dec()
            metrics.CALLS.labels(self.service, method, code.name).inc()
            metrics.CALL_DURATION.labels(self.service, method).observe(time.perf_counter() - started)

    def expire(self) -> None:
        if not self.expired.done():
            self.expired.set_result(None)

    async def drain(self, grace_s: float, service: str) -> bool:
        """Waits until nothing is in flight (True) or the grace period ends (False), logging
        `[DRAINING] n in flight` each time the count falls."""
        give_up_at = time.monotonic() + grace_s
        last = -1
        while self.total:
            if self.total != last:
                last = self.total
                log.info("[DRAINING] %s: %d in flight %s", service, last, dict(self.in_flight))
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
            except TimeoutError:
                return False
        log.info("[DRAINING] %s: 0 in flight", service)
        return True


def _status_of(error: BaseException) -> grpc.StatusCode:
    """The status a call ending with `error` gets (the unary_rpc / streaming_rpc mapping)."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED  # the caller left (or its deadline passed)
    code = getattr(error, "code", None)  # an AskmeshError carries its status
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL
