"""``ProducerSettings(durability="replicated")``: a publish returns once a replica has it.

On a single Redis without replicas, and on the local cluster with the topic's replica
stopped (SIGSTOP, shorter than the cluster's node timeout), it raises PublishError while the
event is on the master; with the replica answering it returns as usual.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from streamproc import Codec, Keys, Producer, ProducerSettings
from streamproc.errors import ConfigError, PublishError
from tests.cluster_support import LocalCluster
from tests.helpers import entries, spot

REPLICATED = ProducerSettings(durability="replicated", replica_timeout_ms=300)


def test_the_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        ProducerSettings(durability="replicated", min_replicas=0)
    with pytest.raises(ConfigError):
        ProducerSettings.from_mapping({"durability": "fsync"})


async def test_without_a_replica_a_replicated_publish_fails_and_says_where_the_event_is(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    producer = Producer(client, codec, keys, REPLICATED)
    event = spot(1)
    with pytest.raises(PublishError, match=r"0 of 1 replica\(s\).*on the master"):
        await producer.publish(event)
    [(_, fields)] = await entries(client, keys.stream("cluster"))
    assert fields[b"id"] == event.id.encode()
    # the leader-only default still returns at once, and the copy is deduplicated
    again = await Producer(client, codec, keys).append([event])
    assert again[0].duplicate


@pytest.mark.cluster
async def test_on_the_cluster_a_replicated_publish_waits_for_the_topics_replica(
    cluster_client: aioredis.Redis,
    codec: Codec[Any],
    cluster_keys: Keys,
    local_cluster: LocalCluster,
) -> None:
    keys = cluster_keys
    producer = Producer(cluster_client, codec, keys, REPLICATED)
    await producer.publish_many([spot(1), spot(2)])  # the replica acknowledged both

    assert isinstance(cluster_client, RedisCluster)
    master = cluster_client.nodes_manager.get_node_from_slot(
        key_slot(keys.stream("cluster").encode())
    )
    info: Any = await cluster_client.execute_command("INFO", "replication", target_nodes=master)
    replica_port = int(info["slave0"]["port"])
    pid = local_cluster.procs[replica_port].pid
    os.kill(pid, signal.SIGSTOP)  # well under the 5 s node timeout: no failover
    try:
        with pytest.raises(PublishError, match="not replicated"):
            await producer.publish(spot(3))
    finally:
        os.kill(pid, signal.SIGCONT)
    for _ in range(50):  # once the replica answers again, publishes go through
        try:
            await producer.publish(spot(4))
            break
        except PublishError:
            await asyncio.sleep(0.1)
    assert await cluster_client.xlen(keys.stream("cluster")) == 4
