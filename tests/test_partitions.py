"""Partitioned topics on a single Redis: names, routing by key, a group reading every partition.

The cluster versions (partitions spread over masters, blocking per-slot reads) are in
tests/test_cluster.py.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Codec, Concern, Consumer, ConsumerSettings, Context, Keys, Producer
from streamproc.errors import ConfigError
from streamproc.keys import partition_index


def keyed(i: int, key: str) -> SpotInterruption:
    return SpotInterruption(
        cluster_id=key or "c",
        key=key,
        instance_id=f"i-{i}",
        instance_type="m5.large",
        availability_zone="eu-west-1a",
    )


def test_partition_names_and_tags() -> None:
    keys = Keys("sp", partitions={"cluster": 3, "big": 120})
    assert keys.partitions_of("cluster") == ("cluster.p00", "cluster.p01", "cluster.p02")
    assert keys.partitions_of("big")[-1] == "big.p119"
    assert keys.partitions_of("other") == ("other",)
    assert keys.stream("cluster.p01") == "sp:{cluster.p01}:stream"
    assert keys.all_partitions(["other", "cluster"])[:2] == ["other", "cluster.p00"]


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, True, "3"])
def test_a_partition_count_outside_1_to_1024_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="partitions must be"):
        Keys("sp", partitions={"cluster": bad})


def test_routing_is_crc32_of_the_key_and_of_the_id_without_one() -> None:
    """Documented so that any language can route the same way: zlib/IEEE CRC-32 mod N."""
    keys = Keys("sp", partitions={"cluster": 6})
    assert partition_index("c1", "e1", 6) == zlib.crc32(b"c1") % 6 == 5
    assert keys.partition("cluster", "c1", "anything") == "cluster.p05"
    assert keys.partition("cluster", "", "e1") == f"cluster.p{zlib.crc32(b'e1') % 6:02d}"
    assert keys.partition("other", "c1", "e1") == "other"  # not partitioned
    spread = {keys.partition("cluster", "", f"e{i}") for i in range(100)}
    assert len(spread) == 6  # events without a key are spread, not piled on one partition


async def test_a_group_reads_every_partition_each_key_in_order(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    pkeys = Keys(keys.prefix, partitions={"cluster": 4})
    producer = Producer(client, codec, pkeys)
    seen: dict[str, list[int]] = {}

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.setdefault(event.key, []).append(int(event.instance_id[2:]))

    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: handle}),
        client=client,
        codec=codec,
        keys=pkeys,
        producer=producer,
        settings=ConsumerSettings(consumer="c1"),
    )
    await consumer.ensure_groups()
    events = [keyed(i, f"k{i % 5}" if i % 10 else "") for i in range(50)]
    await producer.publish_many(events)
    lengths = [int(await client.xlen(pkeys.stream(p))) for p in pkeys.partitions_of("cluster")]
    assert sum(lengths) == 50
    assert sum(1 for n in lengths if n) >= 2
    assert await client.exists(pkeys.stream("cluster")) == 0  # no unpartitioned stream
    while await consumer.process_once():
        pass
    assert sum(len(v) for v in seen.values()) == 50
    for key, order in seen.items():
        if key:
            assert order == sorted(order), key


@pytest.mark.parametrize("topic", ["cluster", "cluster.p03", "a-b_c.d"])
def test_every_key_a_topics_scripts_touch_shares_the_streams_slot(topic: str) -> None:
    """CROSSSLOT regression: publish (stream + markers), settle (stream + seen marks + hold +
    parked + effect state), fail (stream + failed marker + delayed / DLQ), pump (delayed +
    retry stream + DLQ), renew / reclaim (stream + clock) and DLQ replay each run as one
    script on the stream's node, so every key they get must hash to the stream's slot."""
    from redis.crc import key_slot

    keys = Keys("sp")
    slot = key_slot(keys.stream(topic).encode())
    built: list[str | bytes] = [
        keys.retry_stream(topic, "g"),
        keys.delayed(topic, "g"),
        keys.dlq(topic, "g"),
        keys.published_prefix(topic) + "meta",
        keys.published_prefix(topic) + "idem{tag}",
        keys.failed(keys.stream(topic), "g", b"1-0"),
        keys.failed(keys.retry_stream(topic, "g"), "g", b"1-0"),
        keys.upkeep(topic, "g"),
        keys.hold(topic, "g"),
        keys.parked(topic, "g", b"key{x}"),
        keys.replays(topic, "g"),
        keys.topic_state(topic, "effects", "{other}"),
    ]
    for key in built:
        raw = key if isinstance(key, bytes) else key.encode()
        assert key_slot(raw) == slot, key


def test_partitions_come_from_the_environment_for_every_role() -> None:
    from streamproc.config import load_config

    cfg = load_config({"STREAMPROC_PARTITIONS": "cluster=6, metrics=3", "STREAMPROC_PREFIX": "x"})
    assert cfg.partitions == {"cluster": 6, "metrics": 3}
    assert cfg.keys().stream(cfg.keys().partitions_of("metrics")[2]) == "x:{metrics.p02}:stream"
    assert load_config({}).keys().partitions == {}
    for bad in ("cluster", "cluster=x", "cluster=0", "bad{=2"):
        with pytest.raises(ConfigError, match="STREAMPROC_PARTITIONS"):
            load_config({"STREAMPROC_PARTITIONS": bad})


async def test_declared_groups_and_dead_letters_cover_every_partition(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    from streamproc import Permanent
    from streamproc.dlq import dead_letters
    from streamproc.groups import ensure_declared_groups, group_info

    pkeys = Keys(keys.prefix, partitions={"cluster": 3})
    created = await ensure_declared_groups(client, pkeys, {"cluster": ("g",)})
    assert sorted(created) == [(p, "g") for p in pkeys.partitions_of("cluster")]
    for p in pkeys.partitions_of("cluster"):
        assert await group_info(client, pkeys.stream(p), "g") is not None

    async def fail(event: SpotInterruption, ctx: Context) -> None:
        raise Permanent("no")

    concern = Concern(group="g", topics=("cluster",), handlers={SpotInterruption: fail})
    producer = Producer(client, codec, pkeys)
    consumer = Consumer(
        concern,
        client=client,
        codec=codec,
        keys=pkeys,
        producer=producer,
        settings=ConsumerSettings(consumer="c1"),
    )
    await producer.publish_many([keyed(i, f"k{i}") for i in range(6)])
    while await consumer.process_once():
        pass
    letters = await dead_letters(client, pkeys, concern)
    assert len(letters) == 6
    assert {d.topic for d in letters} <= set(pkeys.partitions_of("cluster"))


async def test_changing_the_number_of_partitions_after_a_drain_keeps_every_event(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """The documented procedure (README): stop the producers, let the group drain (lag and
    pending 0 on every partition), give every role the new count, restart. Nothing is lost
    and each key is in order within the new layout; a partition no longer used (shrinking)
    must be empty before it is dropped."""
    from streamproc.groups import group_info

    seen: dict[str, list[int]] = {}

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.setdefault(event.key, []).append(int(event.instance_id[2:]))

    def consumer_for(n: int) -> tuple[Keys, Producer, Consumer]:
        k = Keys(keys.prefix, partitions={"cluster": n})
        p = Producer(client, codec, k)
        c = Consumer(
            Concern(group="g", topics=("cluster",), handlers={SpotInterruption: handle}),
            client=client, codec=codec, keys=k, producer=p,
            settings=ConsumerSettings(consumer="c1"),
        )  # fmt: skip
        return k, p, c

    k2, p2, c2 = consumer_for(2)
    await c2.ensure_groups()
    await p2.publish_many([keyed(i, f"k{i % 5}") for i in range(20)])
    while await c2.process_once():
        pass
    for part in k2.partitions_of("cluster"):  # drained: nothing waiting anywhere
        info = await group_info(client, k2.stream(part), "g")
        assert info is not None
        assert (info.lag, info.pending) == (0, 0)
    k3, p3, c3 = consumer_for(3)
    await c3.ensure_groups()
    await p3.publish_many([keyed(i, f"k{i % 5}") for i in range(20, 40)])
    while await c3.process_once():
        pass
    assert sum(len(v) for v in seen.values()) == 40
    for key, order in seen.items():
        assert order == sorted(order), key
    assert await client.xlen(k3.stream("cluster.p02")) > 0  # the new partition took some keys
