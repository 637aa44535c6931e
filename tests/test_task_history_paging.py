"""Paging the task history is exact: tasks that ended in the same millisecond are each listed
once, whatever the page size, through ``TaskHistory.list`` and ``GET /v1/tasks``'s ``next``
links; a cursor that is not one is a 400 naming ``before``."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamproc import Keys, Producer
from streamproc.tasks import TaskType
from streamproc.tasks.history import HistoryCursor, TaskHistory
from streamproc.tasks.store import TaskStore
from tests.test_ingest_support import Server, running_ingest

pytestmark = pytest.mark.timeout(60)

#: When the tasks "ended": one millisecond shared by most of them.
MS = 1_764_600_000_000


async def _noop(p: Any, ctx: Any) -> None:
    return None


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    types = {"page.noop": TaskType(name="page.noop", run=_noop, queue="default")}
    async with running_ingest(client, keys, producer, task_types=types) as s:
        yield s


async def ended(
    client: aioredis.Redis, keys: Keys, ids_by_ms: dict[int, list[str]], status: str = "completed"
) -> list[str]:
    """Tasks that ended at the given milliseconds (hash + history entry, as a runner leaves
    them), newest first in the history's order (score, then id, both descending)."""
    store = TaskStore(client, keys)
    for ms, ids in ids_by_ms.items():
        for task_id in ids:
            await store.create(task_id, type="page.noop", priority="normal", submitted_by="ops")
            await client.hset(keys.task(task_id), "status", status)
        await client.zadd(keys.task_history(), dict.fromkeys(ids, ms))
    return [i for ms in sorted(ids_by_ms, reverse=True) for i in sorted(ids_by_ms[ms])[::-1]]


async def all_pages(history: TaskHistory, store: TaskStore, **kw: Any) -> list[str]:
    seen: list[str] = []
    cursor: HistoryCursor | None = None
    for _ in range(1000):
        views, cursor = await history.list(store, before=cursor, **kw)
        seen += [v.id for v in views]
        if cursor is None:
            return seen
    raise AssertionError("the pages never ended")


async def test_tasks_ending_in_one_millisecond_are_each_listed_once_on_small_pages(
    client: aioredis.Redis, keys: Keys
) -> None:
    order = await ended(
        client,
        keys,
        {
            MS + 1: ["t-newer-a", "t-newer-b"],
            MS: [f"t-{n:03}" for n in range(30)],
            MS - 1: ["t-older"],
        },
    )
    history, store = TaskHistory(client, keys), TaskStore(client, keys)
    for limit in (1, 2, 3, 7, 50):
        assert await all_pages(history, store, limit=limit) == order, limit
    # A page that stops inside the millisecond because it looked at scan_max entries.
    for scan_max in (1, 4):
        assert await all_pages(history, store, limit=10, scan_max=scan_max) == order


async def test_a_millisecond_larger_than_one_read_is_read_in_full(
    client: aioredis.Redis, keys: Keys
) -> None:
    """Over 200 (one read) tasks in one millisecond, half filtered out by status: the reads
    within one call go on after the last entry, not after the last millisecond."""
    done = await ended(client, keys, {MS: [f"a-{n:03}" for n in range(0, 450, 2)]})
    await ended(client, keys, {MS: [f"a-{n:03}" for n in range(1, 450, 2)]}, status="failed")
    history, store = TaskHistory(client, keys), TaskStore(client, keys)
    for limit in (1, 150, 500):
        seen = await all_pages(history, store, limit=limit, statuses=["completed"])
        assert seen == done, limit


async def test_the_cursors_entry_leaving_the_history_loses_nothing(
    client: aioredis.Redis, keys: Keys
) -> None:
    """The last entry of a page is trimmed (or ends again) before the next page is asked for:
    the next page still starts right after where that entry was."""
    order = await ended(client, keys, {MS: [f"g-{n}" for n in range(9)], MS - 5: ["g-old"]})
    history, store = TaskHistory(client, keys), TaskStore(client, keys)
    views, cursor = await history.list(store, limit=4)
    assert cursor is not None
    assert cursor == HistoryCursor(MS, views[-1].id)
    await client.zrem(keys.task_history(), cursor.task_id)
    rest, _ = await history.list(store, limit=100, before=cursor)
    assert [v.id for v in views + rest] == order
    # Moved to a later millisecond instead (it ended again): not listed twice either.
    order.remove(cursor.task_id)
    views, cursor = await history.list(store, limit=2)
    assert cursor is not None
    await client.zadd(keys.task_history(), {cursor.task_id: MS + 10})
    rest, _ = await history.list(store, limit=100, before=cursor)
    assert [v.id for v in rest] == [i for i in order if i not in {v.id for v in views}]


def test_a_cursor_is_an_opaque_token_that_reads_back() -> None:
    for cursor in (HistoryCursor(MS, "task_123"), HistoryCursor(MS), HistoryCursor(0, "a.b:c")):
        token = cursor.encode()
        assert token.replace(".", "").isalnum()  # fits a URL as it is
        assert HistoryCursor.decode(token) == cursor
    # Bytes that are not UTF-8 read back too (they name no task: the page goes on after them).
    assert HistoryCursor.decode("5.ff").member == b"\xff"
    assert HistoryCursor.decode("5.ff").encode() == "5.ff"
    for bad in ("", "-1", "x", "1.0", "1.zz", "1.", "12.ab.cd", "1" * 19, "1 ", "1.FF"):
        with pytest.raises(ValueError, match="not a cursor"):
            HistoryCursor.decode(bad)


async def test_the_api_pages_follow_next_links_and_see_each_task_once(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    op = await srv.token("ops", [], operator=True)
    order = await ended(
        client, keys, {MS: [f"api-{n:02}" for n in range(23)], MS - 1: ["api-older"]}
    )
    await ended(client, keys, {MS: [f"bad-{n:02}" for n in range(5)]}, status="failed")
    for limit in (1, 4, 10):
        seen: list[str] = []
        path: str | None = f"/v1/tasks?status=completed&limit={limit}"
        while path is not None:
            status, page, _ = await srv.post(path, token=op, method="GET")
            assert status == 200, page
            assert len(page["tasks"]) <= limit
            seen += [t["id"] for t in page["tasks"]]
            path = page["next"]
            if path is not None:  # the filters and the limit go on in the next link
                assert "status=completed" in path
                assert f"limit={limit}" in path
        assert Counter(seen) == Counter(order), limit
        assert seen == order
    # A time in epoch ms (what the cursor was before) still pages: tasks ended before it.
    status, page, _ = await srv.post(f"/v1/tasks?before={MS}", token=op, method="GET")
    assert status == 200, page
    assert [t["id"] for t in page["tasks"]] == ["api-older"]


@pytest.mark.parametrize("bad", ["abc", "-1", "1.zz", "1.0", "12.34.56", "9" * 19, "", "1e3"])
async def test_a_cursor_that_is_not_one_is_a_400_naming_before(
    srv: Server, client: aioredis.Redis, keys: Keys, bad: str
) -> None:
    op = await srv.token("ops", [], operator=True)
    status, answer, _ = await srv.post(f"/v1/tasks?before={bad}", token=op, method="GET")
    assert status == 400, answer
    assert answer["error"] == "invalid_query"
    assert answer["path"] == "before"
    assert "before" in answer["detail"]
