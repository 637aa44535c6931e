"""Trimming respects declared groups: a group declared but not created yet holds trimming back."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from streamproc import Keys
from streamproc.trim import safe_point, trim_stream


async def _stream_read_and_acked_by_a(client: aioredis.Redis, stream: str, n: int) -> list[str]:
    """``n`` entries; group A read and acked every one of them."""
    await client.xgroup_create(stream, "A", id="0", mkstream=True)
    async with client.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"n": i})
        ids = [i.decode() for i in await pipe.execute()]
    reply: Any = await client.xreadgroup("A", "a1", {stream: ">"}, count=n)
    [[_, read]] = reply
    assert await client.xack(stream, "A", *[entry_id for entry_id, _ in read]) == n
    return ids


async def test_a_declared_group_that_does_not_exist_yet_holds_trimming_back(
    client: aioredis.Redis, keys: Keys
) -> None:
    """A acked everything; B is declared but missing: nothing goes, one warning says why."""
    stream = keys.stream("trim")
    ids = await _stream_read_and_acked_by_a(client, stream, 1000)
    with capture_logs() as logs:
        assert await trim_stream(client, stream, declared_groups=("A", "B")) == 0
        assert await trim_stream(client, stream, declared_groups=("A", "B")) == 0
    assert await client.xlen(stream) == 1000
    [warning] = [e for e in logs if e["event"] == "trim_held_back_by_missing_group"]
    assert (warning["stream"], warning["group"], warning["log_level"]) == (stream, "B", "warning")
    assert await safe_point(client, stream, declared_groups=("A", "B")) is None

    # Once B exists it is trimmed to B's safe point, and nothing B still needs goes.
    await client.xgroup_create(stream, "B", id=ids[599])
    removed = await trim_stream(client, stream, declared_groups=("A", "B"))
    entries: Any = await client.xrange(stream)
    left = {i.decode() for i, _ in entries}
    assert set(ids[600:]) <= left
    assert 0 < removed <= 600
    assert len(left) == 1000 - removed


async def test_without_declared_groups_the_existing_groups_decide(
    client: aioredis.Redis, keys: Keys
) -> None:
    stream = keys.stream("trim")
    await _stream_read_and_acked_by_a(client, stream, 1000)
    assert await trim_stream(client, stream) > 800  # whole nodes below A's point


async def test_the_hard_cap_still_cuts_while_a_declared_group_is_missing(
    client: aioredis.Redis, keys: Keys
) -> None:
    stream = keys.stream("trim")
    await _stream_read_and_acked_by_a(client, stream, 300)
    with capture_logs() as logs:
        removed = await trim_stream(client, stream, hard_maxlen=100, declared_groups=("A", "B"))
    assert removed == 200
    assert await client.xlen(stream) == 100
    assert {"trim_held_back_by_missing_group", "hard_cap_cut_unacked"} <= {e["event"] for e in logs}


async def test_a_missing_stream_trims_nothing(client: aioredis.Redis, keys: Keys) -> None:
    stream = keys.stream("none")
    assert await safe_point(client, stream) is None
    assert await trim_stream(client, stream, declared_groups=("A",)) == 0
