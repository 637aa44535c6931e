"""One priority gate: a pool of items handed to waiters, the most urgent first.

Both in-process gates of the library are this one: the task runner's per-type gate
(``streamproc.tasks.slots.PriorityGate``: plain tokens, a counting semaphore) and the render
pool's slot handout (``streamproc.offload.RenderPool``: one gate per device, its worker slots).

- **Order**: a higher ``priority`` first; among equal priorities a lower ``tiebreak`` (the task
  runner passes time-ordered ids: the oldest first), then arrival order (FIFO).
- **Cancellation-safe**: a waiter cancelled before it got an item leaves the queue; one
  cancelled after it was handed an item (the item was set, the waiter had not resumed yet)
  gives it back, to the next waiter or to the pool. No item is ever lost.
- Items returned with ``give`` go straight to the most urgent waiter; with none waiting they
  go back to the pool, and the last one given back is the next one taken (a warm worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Generic, TypeVar

__all__ = ("PriorityGate",)

T = TypeVar("T")

#: A waiter in the heap: (-priority, tiebreak, arrival, future). Arrival is unique, so two
#: entries never compare their futures.
_Waiter = tuple[int, str, int, asyncio.Future[T]]


class PriorityGate(Generic[T]):
    """Hands out ``items``: higher ``priority`` first, then lower ``tiebreak``, then FIFO.

    ``on_waiting`` is called after the number of waiters changed (a gauge's hook).
    Invariant: while an item is free, nobody waits.
    """

    def __init__(
        self, items: Iterable[T] = (), *, on_waiting: Callable[[], None] | None = None
    ) -> None:
        self._free: list[T] = list(items)
        self._waiters: list[_Waiter[T]] = []
        self._arrival = itertools.count()
        self._on_waiting = on_waiting

    @property
    def waiting(self) -> int:
        """Callers waiting for an item."""
        return len(self._waiters)

    @property
    def free(self) -> int:
        """Items in the pool, not handed out."""
        return len(self._free)

    async def take(self, priority: int = 0, *, tiebreak: str = "") -> T:
        """An item: at once if one is free and nobody waits, else when it is this caller's turn."""
        if self._free and not self._waiters:
            return self._free.pop()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        entry: _Waiter[T] = (-priority, tiebreak, next(self._arrival), fut)
        heapq.heappush(self._waiters, entry)
        self._changed()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give(fut.result())  # handed an item as it was cancelled: pass it on
            elif entry in self._waiters:  # `give` may have dropped it already
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                self._changed()
            raise

    def give(self, item: T) -> None:
        """Return ``item`` (or add a new one): the most urgent waiter gets it, else the pool."""
        before = len(self._waiters)
        while self._waiters:
            fut = heapq.heappop(self._waiters)[3]
            if not fut.done():  # done: a cancelled waiter that has not left yet; skip it
                fut.set_result(item)
                break
        else:
            self._free.append(item)
        if len(self._waiters) != before:
            self._changed()

    @contextlib.asynccontextmanager
    async def hold(self, priority: int = 0, *, tiebreak: str = "") -> AsyncIterator[T]:
        """``take`` an item for the body, ``give`` it back after it, however the body ends."""
        item = await self.take(priority, tiebreak=tiebreak)
        try:
            yield item
        finally:
            self.give(item)

    def _changed(self) -> None:
        if self._on_waiting is not None:
            self._on_waiting()
