"""Issue 17 item 7: every string, integer and container an agent can send is bounded by the
schema, so no agent input reaches Redis, a consumer or a notification unbounded, and no event
ingest accepts can pass the consumers' 1 MiB limit (``streamproc.codec.MAX_DATA_BYTES``)."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import redis.asyncio as aioredis

from schemas import REGISTRY
from schemas.cluster import NodeNotReady
from streamproc import Keys, Producer
from tests.test_ingest_support import running_ingest


def _unbounded(t: mi.Type, path: str) -> list[str]:
    """Paths of the strings (also inside lists, dicts, unions) that have no max_length."""
    if isinstance(t, mi.StrType):
        return [] if t.max_length is not None else [path]
    if isinstance(t, mi.IntType):  # past 64 bits a consumer or Redis' counters cannot hold it
        return [] if t.le is not None or t.lt is not None else [path]
    if isinstance(t, mi.UnionType):
        return [p for u in t.types for p in _unbounded(u, path)]
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        own = [] if t.max_length is not None else [f"{path}[] (length)"]
        return own + _unbounded(t.item_type, f"{path}[]")
    if isinstance(t, mi.DictType):
        own = [] if t.max_length is not None else [f"{path}{{}} (length)"]
        return (
            own + _unbounded(t.key_type, f"{path}{{key}}") + _unbounded(t.value_type, f"{path}{{}}")
        )
    if isinstance(t, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
        return [p for f in t.fields for p in _unbounded(f.type, f"{path}.{f.name}")]
    return []


POSTABLE = sorted(n for n, t in REGISTRY.by_name.items() if t.external)


@pytest.mark.parametrize("type_name", POSTABLE)
def test_every_string_and_integer_an_agent_posts_is_bounded(type_name: str) -> None:
    info: Any = mi.type_info(REGISTRY.by_name[type_name])
    assert _unbounded(info, "$") == []


def test_a_huge_reason_is_refused_with_its_path() -> None:
    body = msgspec.json.encode(
        {
            "type": "cluster.node_not_ready",
            "cluster_id": "c1",
            "node_name": "n",
            "reason": "x" * 5000,
        }
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.reason"):
        msgspec.json.decode(body, type=NodeNotReady)


async def test_the_cluster_routes_path_is_checked_whatever_the_types_posted(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """worker.* events have no cluster_id field: the path's text was carried on unchecked."""
    worker = {
        "type": "worker.created",
        "worker_id": "w-1",
        "instance_id": "i-1",
        "region": "eu-west-1",
    }
    async with running_ingest(client, keys, producer) as srv:
        token = await srv.token("a", ["worker.*"])
        for bad in ("c" * 300, "c%1B%5B2J"):
            status, body, _ = await srv.post(f"/clusters/{bad}/events", worker, token=token)
            assert (status, body.get("error"), body.get("path")) == (
                422,
                "invalid_cluster_id",
                "$.cluster_id",
            ), body
    assert await client.exists(keys.stream("workers")) == 0


async def test_an_unknown_query_parameter_is_refused_not_ignored(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """``?stauts=failed`` listed everything: a typo looked like an answer (issue 17 item 18)."""
    async with running_ingest(client, keys, producer) as srv:
        op = await srv.token("op", [], operator=True)
        for path in ("/v1/tasks?stauts=failed", "/v1/schedules?prefx=a"):
            status, body, _ = await srv.post(path, token=op, method="GET")
            assert (status, body["error"], body["path"]) == (
                400,
                "invalid_query",
                path[path.index("?") + 1 : path.index("=")],
            )
