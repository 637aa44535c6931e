"""`streamproc replay` and `streamproc group reset` against a real Redis: one group only,
dry runs write nothing, what the group handled (acked, not pending, not dead-lettered: no
per-event marks) is not handled again unless --ignore-dedup, bad input is exit 2."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import REGISTRY, NodeNotReady, SpotInterruption
from streamproc import Codec, Concern, Consumer, ConsumerSettings, Context, Keys, Producer
from streamproc.app import App
from streamproc.errors import ConfigError, Permanent
from streamproc.replay import MAX_SEQ, parse_position
from tests.helpers import CliRun, MakeConsumer, cli_in_process, entries, spot

ROOT = Path(__file__).resolve().parent.parent


async def _nothing(event: Any, ctx: Context) -> None:
    pass


#: The application the commands load: two groups on topic "cluster" (the consumers the tests
#: drive are built by ``make_consumer`` with the same group names), and an outside reader.
APP = App(
    registry=REGISTRY,
    concerns=[
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: _nothing}),
        Concern(group="h", topics=("cluster",), handlers={SpotInterruption: _nothing}),
    ],
    extra_groups={"cluster": ("outside",)},
)

Cli = Callable[..., Awaitable[CliRun]]


@pytest.fixture
def env(redis_url: str, keys: Keys) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_APP": "tests.test_replay:APP",
    }


@pytest.fixture
def run(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    """``streamproc ARGS`` by ``main`` in this process (its own event loop: in a thread)."""

    async def go(*args: str) -> CliRun:
        return await asyncio.to_thread(cli_in_process, monkeypatch, capsys, env, *args)

    return go


class Recorder:
    """A consumer of topic ``cluster`` in ``group`` that records the instance ids it handled
    and counts them in Redis through an effect (applied by the settle that acks the entry).
    Instance ids in ``fail`` are refused with Permanent (dead-lettered)."""

    def __init__(self, make_consumer: MakeConsumer, keys: Keys, group: str) -> None:
        self.seen: list[str] = []
        self.fail: set[str] = set()
        self.counter = keys.state("test", group, "handled")

        async def handle(event: SpotInterruption, ctx: Context) -> None:
            self.seen.append(event.instance_id)
            if event.instance_id in self.fail:
                raise Permanent("refused by the test")
            ctx.effect("INCR", self.counter)

        self.consumer: Consumer = make_consumer({SpotInterruption: handle}, group=group)

    async def effects(self, client: aioredis.Redis) -> int:
        """How many times the handler's effect was applied."""
        value: Any = await client.get(self.counter)
        return int(value or 0)

    async def drain(self) -> list[str]:
        """Handle everything there is; what was handled in this call."""
        before = len(self.seen)
        while await self.consumer.process_once():
            pass
        return self.seen[before:]


async def _published(producer: Producer, n: int) -> list[str]:
    return [await producer.publish(spot(i)) for i in range(1, n + 1)]


