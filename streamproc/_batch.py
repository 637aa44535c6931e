"""Group commit: requests made while a send is in flight go out together in the next one.

A lone request is sent at once (on the next turn of the event loop). Under load, the requests
that pile up behind a send share one round trip to Redis, so the per-command cost of the client
library is paid once per group instead of once per request. Each request gets its own result or
exception; a request whose caller was cancelled before its group was taken is dropped unsent.
A ``send`` that waits before its bytes go out (for a connection, a reconnect, a script load)
must look again at the last moment, through the futures ``submit`` returned: the producer does
(``Producer._write``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ("Batcher",)

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await submit(item)`` → its result from ``send(group)`` (results in item order).

    ``send`` raising fails every item of the group; an exception in its place among the
    results fails that item only.
    """

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        *,
        max_size: int,
        size: Callable[[T], int] = lambda _: 1,
        name: str = "batcher",
    ) -> None:
        self._send, self._max_size, self._size, self._name = send, max_size, size, name
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=self._name)
        return future

    async def _flush(self) -> None:
        group: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                group, size = [], 0
                waiting = self._waiting
                while waiting and (not group or size + self._size(waiting[0][0]) <= self._max_size):
                    item, future = waiting.popleft()
                    if not future.done():  # a cancelled caller sends nothing
                        group.append((item, future))
                        size += self._size(item)
                if not group:
                    continue
                try:
                    results = await self._send([item for item, _ in group])
                except Exception as e:  # each caller decides: retry or give up
                    for _, future in group:
                        if not future.done():
                            future.set_exception(e)
                else:
                    for (_, future), result in zip(group, results, strict=True):
                        if future.done():
                            continue
                        if isinstance(result, Exception):  # this item's own failure
                            future.set_exception(result)
                        else:
                            future.set_result(result)
                group = []
        finally:
            self._flusher = None
            if group or self._waiting:  # cancelled (shutdown): nobody will send these
                for _, future in [*group, *self._waiting]:
                    future.cancel()
                self._waiting.clear()
