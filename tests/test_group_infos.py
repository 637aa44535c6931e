"""``streamproc.groups``: the one reader of XINFO GROUPS, typed."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamproc import Keys
from streamproc.groups import GroupInfo, group_info, group_infos


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_every_group_of_a_stream_comes_back_typed(client: aioredis.Redis, keys: Keys) -> None:
    stream = keys.stream("g")
    ids = [_text(await client.xadd(stream, {"n": i})) for i in range(5)]
    await client.xgroup_create(stream, "fresh", id="0")
    await client.xgroup_create(stream, "busy", id="0")
    await client.xreadgroup("busy", "c1", {stream: ">"}, count=3)
    busy = await group_info(client, stream, "busy")
    assert busy == GroupInfo(
        name="busy",
        consumers=1,
        pending=3,
        last_delivered_id=ids[2],
        entries_read=3,
        lag=2,
    )
    assert busy is not None
    assert busy.backlog == 5
    fresh = await group_info(client, stream, "fresh")
    assert fresh is not None
    assert (fresh.consumers, fresh.pending, fresh.last_delivered_id, fresh.lag) == (0, 0, "0-0", 5)
    assert sorted(g.name for g in await group_infos(client, stream)) == ["busy", "fresh"]


async def test_lag_is_none_when_redis_cannot_tell(client: aioredis.Redis, keys: Keys) -> None:
    """After a deletion in the middle of what a group has not read, Redis reports lag NULL."""
    stream = keys.stream("g")
    ids = [await client.xadd(stream, {"n": i}) for i in range(5)]
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "c1", {stream: ">"}, count=1)
    await client.xdel(stream, ids[3])
    info = await group_info(client, stream, "g")
    assert info is not None
    assert info.lag is None
    assert info.backlog is None


async def test_a_missing_stream_has_no_groups(client: aioredis.Redis, keys: Keys) -> None:
    assert await group_infos(client, keys.stream("none")) == []
    assert await group_info(client, keys.stream("none"), "g") is None


async def test_a_key_of_another_type_is_an_error(client: aioredis.Redis, keys: Keys) -> None:
    await client.set(keys.stream("str"), "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await group_infos(client, keys.stream("str"))
