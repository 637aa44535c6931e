"""The priority gate shared by the task runner and the render pool (``streamproc._gate``)."""

from __future__ import annotations

import asyncio

import pytest

from streamproc._gate import PriorityGate
from streamproc.tasks.slots import PriorityGate as TaskGate

pytestmark = pytest.mark.timeout(10)


async def settle() -> None:
    """Let every ready task run until it waits again (no wall clock involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiter(
    gate: PriorityGate[str],
    got: list[tuple[str, str]],
    name: str,
    priority: int,
    tiebreak: str = "",
) -> asyncio.Task[str]:
    """A task that takes an item from ``gate`` and records (its name, the item)."""

    async def take() -> str:
        item = await gate.take(priority, tiebreak=tiebreak)
        got.append((name, item))
        return item

    return asyncio.create_task(take(), name=name)


async def test_a_free_item_is_taken_at_once_the_last_given_back_first() -> None:
    gate = PriorityGate(["a", "b"])
    assert (gate.free, gate.waiting) == (2, 0)
    first = await gate.take()
    gate.give(first)
    assert await gate.take() == first  # the warm one again
    assert (gate.free, gate.waiting) == (1, 0)


async def test_waiters_are_served_by_priority_then_in_arrival_order() -> None:
    gate: PriorityGate[str] = PriorityGate()
    got: list[tuple[str, str]] = []
    tasks = [
        waiter(gate, got, name, prio)
        for name, prio in (("low-1", 0), ("high-1", 5), ("low-2", 0), ("top", 9), ("high-2", 5))
    ]
    await settle()
    assert gate.waiting == 5
    for i in range(5):
        gate.give(f"item-{i}")
        await settle()
    await asyncio.gather(*tasks)
    assert [name for name, _ in got] == ["top", "high-1", "high-2", "low-1", "low-2"]
    assert [item for _, item in got] == [f"item-{i}" for i in range(5)]
    assert (gate.free, gate.waiting) == (0, 0)


async def test_a_tiebreak_orders_equal_priorities_before_arrival_does() -> None:
    gate: PriorityGate[str] = PriorityGate()
    got: list[tuple[str, str]] = []
    tasks = [waiter(gate, got, name, 1, tiebreak=name) for name in ("c", "a", "b")]
    tasks.append(waiter(gate, got, "urgent", 2, tiebreak="z"))
    await settle()
    for i in range(4):
        gate.give(str(i))
    await asyncio.gather(*tasks)
    assert [name for name, _ in got] == ["urgent", "a", "b", "c"]


async def test_give_hands_the_item_to_the_most_urgent_waiter_not_to_the_pool() -> None:
    gate = PriorityGate(["only"])
    holder = await gate.take()
    got: list[tuple[str, str]] = []
    low, high = waiter(gate, got, "low", 1), waiter(gate, got, "high", 2)
    await settle()
    gate.give(holder)
    await settle()
    assert got == [("high", "only")]
    assert (gate.free, gate.waiting) == (0, 1)  # nothing went back to the pool
    assert not low.done()
    gate.give(await high)
    assert await low == "only"


async def test_a_waiter_cancelled_before_its_turn_leaves_the_queue() -> None:
    gate = PriorityGate(["only"])
    holder = await gate.take()
    got: list[tuple[str, str]] = []
    gone, next_ = waiter(gate, got, "gone", 9), waiter(gate, got, "next", 0)
    await settle()
    assert gate.waiting == 2
    gone.cancel()
    await settle()
    assert gone.cancelled()
    assert gate.waiting == 1
    gate.give(holder)
    assert await next_ == "only"
    assert got == [("next", "only")]


async def test_a_waiter_cancelled_after_it_was_handed_an_item_passes_it_on() -> None:
    """The item was set on the waiter, which had not resumed yet when it was cancelled."""
    gate = PriorityGate(["only"])
    holder = await gate.take()
    got: list[tuple[str, str]] = []
    handed, other = waiter(gate, got, "handed", 9), waiter(gate, got, "other", 0)
    await settle()
    gate.give(holder)  # "handed" gets it ...
    handed.cancel()  # ... and is cancelled before it runs again
    await settle()
    assert handed.cancelled()
    assert await other == "only"  # the item went on to the next waiter
    assert got == [("other", "only")]
    gate.give("only")
    assert (gate.free, gate.waiting) == (1, 0)


async def test_an_item_handed_to_a_cancelled_last_waiter_goes_back_to_the_pool() -> None:
    gate = PriorityGate(["only"])
    holder = await gate.take()
    handed = waiter(gate, [], "handed", 0)
    await settle()
    gate.give(holder)
    handed.cancel()
    await settle()
    assert handed.cancelled()
    assert (gate.free, gate.waiting) == (1, 0)
    assert await gate.take() == "only"


async def test_hold_gives_the_item_back_however_the_body_ends() -> None:
    gate = PriorityGate(["only"])
    held: list[str] = []

    async def body() -> None:
        async with gate.hold() as item:
            held.append(item)
            assert gate.free == 0
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await body()
    assert held == ["only"]
    assert gate.free == 1


async def test_on_waiting_is_called_whenever_the_number_of_waiters_changes() -> None:
    seen: list[int] = []
    gate: PriorityGate[str]
    gate = PriorityGate(on_waiting=lambda: seen.append(gate.waiting))
    a, b = waiter(gate, [], "a", 0), waiter(gate, [], "b", 0)
    await settle()
    b.cancel()
    await settle()
    gate.give("x")
    await a
    gate.give("x")  # nobody waits: no change, no call
    assert seen == [1, 2, 1, 0]


async def test_the_task_gate_counts_slots_and_serves_the_lowest_rank_then_the_oldest() -> None:
    """Counting mode: ``limit`` bodies at once; ranks as PRIORITIES lists them (0 first)."""
    gate = TaskGate(1)
    running: list[str] = []
    release = asyncio.Event()
    order: list[str] = []

    async def task(rank: int, seq: str) -> None:
        async with gate.slot(rank, seq):
            running.append(seq)
            order.append(seq)
            assert len(running) == 1
            await release.wait()
            running.remove(seq)

    first = asyncio.create_task(task(2, "0-first"))
    await settle()
    rest = [
        asyncio.create_task(task(rank, seq))
        for rank, seq in ((3, "1-low"), (2, "3-normal"), (2, "2-normal"), (0, "4-critical"))
    ]
    await settle()
    assert gate.waiting == 4
    release.set()
    await asyncio.gather(first, *rest)
    assert order == ["0-first", "4-critical", "2-normal", "3-normal", "1-low"]
    assert (gate.free, gate.waiting) == (1, 0)


async def test_the_task_gate_lets_limit_bodies_in_at_once() -> None:
    gate = TaskGate(2)
    async with gate.slot(2, "a"), gate.slot(2, "b"):
        assert gate.free == 0
        third = asyncio.create_task(gate.take())
        await settle()
        assert gate.waiting == 1
    await third  # a token: None
    assert (gate.free, gate.waiting) == (1, 0)
