"""The generator's waiting line: each caller's share in turn, bounded by time, not by a count.

A call asks for a place (`admit`). It gets a slot at once when one is free and nobody waits;
else it is told where it stands and how long it should wait, from how long recent generations
held their slots. A call whose expected wait is longer than the longest wait (the replica's
`max_queue_wait_s`, the caller's own bound, and the caller's deadline, whichever is least) is
refused at once, before anyone spends work on it, with the time after which asking again is
likely to succeed.

The line is fair between callers (API keys): free slots go to the callers with calls waiting in
turn (round robin), each caller's own calls in arrival order. So one key sending many calls
fills only its own share: another key's call goes ahead of all but one of the first key's
waiting calls per caller, and is admitted while the first key is refused for its own long
line. Waiting calls of a busy key move back when another key's call comes in; their standings
say so. With one caller (or none named) the line is first come, first served.

The estimate is what a caller sees while it waits and what admission decides by, so it is the
one figure to get right: each slot frees when its generation is expected to end (the mean slot
time, less what the generation already ran, never below a tenth of the mean), and the waiting
calls take the slots in order as they free.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

# The mean slot time before any generation has finished here; the mean follows the generations served.
INITIAL_SLOT_SECONDS = 2.0
# Weight of the newest generation in the mean: about the last ten count.
SLOT_TIME_WEIGHT = 0.2
# A running generation past its expected end is still expected to take this share of the mean.
MIN_REMAINING_SHARE = 0.1


class QueueFull(Exception):
    """The call would wait longer than it may."""

    def __init__(self, estimated_wait_s: float, limit_s: float, retry_after_s: float, ahead: int) -> None:
        super().__init__(f"estimated wait {estimated_wait_s:.1f} s > {limit_s:.1f} s")
        self.estimated_wait_s = estimated_wait_s
        self.limit_s = limit_s
        self.retry_after_s = retry_after_s
        self.ahead = ahead


@dataclass(frozen=True)
class Standing:
    """Where a ticket stands: position 1 is next; 0 means it holds a slot."""

    position: int
    estimated_wait_s: float


@dataclass(eq=False)
class Ticket:
    number: int
    arrived_at: float
    granted: asyncio.Future[None] = field(repr=False)
    caller: str = ""
    granted_at: float | None = None
    moved: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    left: bool = False


class AdmissionQueue:
    def __init__(
        self,
        slots: int,
        max_wait_s: float,
        *,
        initial_slot_s: float = INITIAL_SLOT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.max_wait_s = max_wait_s
        self.mean_slot_s = initial_slot_s
        self.clock = clock
        self.running: list[Ticket] = []
        # Each caller's waiting calls in arrival order, and the order in which callers with
        # calls waiting get the next free slots (the first is next; served callers go last).
        self._waiting_of: dict[str, deque[Ticket]] = {}
        self._turns: deque[str] = deque()
        self.refused = 0
        self._numbers = itertools.count(1)

    @property
    def waiting(self) -> list[Ticket]:
        """The waiting calls in the order they will get slots (if nobody else comes)."""
        order: list[Ticket] = []
        lines = [list(self._waiting_of[caller]) for caller in self._turns]
        for round_ in range(max((len(line) for line in lines), default=0)):
            order.extend(line[round_] for line in lines if round_ < len(line))
        return order

    def waiting_of(self, caller: str) -> int:
        return len(self._waiting_of.get(caller, ()))

    # -- estimates ---------------------------------------------------------------------------
    def _slot_free_times(self, now: float) -> list[float]:
        """Seconds from now until each slot is expected to be free (0 for a free one)."""
        mean = self.mean_slot_s
        remaining = [
            max(mean - (now - (ticket.granted_at or now)), mean * MIN_REMAINING_SHARE) for ticket in self.running
        ]
        return remaining + [0.0] * (self.slots - len(self.running))

    def _waits(self, count: int, now: float) -> list[float]:
        """Expected waits of the first `count` places in line (waiting calls, then newcomers)."""
        free = self._slot_free_times(now)
        heapq.heapify(free)
        waits = []
        for _ in range(count):
            at = heapq.heappop(free)
            waits.append(at)
            heapq.heappush(free, at + self.mean_slot_s)
        return waits

    def _place(self, caller: str, index: int) -> int:
        """Place in line (1 is next) of the `index`-th waiting call of `caller` (index ==
        its count of waiting calls: a newcomer's). Round robin serves, in each round, one call
        of each caller with calls left, in turn order: callers before this one in turn have
        index + 1 calls served ahead of it, callers after it index."""
        ahead = index
        before = True
        for other in self._turns:
            if other == caller:
                before = False
                continue
            ahead += min(len(self._waiting_of[other]), index + 1 if before else index)
        if caller not in self._waiting_of:  # a newcomer's caller takes the last turn
            ahead = sum(min(len(line), 1) for line in self._waiting_of.values())
        return ahead + 1

    def estimated_wait_for_newcomer(self, caller: str = "") -> float:
        return self._waits(self._place(caller, self.waiting_of(caller)), self.clock())[-1]

    def standing(self, ticket: Ticket) -> Standing:
        if ticket.left:
            raise ValueError("the ticket has left the line")
        if ticket.granted.done():
            return Standing(0, 0.0)
        position = self._place(ticket.caller, self._waiting_of[ticket.caller].index(ticket))
        return Standing(position, self._waits(position, self.clock())[-1])

    # -- admission ---------------------------------------------------------------------------
    def admit(self, max_wait_s: float | None = None, deadline_s: float | None = None, caller: str = "") -> Ticket:
        """A place in line (or a slot at once); QueueFull when the expected wait is too long.

        `max_wait_s`: the caller's own bound (None or 0: the queue's); `deadline_s`: the time
        left before the caller's deadline (None: no deadline); `caller`: whose call it is (the
        line is shared fairly between callers)."""
        limit = self.max_wait_s
        if max_wait_s:
            limit = min(limit, max_wait_s)
        if deadline_s is not None:
            limit = min(limit, deadline_s)
        now = self.clock()
        ticket = Ticket(next(self._numbers), now, asyncio.get_running_loop().create_future(), caller)
        if not self._turns and len(self.running) < self.slots:
            self._grant(ticket, now)
            return ticket
        place = self._place(caller, self.waiting_of(caller))
        wait = self._waits(place, now)[-1]
        if wait > limit:
            self.refused += 1
            raise QueueFull(wait, limit, self._retry_after(wait, limit), ahead=place - 1 + len(self.running))
        if caller not in self._waiting_of:
            self._waiting_of[caller] = deque()
            self._turns.append(caller)
        self._waiting_of[caller].append(ticket)
        self._tell_waiting()  # calls of busier callers moved back
        return ticket

    def _retry_after(self, wait: float, limit: float) -> float:
        """When a newcomer's expected wait should be within the limit again: the line moves one
        place per slot each mean slot time, and never sooner than one place moves."""
        return max(wait - limit, self.mean_slot_s / self.slots)

    async def wait_turn(self, ticket: Ticket) -> AsyncIterator[Standing]:
        """Where the ticket stands now, then again each time it moves, until it holds a slot
        (the last standing is position 0). Leaving the iteration early does not give the place
        up: `leave` does."""
        while True:
            ticket.moved.clear()
            current = self.standing(ticket)
            yield current
            if current.position == 0:
                return
            moved = asyncio.ensure_future(ticket.moved.wait())
            try:
                await asyncio.wait({moved, ticket.granted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()

    def leave(self, ticket: Ticket, *, finished: bool = False) -> None:
        """Gives up the ticket's place or slot (idempotent). `finished`: its generation ran to
        its end, so its slot time counts in the mean."""
        if ticket.left:
            return
        ticket.left = True
        now = self.clock()
        if ticket in self.running:
            self.running.remove(ticket)
            if finished and ticket.granted_at is not None:
                held = now - ticket.granted_at
                self.mean_slot_s += SLOT_TIME_WEIGHT * (held - self.mean_slot_s)
        elif ticket in self._waiting_of.get(ticket.caller, ()):
            self._remove_waiting(ticket)
        if not ticket.granted.done():
            ticket.granted.cancel()
        self._grant_waiting(now)
        self._tell_waiting()

    def _tell_waiting(self) -> None:
        for line in self._waiting_of.values():
            for waiting in line:
                waiting.moved.set()

    def _remove_waiting(self, ticket: Ticket) -> None:
        line = self._waiting_of[ticket.caller]
        line.remove(ticket)
        if not line:
            del self._waiting_of[ticket.caller]
            self._turns.remove(ticket.caller)

    def _grant(self, ticket: Ticket, now: float) -> None:
        ticket.granted_at = now
        self.running.append(ticket)
        ticket.granted.set_result(None)

    def _grant_waiting(self, now: float) -> None:
        while self._turns and len(self.running) < self.slots:
            caller = self._turns.popleft()
            line = self._waiting_of[caller]
            ticket = line.popleft()
            if line:
                self._turns.append(caller)  # its next call waits for the others' turns
            else:
                del self._waiting_of[caller]
            self._grant(ticket, now)
