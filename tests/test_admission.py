"""The generator's waiting line and its estimates, on a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest

from services.generator.admission import AdmissionQueue, QueueFull


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def line(slots: int = 1, max_wait_s: float = 60.0, slot_s: float = 2.0) -> tuple[AdmissionQueue, Clock]:
    clock = Clock()
    return AdmissionQueue(slots, max_wait_s, initial_slot_s=slot_s, clock=clock), clock


async def test_a_free_slot_is_given_at_once_and_the_rest_wait_in_arrival_order() -> None:
    queue, _ = line()
    first = queue.admit()
    assert first.granted.done() and queue.standing(first).position == 0
    rest = [queue.admit() for _ in range(3)]
    assert [queue.standing(t).position for t in rest] == [1, 2, 3]
    granted = []
    for _ in range(3):
        holder = first if not granted else granted[-1]
        queue.leave(holder, finished=True)
        granted.append(next(t for t in rest if t.granted.done() and t not in granted))
    assert granted == rest


async def test_the_expected_wait_counts_slots_the_running_generations_and_time_gone_by() -> None:
    queue, clock = line(slots=2, slot_s=4.0)
    running = [queue.admit(), queue.admit()]
    clock.now += 1  # both have run 1 s of their expected 4 s
    waiting = [queue.admit() for _ in range(3)]
    waits = [queue.standing(t).estimated_wait_s for t in waiting]
    assert waits == pytest.approx([3.0, 3.0, 7.0])
    clock.now += 10  # past their expected end: each is still expected to take a tenth of the mean
    assert queue.standing(waiting[0]).estimated_wait_s == pytest.approx(0.4)
    for ticket in running + waiting:
        queue.leave(ticket)


async def test_admission_is_bounded_by_time_the_callers_bound_and_its_deadline() -> None:
    queue, _ = line(max_wait_s=5.0)
    queue.admit()
    queue.admit()  # waits 2 s
    queue.admit()  # waits 4 s
    with pytest.raises(QueueFull) as full:
        queue.admit()  # would wait 6 s
    assert full.value.estimated_wait_s == pytest.approx(6.0)
    assert full.value.limit_s == 5.0 and full.value.ahead == 3
    assert full.value.retry_after_s == pytest.approx(2.0)  # one place moves every 2 s
    assert queue.refused == 1 and len(queue.waiting) == 2
    with pytest.raises(QueueFull):
        queue.admit(max_wait_s=1.0)
    with pytest.raises(QueueFull):
        queue.admit(deadline_s=3.0)


async def test_only_generations_that_finished_move_the_mean_slot_time() -> None:
    queue, clock = line(slot_s=2.0)
    ticket = queue.admit()
    clock.now += 0.1
    queue.leave(ticket)  # its caller left: says nothing about how long generations take
    assert queue.mean_slot_s == 2.0
    ticket = queue.admit()
    clock.now += 12.0
    queue.leave(ticket, finished=True)
    assert queue.mean_slot_s == pytest.approx(2.0 + 0.2 * (12.0 - 2.0))


async def test_a_waiting_ticket_is_told_each_time_it_moves_and_when_it_gets_its_slot() -> None:
    queue, _ = line()
    holder = queue.admit()
    ahead = queue.admit()
    mine = queue.admit()
    seen: list[int] = []

    async def follow() -> None:
        async for standing in queue.wait_turn(mine):
            seen.append(standing.position)

    async def seen_count(count: int) -> None:
        while len(seen) < count:
            await asyncio.sleep(0.001)

    follower = asyncio.ensure_future(follow())
    await asyncio.wait_for(seen_count(1), timeout=5)
    queue.leave(ahead)  # leaves from the middle of the line
    await asyncio.wait_for(seen_count(2), timeout=5)
    queue.leave(holder, finished=True)
    await asyncio.wait_for(follower, timeout=5)
    assert seen == [2, 1, 0]
    queue.leave(mine)
    queue.leave(mine)  # leaving twice is harmless
    assert not queue.running and not queue.waiting


async def test_one_caller_fills_only_its_own_share_and_another_is_admitted_past_it() -> None:
    queue, _ = line(max_wait_s=9.0)  # room for four waiting calls of 2 s each
    busy = [queue.admit(caller="key-a")]
    busy += [queue.admit(caller="key-a") for _ in range(4)]  # waits 2, 4, 6, 8 s
    with pytest.raises(QueueFull):
        queue.admit(caller="key-a")  # its own fifth waiting call would wait 10 s
    other = queue.admit(caller="key-b")  # goes behind key-a's next call only
    assert queue.standing(other).position == 2
    assert queue.standing(other).estimated_wait_s == pytest.approx(4.0)
    # key-a's later calls moved back one place each, and say so.
    assert [queue.standing(t).position for t in busy[1:]] == [1, 3, 4, 5]
    assert [t.caller for t in queue.waiting] == ["key-a", "key-b", "key-a", "key-a", "key-a"]
    for ticket in [*busy, other]:
        queue.leave(ticket)


async def test_free_slots_go_to_the_callers_in_turn() -> None:
    queue, _ = line()
    holder = queue.admit(caller="a")
    waiting = [queue.admit(caller="a") for _ in range(3)] + [queue.admit(caller="b") for _ in range(2)]
    waiting.append(queue.admit(caller="c"))
    served: list[str] = []
    while queue.waiting:
        queue.leave(holder, finished=True)
        holder = next(t for t in waiting if t.granted.done() and not t.left)
        served.append(holder.caller)
    queue.leave(holder)
    assert served == ["a", "b", "c", "a", "b", "a"]


async def test_a_waiting_call_is_told_when_another_callers_call_moves_it_back() -> None:
    queue, _ = line()
    queue.admit(caller="a")
    queue.admit(caller="a")
    second = queue.admit(caller="a")
    turns = queue.wait_turn(second)
    assert (await anext(turns)).position == 2
    queue.admit(caller="b")
    assert (await asyncio.wait_for(anext(turns), 1)).position == 3