async def test_replay_redelivers_a_range_to_one_group_and_no_other(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    g, h = Recorder(make_consumer, keys, "g"), Recorder(make_consumer, keys, "h")
    ids = await _published(producer, 5)
    assert await g.drain() == [f"i-{i}" for i in range(1, 6)]
    assert len(await h.drain()) == 5

    r = await run("replay", "g", "--from", ids[1], "--to", ids[3], "--yes", "--ignore-dedup")
    assert r.returncode == 0, r.stderr
    assert "dedup: ignored: all 3 entries are replayed; the 3 the group already handled" in (
        r.stdout
    )
    assert "replayed 3 entries to group g (3 of them already handled" in r.stdout

    assert await g.drain() == ["i-2", "i-3", "i-4"]
    assert await h.drain() == []
    assert await client.xlen(keys.retry_stream("cluster", "h")) == 0
    # The effects ran again for the replayed three only, once each (each retry-stream entry is
    # settled by its own XACK); no dedup mark was read or written.
    assert await g.effects(client) == 8
    assert await h.effects(client) == 5
    assert await client.keys(f"{keys.prefix}:{{cluster}}:seen:*") == []  # the old marks' keys
    replayed = await entries(client, keys.retry_stream("cluster", "g"))
    assert [f[b"origin"].decode() for _, f in replayed] == ids[1:4]
    counts = await client.hgetall(keys.replays("cluster", "g"))
    assert counts[b"replayed"] == b"3"
    assert counts[b"runs"] == b"1"
    assert counts[b"handled_again"] == b"3"


async def test_by_default_replay_leaves_out_entries_the_group_handled_or_holds(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """Acked entries were handled; a pending one is delivered again from the pending list (a
    replayed copy would apply its effects a second time): the default replay sends neither."""
    g = Recorder(make_consumer, keys, "g")
    ids = await producer.publish_many([spot(i) for i in range(1, 5)])
    await g.drain()
    ids.append(await producer.publish(spot(5)))
    # i-5 delivered to a consumer that died holding it: pending, last-delivered is its id
    await client.xreadgroup("g", "c9", {keys.stream("cluster"): ">"}, count=1)
    await producer.publish(spot(6))  # not delivered to g yet: left to the topic stream

    r = await run("replay", "g", "--from", ids[0], "--yes")
    assert r.returncode == 0, r.stderr
    assert "topic cluster: 5 of 5 entries in range" in r.stdout, r.stdout
    assert "dedup: 4 of 5 entries were already handled by this group" in r.stdout
    assert "pending: 1 of them are in the group's pending list" in r.stdout
    assert f"read up to {ids[4]}, the group's last delivered entry; 1 later it" in r.stdout
    assert "nothing to replay" in r.stdout
    assert "entries to group g" not in r.stdout
    assert await client.xlen(keys.retry_stream("cluster", "g")) == 0
    assert await g.drain() == ["i-6"]  # from the topic; i-5 waits for its reclaim
    assert await g.effects(client) == 5


async def test_a_dead_lettered_entry_is_not_handled_and_the_default_replay_sends_it(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    g = Recorder(make_consumer, keys, "g")
    g.fail.add("i-2")
    ids = await _published(producer, 3)
    await g.drain()
    assert await client.xlen(keys.dlq("cluster", "g")) == 1
    assert await g.effects(client) == 2
    g.fail.clear()  # the bug is fixed

    r = await run("replay", "g", "--from", ids[0], "--yes")
    assert r.returncode == 0, r.stderr
    assert "dedup: 2 of 3 entries were already handled by this group" in r.stdout
    assert "replayed 1 entries to group g" in r.stdout
    replayed = await entries(client, keys.retry_stream("cluster", "g"))
    assert [f[b"origin"].decode() for _, f in replayed] == [ids[1]]
    assert await g.drain() == ["i-2"]
    assert await g.effects(client) == 3
    # The letter is still there (nobody replayed it through the DLQ): i-2 still counts as not
    # handled, and a second replay would send it again; once the letter is gone it is handled.
    r = await run("replay", "g", "--from", ids[0])
    assert "dedup: 2 of 3 entries were already handled" in r.stdout
    await client.delete(keys.dlq("cluster", "g"))
    r = await run("replay", "g", "--from", ids[0])
    assert "dedup: 3 of 3 entries were already handled" in r.stdout
    assert "nothing to replay" in r.stdout


async def test_types_filter_replays_only_those_types(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    first = await producer.publish(spot(1))
    await producer.publish(NodeNotReady(cluster_id="c1", node_name="n1"))
    await producer.publish(spot(2))
    await Recorder(make_consumer, keys, "g").drain()
    only = ("--types", "cluster.node_not_ready")
    r = await run("replay", "g", "--from", first, *only, "--yes")
    assert r.returncode == 0, r.stderr
    assert "topic cluster: 1 of 3 entries in range" in r.stdout, r.stdout
    assert "of a type without a handler in this group" in r.stdout
    # acked unread: handled as far as the group knows (a handler added since needs this)
    assert "dedup: 1 of 1 entries were already handled" in r.stdout
    assert await client.xlen(keys.retry_stream("cluster", "g")) == 0
    r = await run("replay", "g", "--from", first, *only, "--yes", "--ignore-dedup")
    assert "replayed 1 entries to group g" in r.stdout, r.stdout
    replayed = await entries(client, keys.retry_stream("cluster", "g"))
    assert [f[b"type"] for _, f in replayed] == [b"cluster.node_not_ready"]


async def test_a_time_range_is_read_from_the_entry_ids(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, keys: Keys
) -> None:
    ids = await _published(producer, 3)
    await Recorder(make_consumer, keys, "g").drain()
    ms = int(ids[2].split("-")[0])
    # ISO-8601 of the last entry's millisecond: only entries of that ms on (one, or more if
    # they share it) are in range; an epoch-ms --to of the first covers its whole ms.
    from datetime import UTC, datetime

    iso = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    r = await run("replay", "g", "--from", iso)
    expected = sum(1 for i in ids if int(i.split("-")[0]) >= ms)
    assert f"total: {expected} entries" in r.stdout, r.stdout
    first_ms = ids[0].split("-")[0]
    r = await run("replay", "g", "--from", "0", "--to", first_ms)
    expected = sum(1 for i in ids if i.split("-")[0] == first_ms)
    assert f"total: {expected} entries" in r.stdout, r.stdout


async def test_dry_runs_write_nothing(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    g = Recorder(make_consumer, keys, "g")
    ids = await _published(producer, 3)
    await g.drain()
    before = sorted(await client.keys(f"{keys.prefix}:*"))
    group_before = await client.xinfo_groups(keys.stream("cluster"))

    r = await run("replay", "g", "--from", ids[0], "--ignore-dedup")
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing written" in r.stdout
    assert "topic cluster: 3 of 3 entries in range" in r.stdout
    assert "cluster.spot_interruption" in r.stdout
    r = await run("group", "reset", "g", "--to", "earliest", "--ignore-dedup")
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing written" in r.stdout
    assert f"last delivered {ids[2]} -> 0-0; re-read 3, skip 0, pending 0" in r.stdout

    assert sorted(await client.keys(f"{keys.prefix}:*")) == before
    assert await client.xinfo_groups(keys.stream("cluster")) == group_before
    assert await g.drain() == []


async def test_reset_back_to_an_id_rereads_from_there(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    g, h = Recorder(make_consumer, keys, "g"), Recorder(make_consumer, keys, "h")
    ids = await _published(producer, 5)
    await g.drain()
    await h.drain()

    r = await run("group", "reset", "g", "--to", ids[2], "--yes", "--force", "--ignore-dedup")
    assert r.returncode == 0, r.stderr
    assert (
        "reset group g on 1 topic(s) (3 re-read entries it already handled are handled again)"
        in (r.stdout)
    )
    [info] = [i for i in await client.xinfo_groups(keys.stream("cluster")) if i["name"] == b"g"]
    assert info["lag"] == 3  # ENTRIESREAD kept the lag known
    assert await g.drain() == ["i-3", "i-4", "i-5"]
    assert await g.effects(client) == 8
    assert await h.drain() == []
    counts = await client.hgetall(keys.replays("cluster", "g"))
    assert counts[b"resets"] == b"1"


async def test_reset_back_over_handled_entries_is_refused_unless_dedup_is_ignored(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """Re-read entries become pending again and the settle script cannot tell an event it
    applied before: a move back over handled entries is refused (exit 1, nothing moved);
    --ignore-dedup moves and they are handled again, Kafka-style."""
    g = Recorder(make_consumer, keys, "g")
    ids = await _published(producer, 3)
    await g.drain()
    last = (await client.xinfo_groups(keys.stream("cluster")))[0]["last-delivered-id"]

    r = await run("group", "reset", "g", "--to", "earliest", "--force")
    assert r.returncode == 0, r.stderr
    assert "dedup: 3 of 3 re-read entries were already handled by this group" in r.stdout
    r = await run("group", "reset", "g", "--to", "earliest", "--yes", "--force")
    assert r.returncode == 1
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "3 of the 3 entries the reset would re-read were already handled" in line
    assert "would apply their effects again" in line
    assert "'streamproc replay g --from 0'" in line
    assert "--ignore-dedup to handle them all again" in line
    assert (await client.xinfo_groups(keys.stream("cluster")))[0]["last-delivered-id"] == last
    assert await g.drain() == []
    assert await g.effects(client) == 3

    r = await run("group", "reset", "g", "--to", ids[1], "--yes", "--force", "--ignore-dedup")
    assert r.returncode == 0, r.stderr
    assert "dedup: ignored: the 2 of 2 re-read entries the group already handled" in r.stdout
    assert await g.drain() == ["i-2", "i-3"]
    assert await g.effects(client) == 5


async def test_reset_back_over_pending_entries_only_moves(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """Entries a dead consumer holds (pending) were not handled: re-reading them is a
    redelivery (Redis moves each to the reader), so the reset moves and each applies once."""
    g = Recorder(make_consumer, keys, "g")
    await _published(producer, 2)
    await g.drain()
    ids = [await producer.publish(spot(i)) for i in (3, 4)]
    await client.xreadgroup("g", "c9", {keys.stream("cluster"): ">"})
    r = await run("group", "reset", "g", "--to", ids[0], "--yes", "--force")
    assert r.returncode == 0, r.stderr
    assert "dedup: none of the 2 re-read entries was handled by this group" in r.stdout
    assert await g.drain() == ["i-3", "i-4"]
    assert await g.effects(client) == 4
    assert (await client.xpending(keys.stream("cluster"), "g"))["pending"] == 0


async def test_reset_to_latest_skips_what_is_there(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    g = Recorder(make_consumer, keys, "g")
    await g.consumer.ensure_groups()
    ids = await _published(producer, 4)
    r = await run("group", "reset", "g", "--to", "latest", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"last delivered 0-0 -> {ids[-1]}; re-read 0, skip 4, pending 0" in r.stdout
    assert await g.drain() == []
    await producer.publish(spot(9))
    assert await g.drain() == ["i-9"]


async def test_reset_refuses_while_consumers_are_live_unless_forced(
    run: Cli, make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    g = Recorder(make_consumer, keys, "g")
    await _published(producer, 2)
    await g.drain()  # Redis saw consumer c1 just now
    last = (await client.xinfo_groups(keys.stream("cluster")))[0]["last-delivered-id"]
    r = await run("group", "reset", "g", "--to", "earliest", "--yes")
    assert r.returncode == 1
    assert "group g has live consumers (c1 (idle" in r.stderr
    assert (await client.xinfo_groups(keys.stream("cluster")))[0]["last-delivered-id"] == last


async def test_reset_of_a_group_not_created_yet_creates_it_at_the_target(
    run: Cli, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    ids = await _published(producer, 3)
    r = await run("group", "reset", "outside", "--to", ids[1], "--yes")
    assert r.returncode == 0, r.stderr
    assert "group not created yet" in r.stdout
    [info] = await client.xinfo_groups(keys.stream("cluster"))
    assert info["name"] == b"outside"
    assert info["lag"] == 2
    got: Any = await client.xreadgroup("outside", "o1", {keys.stream("cluster"): ">"})
    assert [i.decode() for i, _ in got[0][1]] == ids[1:]


async def test_a_range_over_max_is_refused_before_writing(
    run: Cli, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    ids = await _published(producer, 3)
    await client.xgroup_create(keys.stream("cluster"), "g", id="$")
    r = await run("replay", "g", "--from", ids[0], "--max", "2", "--yes")
    assert r.returncode == 2
    assert "more than 2 entries (--max)" in r.stderr
    assert await client.exists(keys.retry_stream("cluster", "g")) == 0
    r = await run("group", "reset", "g", "--to", "earliest", "--max", "2", "--yes")
    assert r.returncode == 2
    assert "would re-read more than 2 entries" in r.stderr


BAD: list[tuple[list[str], str]] = [
    (["replay", "nope", "--from", "0"], "unknown group 'nope'; known: g, h"),
    (["replay", "g", "--from", "yesterday"], "invalid time or id 'yesterday'"),
    (["replay", "g", "--from", "1-2-3"], "invalid time or id '1-2-3'"),
    (["replay", "g", "--from", "99999999999999999999999"], "invalid time or id"),
    (["replay", "g", "--from", "2000-0", "--to", "1000-0"], "--from 2000-0 is after --to"),
    (
        ["replay", "g", "--from", "2026-12-01T10:00:00Z", "--to", "2026-12-01T09:00:00Z"],
        "is after --to",
    ),
    (["replay", "g", "--from", "0", "--types", "cluster.nope"], "unknown event type"),
    (
        ["replay", "g", "--from", "0", "--types", "notify.notification"],
        "published to topic notify, which group g does not read",
    ),
    (["replay", "g", "--from", "0", "--max", "0"], "--max must be >= 1"),
    (["group", "reset", "nope", "--to", "latest"], "unknown group 'nope'; known: g, h, outside"),
    (["group", "reset", "g", "--to", "soon"], "invalid time or id 'soon'"),
    (
        ["group", "reset", "outside", "--to", "latest", "--ignore-dedup"],
        "--ignore-dedup does not apply",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD)
async def test_bad_input_is_exit_2_with_one_line(run: Cli, args: list[str], message: str) -> None:
    r = await run(*args)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_positions_parse_as_stream_ids() -> None:
    assert parse_position("1700000000000-5") == (1700000000000, 5)
    assert parse_position("1700000000000") == (1700000000000, 0)
    assert parse_position("1700000000000", end=True) == (1700000000000, MAX_SEQ)
    assert parse_position("2023-11-14T22:13:20Z") == (1700000000000, 0)
    assert parse_position("2023-11-14T23:13:20+01:00") == (1700000000000, 0)
    assert parse_position("2023-11-14T22:13:20") == (1700000000000, 0)  # naive: UTC
    with pytest.raises(ConfigError):
        parse_position("1969-12-31T23:59:59Z")


def test_replay_dry_run_as_an_operator_runs_it(env: dict[str, str]) -> None:
    """The real process: `python -m streamproc replay` prints the summary, exit 0."""
    r = subprocess.run(
        [sys.executable, "-m", "streamproc", "replay", "g", "--from", "0"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "replay to group g (dry run" in r.stdout
    assert "nothing to replay" in r.stdout


async def test_replay_and_reset_cover_every_partition_of_a_partitioned_topic(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
) -> None:
    """STREAMPROC_PARTITIONS=cluster=2: the commands read and move both partitions' streams
    (before, they looked at the unpartitioned stream, which nobody writes, and did nothing)."""
    parted = Keys(keys.prefix, partitions={"cluster": 2})
    producer = Producer(client, codec, parted)
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.instance_id)

    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: handle}),
        client=client,
        codec=codec,
        keys=parted,
        producer=producer,
        settings=ConsumerSettings(consumer="c1"),
    )
    # six clusters, so both partitions get some
    for i in range(6):
        await producer.publish(
            SpotInterruption(
                cluster_id=f"c{i}",
                instance_id=f"i-{i}",
                instance_type="m5.large",
                availability_zone="eu-west-1a",
            )
        )
    names = parted.partitions_of("cluster")
    assert all([await client.xlen(parted.stream(p)) for p in names])
    while await consumer.process_once():
        pass
    assert sorted(seen) == [f"i-{i}" for i in range(6)]

    penv = {**env, "STREAMPROC_PARTITIONS": "cluster=2"}

    def run(*args: str) -> CliRun:
        return cli_in_process(monkeypatch, capsys, penv, *args)

    r = await asyncio.to_thread(run, "replay", "g", "--from", "0", "--yes", "--ignore-dedup")
    assert r.returncode == 0, r.stderr
    assert "replayed 6 entries to group g" in r.stdout
    seen.clear()
    while await consumer.process_once():
        pass
    assert sorted(seen) == [f"i-{i}" for i in range(6)]

    r = await asyncio.to_thread(run, "group", "reset", "g", "--to", "earliest", "--yes", "--force")
    assert r.returncode == 1  # every entry of both partitions was handled
    assert "6 of the 6 entries the reset would re-read were already handled" in r.stderr
    r = await asyncio.to_thread(
        run, "group", "reset", "g", "--to", "earliest", "--yes", "--force", "--ignore-dedup"
    )
    assert r.returncode == 0, r.stderr
    for p in names:
        [info] = [g for g in await client.xinfo_groups(parted.stream(p)) if g["name"] == b"g"]
        assert info["last-delivered-id"] in (b"0-0", "0-0")
