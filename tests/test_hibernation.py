"""Cluster hibernation against a moto server over HTTP and a real Redis: node groups go to 0
in a sleep slot and come back to their remembered sizes, pre-warm, DST, replays, savings, the
audit stream, and the CLI and API with broken and hostile input."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from schemas import REGISTRY
from schemas.ticks import HibernationTick
from spot import hibernation_api
from spot._schedule import Slots, apply_rules, new_schedule, parse_matrix, wants_sleep
from spot.aws import AccountStore, Aws, AwsSettings, new_account
from spot.hibernation_concern import CONCERN, Runtime, decide, use
from spot.hibernation_store import (
    AsgSizes,
    HibernationKeys,
    ScheduleStore,
    SleepRecord,
    read_audit,
)
from spot.prices import SPOT_DISCOUNT, hourly_usd
from streamproc import Codec, ConsumerSettings, Keys, Producer
from streamproc.concern import Context
from streamproc.consumer import Consumer
from streamproc.errors import ConfigError
from streamproc.ingest import Ingest, IngestSettings, create_app
from streamproc.schedule import tick_id
from tests.helpers import CliRun, cli_in_process, moto_server
from tests.test_ingest_support import Server

pytestmark = pytest.mark.timeout(120)

ACCOUNT = "123456789012"  # moto's default account: the assumed role lands in it
REGION = "us-east-1"
BERLIN = "Europe/Berlin"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto (STS, Auto Scaling, EC2) on a free 127.0.0.1 port, for this module."""
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the environment only: no profile, no config file, no instance metadata."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def asg_client(endpoint: str) -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.client("autoscaling", endpoint_url=endpoint, region_name=REGION)


def make_asg(
    endpoint: str,
    name: str,
    *,
    tags: dict[str, str],
    sizes: tuple[int, int, int] = (1, 4, 2),
    instance_type: str = "t3.medium",
) -> None:
    c = asg_client(endpoint)
    c.create_launch_configuration(
        LaunchConfigurationName=f"lc-{name}", ImageId="ami-12c6146b", InstanceType=instance_type
    )
    c.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchConfigurationName=f"lc-{name}",
        MinSize=sizes[0],
        MaxSize=sizes[1],
        DesiredCapacity=sizes[2],
        AvailabilityZones=[f"{REGION}a"],
        Tags=[
            {"Key": k, "Value": v, "PropagateAtLaunch": False, "ResourceId": name}
            for k, v in tags.items()
        ],
    )


def sizes(endpoint: str, name: str) -> tuple[int, int, int]:
    [g] = asg_client(endpoint).describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"
    ]
    return g["MinSize"], g["MaxSize"], g["DesiredCapacity"]


class Hib:
    """The hibernation concern in this process, driven one tick at a time."""

    def __init__(self, client: aioredis.Redis, keys: Keys, producer: Producer, codec: Any) -> None:
        self.client, self.keys, self.producer = client, keys, producer
        self.consumer = Consumer(
            CONCERN,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            settings=ConsumerSettings(consumer="h1", block_ms=50, grace_s=1.0),
        )
        self.store = ScheduleStore(client, keys)
        self.hk = HibernationKeys(keys)

    async def tick(self, at: datetime, *, event_id: str | None = None) -> None:
        """Publish the tick of ``at`` and handle it."""
        await self.producer.publish(
            HibernationTick(
                id=event_id or tick_id("hibernation", at), schedule="hibernation", scheduled_for=at
            )
        )
        assert await self.consumer.process_once(block_ms=200) == 1

    async def schedule(self, cluster: str, *rules: str, tz: str = "UTC", **kw: Any) -> None:
        await self.store.put(
            new_schedule(
                cluster=cluster,
                account=kw.pop("account", ACCOUNT),
                region=REGION,
                tz=tz,
                week=apply_rules(rules),
                now=datetime.now(UTC),
                **kw,
            ),
            who="test",
        )

    async def daily(self, day: str) -> dict[str, float]:
        raw: Any = await self.client.hgetall(self.hk.daily(day))
        return {k.decode(): float(v) for k, v in raw.items()}

    async def audit(self, cluster: str | None = None) -> list[Any]:
        """The concern's audit entries (not the schedule changes), newest first."""
        entries = await read_audit(self.client, self.keys, cluster=cluster, count=1000)
        return [e for e in entries if not e.action.startswith(("schedule_", "remove_"))]


@pytest.fixture
async def hib(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any], endpoint: str
) -> AsyncIterator[Hib]:
    use(Runtime(Aws(AwsSettings(endpoint_url=endpoint, breaker_cooldown_s=0.5))))
    await AccountStore(client, keys).add(
        new_account(
            id=ACCOUNT, role_arn=f"arn:aws:iam::{ACCOUNT}:role/hibernation", regions=[REGION]
        )
    )
    h = Hib(client, keys, producer, codec)
    await h.consumer.ensure_groups()
    yield h
    use(None)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


# -------------------------------------------------------------------- schedules (pure)


def test_rules_cover_the_hours_they_name_and_wrap_past_midnight() -> None:
    week = apply_rules(["mon-fri 20-08", "sat,sun 0-24"], ["wed 22-24"])
    assert week[0 * 24 + 19] == "0"
    assert week[0 * 24 + 20] == "1"
    assert week[1 * 24 + 7] == "1"
    assert week[1 * 24 + 8] == "0"
    assert week[2 * 24 + 22] == "0"
    assert week[3 * 24 + 0] == "1"
    assert week[5 * 24 + 0 : 7 * 24] == "1" * 48
    assert week[0:8] == "0" * 8  # Monday 0-8 is not in any rule
    assert apply_rules(["sun 22-2"])[0:2] == "11"  # the week wraps from Sunday to Monday
    matrix = ["0" * 24] * 5 + ["S" * 12 + "." * 12, "1" * 24]
    assert parse_matrix(["# comment", *matrix, ""]) == "0" * 120 + "1" * 12 + "0" * 12 + "1" * 24


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("mon-fri 20-8; rm -rf /", "is not 'DAYS START-END'"),
        ("funday 1-2", "unknown day 'funday'"),
        ("mon 24-3", "hours are START 0..23"),
        ("mon 5-5", "START and END are the same hour"),
        ("mon", "is not 'DAYS START-END'"),
        ("x" * 500, "at most 100 characters"),
    ],
)
def test_broken_rules_are_refused_precisely(rule: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_rules([rule])


def test_broken_matrices_and_zones_are_refused_precisely() -> None:
    with pytest.raises(ConfigError, match="has 6 day lines; it needs 7"):
        parse_matrix(["0" * 24] * 6)
    with pytest.raises(ConfigError, match="matrix line wed: 23 hours; it needs 24"):
        parse_matrix(["0" * 24] * 2 + ["0" * 23] + ["0" * 24] * 4)
    with pytest.raises(ConfigError, match="matrix line mon, hour 3: 'x'"):
        parse_matrix(["000x" + "0" * 20] + ["0" * 24] * 6)
    base: dict[str, Any] = {
        "cluster": "c1",
        "account": ACCOUNT,
        "region": REGION,
        "week": "0" * 168,
        "now": datetime.now(UTC),
    }
    for tz in ("Mars/Olympus", "../../etc/passwd", "", "Europe/Berlin\x00"):
        with pytest.raises(ConfigError, match=r"^tz: "):
            new_schedule(**base, tz=tz)
    with pytest.raises(ConfigError, match=r"^cluster: "):
        new_schedule(**{**base, "cluster": "../x"}, tz="UTC")
    with pytest.raises(ConfigError, match=r"^asgs: "):
        new_schedule(**base, tz="UTC", asgs=["arn:aws:autoscaling:x"])


def test_dst_spring_forward_the_missing_hour_never_sleeps_and_prewarm_is_real_time() -> None:
    """Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST."""
    s = new_schedule(
        cluster="c1",
        account=ACCOUNT,
        region=REGION,
        tz=BERLIN,
        week=apply_rules(["sun 2-3"]),
        prewarm_min=0,
        now=datetime.now(UTC),
    )
    day = datetime(2026, 3, 29, tzinfo=UTC)
    assert not any(wants_sleep(s, Slots(day + timedelta(minutes=m))) for m in range(0, 24 * 60, 5))
    # Sleeping until 03:00 local: 03:00 CEST is 01:00 UTC, so pre-warm starts 00:30 UTC
    # (01:30 CET), 30 real minutes before, although the clock reads 90 minutes earlier.
    s = new_schedule(
        cluster="c1",
        account=ACCOUNT,
        region=REGION,
        tz=BERLIN,
        week=apply_rules(["sun 0-3"]),
        now=datetime.now(UTC),
    )
    assert wants_sleep(s, Slots(datetime(2026, 3, 29, 0, 29, tzinfo=UTC)))
    assert not wants_sleep(s, Slots(datetime(2026, 3, 29, 0, 30, tzinfo=UTC)))


def test_prices_table() -> None:
    assert hourly_usd("m5.large") == 0.096
    assert hourly_usd("m5.large", "spot") == pytest.approx(0.096 * (1 - SPOT_DISCOUNT))
    assert hourly_usd("no.such") == 0.0


# -------------------------------------------------------------------- the concern, on moto


async def test_a_sleep_slot_scales_the_clusters_groups_to_zero_and_waking_restores_them(
    hib: Hib, endpoint: str
) -> None:
    cluster = unique("c")
    tagged, managed, other = unique("ng"), unique("mng"), unique("other")
    make_asg(endpoint, tagged, tags={f"kubernetes.io/cluster/{cluster}": "owned"})
    make_asg(endpoint, managed, tags={"eks:cluster-name": cluster}, sizes=(0, 3, 1))
    make_asg(endpoint, other, tags={"eks:cluster-name": "someone-else"})
    await hib.schedule(cluster, "mon-fri 20-08", tz=BERLIN)

    monday_noon = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)  # 12:00 in Berlin: awake
    await hib.tick(monday_noon)
    assert sizes(endpoint, tagged) == (1, 4, 2)
    assert await hib.audit(cluster) == []

    evening = datetime(2026, 11, 30, 19, 0, tzinfo=UTC)  # 20:00 in Berlin
    await hib.tick(evening)
    assert sizes(endpoint, tagged) == (0, 0, 0)
    assert sizes(endpoint, managed) == (0, 0, 0)
    assert sizes(endpoint, other) == (1, 4, 2)
    rec = await hib.store.record(cluster)
    assert rec is not None
    assert rec.complete
    assert {k: (v.min, v.max, v.desired) for k, v in rec.asgs.items()} == {
        tagged: (1, 4, 2),
        managed: (0, 3, 1),
    }
    assert rec.instances == 3
    assert rec.usd_per_hour == pytest.approx(3 * hourly_usd("t3.medium"))

    # A minute later: still asleep, nothing more done, one minute of savings recorded.
    await hib.tick(evening + timedelta(minutes=1))
    entries = await hib.audit(cluster)
    assert sorted((e.action, e.asg, e.before, e.after) for e in entries) == [
        ("sleep", managed, "min=0 max=3 desired=1", "min=0 max=0 desired=0"),
        ("sleep", tagged, "min=1 max=4 desired=2", "min=0 max=0 desired=0"),
    ]
    daily = await hib.daily("2026-11-30")
    assert daily["hibernated_instance_hours"] == pytest.approx(3 / 60)
    assert daily["savings_usd"] == pytest.approx(3 * hourly_usd("t3.medium") / 60)

    tuesday_8 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)  # 08:00 in Berlin
    await hib.tick(tuesday_8)
    assert sizes(endpoint, tagged) == (1, 4, 2)
    assert sizes(endpoint, managed) == (0, 3, 1)
    assert await hib.store.record(cluster) is None
    woken = [e for e in await hib.audit(cluster) if e.action != "sleep"]
    assert sorted((e.action, e.asg, e.before, e.after) for e in woken) == [
        ("wake", managed, "min=0 max=0 desired=0", "min=0 max=3 desired=1"),
        ("wake", tagged, "min=0 max=0 desired=0", "min=1 max=4 desired=2"),
    ]
    assert {e.tick for e in woken} == {tick_id("hibernation", tuesday_8)}
    assert {e.who for e in woken} == {"hibernation/h1"}


async def test_clusters_waking_within_30_minutes_are_prewarmed(hib: Hib, endpoint: str) -> None:
    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"}, sizes=(2, 5, 3))
    await hib.schedule(cluster, "daily 0-8", tz="UTC")
    await hib.tick(datetime(2026, 12, 2, 7, 0, tzinfo=UTC))
    assert sizes(endpoint, ng) == (0, 0, 0)
    await hib.tick(datetime(2026, 12, 2, 7, 29, tzinfo=UTC))
    assert sizes(endpoint, ng) == (0, 0, 0)
    await hib.tick(datetime(2026, 12, 2, 7, 30, tzinfo=UTC))  # 30 minutes before 08:00
    assert sizes(endpoint, ng) == (2, 5, 3)
    assert [e.action for e in await hib.audit(cluster)] == ["prewarm", "sleep"]
    # Still in the sleep slot, but waking within 30 minutes: it is not put back to sleep.
    await hib.tick(datetime(2026, 12, 2, 7, 45, tzinfo=UTC))
    assert sizes(endpoint, ng) == (2, 5, 3)


async def test_the_repeated_hour_of_the_fall_back_sleeps_two_real_hours(
    hib: Hib, endpoint: str
) -> None:
    """Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET; 'sun 2-3' is two hours."""
    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"})
    await hib.schedule(cluster, "sun 2-3", tz=BERLIN, prewarm_min=0)
    await hib.tick(datetime(2026, 10, 24, 23, 59, tzinfo=UTC))  # 01:59 CEST
    assert sizes(endpoint, ng) == (1, 4, 2)
    await hib.tick(datetime(2026, 10, 25, 0, 0, tzinfo=UTC))  # 02:00 CEST
    assert sizes(endpoint, ng) == (0, 0, 0)
    await hib.tick(datetime(2026, 10, 25, 1, 30, tzinfo=UTC))  # 02:30 CET, the second time
    assert sizes(endpoint, ng) == (0, 0, 0)
    await hib.tick(datetime(2026, 10, 25, 2, 0, tzinfo=UTC))  # 03:00 CET
    assert sizes(endpoint, ng) == (1, 4, 2)
    # Savings are capped per tick gap (max_gap_s, 10 min): two ticks of 10 minutes each.
    daily = await hib.daily("2026-10-25")
    assert daily["hibernated_instance_hours"] == pytest.approx(2 * 2 * 10 / 60)


async def test_a_replayed_tick_changes_nothing_and_counts_no_savings_twice(
    hib: Hib, endpoint: str
) -> None:
    cluster, ng = unique("c"), unique("ng")
    make_asg(
        endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"}, instance_type="m5.large"
    )
    await hib.schedule(cluster, "daily 0-24", tz="UTC")
    t = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    await hib.tick(t)
    await hib.tick(t + timedelta(minutes=1))
    before_audit = await hib.audit(cluster)
    before_daily = await hib.daily("2026-12-03")
    assert before_daily["savings_usd"] == pytest.approx(2 * 0.096 / 60)
    # The same tick again (a new entry id, as after the dedup window) and an older one.
    await hib.tick(t + timedelta(minutes=1), event_id="replay-1")
    await hib.tick(t, event_id="replay-2")
    # Someone changed the group by hand meanwhile: a replay does not "fix" it either.
    asg_client(endpoint).update_auto_scaling_group(AutoScalingGroupName=ng, MinSize=0, MaxSize=1)
    await hib.tick(t + timedelta(minutes=1), event_id="replay-3")
    assert await hib.audit(cluster) == before_audit
    assert await hib.daily("2026-12-03") == before_daily
    rec = await hib.store.record(cluster)
    assert rec is not None
    assert (rec.asgs[ng].min, rec.asgs[ng].desired) == (1, 2)


async def test_a_tick_redelivered_after_a_crash_mid_sleep_keeps_the_original_sizes(
    hib: Hib, endpoint: str
) -> None:
    """The sizes are remembered before any group is touched; a handler that died after
    scaling to 0 (no ack, no effects) leaves an incomplete record, and the redelivered tick
    completes it without taking the 0s for the sizes to restore."""
    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"}, sizes=(2, 6, 3))
    await hib.schedule(cluster, "daily 0-24")
    t = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)
    # What the first attempt left: the record (incomplete) and the group at 0.
    rec = SleepRecord(
        account=ACCOUNT,
        region=REGION,
        asgs={ng: AsgSizes(min=2, max=6, desired=3, instance_type="t3.medium")},
        since_ms=int(t.timestamp() * 1000),
    )
    await hib.client.hset(hib.hk.asleep, cluster, msgspec.json.encode(rec))
    asg_client(endpoint).update_auto_scaling_group(
        AutoScalingGroupName=ng, MinSize=0, MaxSize=0, DesiredCapacity=0
    )
    await hib.tick(t)
    done = await hib.store.record(cluster)
    assert done is not None
    assert done.complete
    assert (done.asgs[ng].min, done.asgs[ng].max, done.asgs[ng].desired) == (2, 6, 3)
    [entry] = await hib.audit(cluster)
    assert (entry.action, entry.before) == ("sleep", "min=2 max=6 desired=3")
    await hib.store.remove(cluster, who="test")
    await hib.tick(t + timedelta(minutes=1))
    assert sizes(endpoint, ng) == (2, 6, 3)


async def test_the_weekly_report_reads_the_savings_hibernation_recorded(
    hib: Hib, endpoint: str, producer: Producer
) -> None:
    from consumers.renders import _daily_metrics

    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={"eks:cluster-name": cluster}, instance_type="c5.large")
    await hib.schedule(cluster, "daily 0-24")
    t = datetime(2026, 12, 9, 10, 0, tzinfo=UTC)
    for minute in range(31):
        await hib.tick(t + timedelta(minutes=minute))
    ctx = Context(
        topic="renders",
        group="renders",
        consumer="r1",
        entry_id="0-1",
        attempt=0,
        deliveries=1,
        redis=hib.client,
        producer=producer,
        keys=hib.keys,
    )
    [day] = await _daily_metrics(ctx, "metrics", datetime(2026, 12, 9, tzinfo=UTC), 1)
    assert day.values["hibernated_instance_hours"] == pytest.approx(2 * 0.5)
    assert day.values["savings_usd"] == pytest.approx(2 * 0.5 * hourly_usd("c5.large"))


async def test_a_failing_cluster_is_audited_and_the_others_go_on(hib: Hib, endpoint: str) -> None:
    good, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{good}": "owned"})
    await hib.schedule(good, "daily 0-24")
    await hib.schedule("unregistered", "daily 0-24", account="210987654321")
    await hib.schedule("no-groups", "daily 0-24")
    await hib.tick(datetime(2026, 12, 4, 10, 0, tzinfo=UTC))
    assert sizes(endpoint, ng) == (0, 0, 0)
    [f1] = await hib.audit("unregistered")
    assert f1.action == "failed"
    assert "210987654321 is not registered" in f1.detail
    [f2] = await hib.audit("no-groups")
    assert f2.action == "failed"
    assert "no Auto Scaling group" in f2.detail


async def test_removing_a_sleeping_clusters_schedule_wakes_it_first(
    hib: Hib, endpoint: str
) -> None:
    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"})
    await hib.schedule(cluster, "daily 0-24")
    await hib.tick(datetime(2026, 12, 5, 10, 0, tzinfo=UTC))
    assert await hib.store.remove(cluster, who="test") == "pending"
    await hib.tick(datetime(2026, 12, 5, 10, 1, tzinfo=UTC))
    assert sizes(endpoint, ng) == (1, 4, 2)
    assert await hib.store.get(cluster) is None
    assert await hib.store.remove(cluster, who="test") == "absent"


async def test_a_group_deleted_while_asleep_fails_each_tick_until_forgotten(
    hib: Hib, endpoint: str
) -> None:
    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"})
    await hib.schedule(cluster, "mon 0-12")
    await hib.tick(datetime(2026, 12, 7, 10, 0, tzinfo=UTC))  # Monday 10:00: asleep
    asg_client(endpoint).delete_auto_scaling_group(AutoScalingGroupName=ng, ForceDelete=True)
    await hib.tick(datetime(2026, 12, 7, 12, 0, tzinfo=UTC))
    [failed, _] = await hib.audit(cluster)
    assert failed.action == "failed"
    assert f"Auto Scaling group {ng} is gone" in failed.detail
    assert await hib.store.record(cluster) is not None
    assert await hib.store.remove(cluster, who="test", forget=True) == "forgotten"
    assert await hib.store.record(cluster) is None
    [forgotten] = await read_audit(hib.client, hib.keys, cluster=cluster, count=1)
    assert forgotten.action == "schedule_forgotten"
    assert forgotten.detail == f"not restored: {ng} min=1 max=4 desired=2"


async def test_a_tick_waits_while_another_replica_handles_one(hib: Hib, endpoint: str) -> None:
    cluster, ng = unique("c"), unique("ng")
    make_asg(endpoint, ng, tags={f"kubernetes.io/cluster/{cluster}": "owned"})
    await hib.schedule(cluster, "daily 0-24")
    await hib.client.set(hib.hk.lease, "h2", px=10_000)
    await hib.tick(datetime(2026, 12, 7, 10, 0, tzinfo=UTC))
    assert sizes(endpoint, ng) == (1, 4, 2)
    assert await hib.client.get(hib.hk.last_tick) is None
    assert await hib.client.zcard(hib.keys.delayed("ticks", "hibernation")) == 1  # deferred
    await hib.client.delete(hib.hk.lease)
    await hib.tick(datetime(2026, 12, 7, 10, 1, tzinfo=UTC))
    assert sizes(endpoint, ng) == (0, 0, 0)
    # Released: it expires shortly after the handler, once the tick's effects are written.
    assert 0 < await hib.client.pttl(hib.hk.lease) <= 2000


def test_decide_evaluates_ten_thousand_schedules() -> None:
    """Behaviour only: how fast is measured by benchmarks/hibernation.py, not asserted here."""
    zones = ["UTC", BERLIN, "America/New_York", "Asia/Tokyo", "Australia/Sydney"]
    week = apply_rules(["mon-fri 20-08", "sat-sun 0-24"])
    now = datetime.now(UTC)
    schedules = {
        f"c{i}": new_schedule(
            cluster=f"c{i}", account=ACCOUNT, region=REGION, tz=zones[i % 5], week=week, now=now
        )
        for i in range(10_000)
    }
    # Friday 22:00 UTC: 23:00 in Berlin, 07:00 and 09:00 Saturday in Tokyo and Sydney sleep;
    # 17:00 in New York does not.
    changes = decide(schedules, {}, datetime(2026, 12, 4, 22, 0, tzinfo=UTC))
    assert len(changes) == 8000
    assert {c.action for c in changes} == {"sleep"}


# -------------------------------------------------------------------- CLI and API


def _cli(env: dict[str, str], repo_root: Path, *args: str, stdin: str = "") -> Any:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        env=env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


async def test_cli_set_show_list_remove_and_audit(
    hib: Hib,
    endpoint: str,
    redis_url: str,
    keys: Keys,
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    env = {**os.environ, **overrides}
    cluster, ng = unique("c"), unique("ng")
    ok = _cli(
        env,
        repo_root,
        *("hibernation", "set", cluster, "--account", ACCOUNT, "--region", REGION),
        *("--tz", BERLIN, "--sleep", "mon-fri 20-08", "--sleep", "sat-sun 0-24"),
    )
    assert ok.returncode == 0, ok.stderr
    assert "fri ###### ##.... ...... ..####" in ok.stdout
    shown = _cli(env, repo_root, "hibernation", "show", cluster, "--json")
    assert shown.returncode == 0, shown.stderr
    body = orjson.loads(shown.stdout)
    assert body["tz"] == BERLIN
    assert body["state"] == "awake"
    assert len(body["matrix"]) == 7
    listed = _cli(env, repo_root, "hibernation", "list")
    assert cluster in listed.stdout
    assert "1 schedule(s)" in listed.stdout

    matrix = tmp_path / "week.txt"
    matrix.write_text("# Monday first\n" + ("1" * 24 + "\n") * 7)
    ok = _cli(
        env,
        repo_root,
        *("hibernation", "set", cluster, "--account", ACCOUNT, "--region", REGION),
        *("--tz", "UTC", "--matrix", str(matrix), "--asg", ng),
    )
    assert ok.returncode == 0, ok.stderr
    make_asg(endpoint, ng, tags={})
    await hib.tick(datetime(2026, 12, 6, 10, 0, tzinfo=UTC))
    assert sizes(endpoint, ng) == (0, 0, 0)

    audit = _cli(env, repo_root, "audit", "--cluster", cluster, "--json")
    assert audit.returncode == 0, audit.stderr
    rows = [orjson.loads(line) for line in audit.stdout.splitlines()]
    assert [r["action"] for r in rows] == ["sleep", "schedule_set", "schedule_set"]
    assert rows[0]["asg"] == ng
    assert rows[0]["before"] == "min=1 max=4 desired=2"
    assert rows[1]["who"].startswith("cli:")
    table = _cli(env, repo_root, "audit", "--count", "1")
    assert "sleep" in table.stdout
    assert "1 entry" in table.stdout

    gone = _cli(env, repo_root, "hibernation", "remove", cluster)
    assert gone.returncode == 0
    assert "woken at the next tick" in gone.stdout
    # The refusals by the same ``main`` in this process (its own event loop, so in a thread):
    # each command above ran as a real process.
    hostile = await asyncio.to_thread(
        cli_in_process,
        monkeypatch,
        capsys,
        overrides,
        *("hibernation", "set", "a;rm -rf /", "--account", ACCOUNT, "--region", REGION),
        *("--tz", "UTC", "--sleep", "daily 0-8"),
    )
    assert hostile.returncode == 2
    assert "cluster: 'a;rm -rf /' is not a cluster name" in hostile.stderr
    missing = await asyncio.to_thread(
        cli_in_process, monkeypatch, capsys, overrides, "hibernation", "show", "nope"
    )
    assert missing.returncode == 1
    assert "no hibernation schedule" in missing.stderr


CLI_REFUSED: list[tuple[list[str], str]] = [
    (["--tz", "Mars/Olympus", "--sleep", "daily 0-8"], "tz: unknown time zone 'Mars/Olympus'"),
    (["--tz", "UTC", "--sleep", "daily 0-8;reboot"], "is not 'DAYS START-END'"),
    (["--tz", "UTC"], "give --sleep rules"),
    (
        ["--tz", "UTC", "--matrix", "/nonexistent/week"],
        "--matrix /nonexistent/week: cannot read",
    ),
    (["--tz", "UTC", "--matrix", "-"], "the matrix has 2 day lines; it needs 7"),
    (["--tz", "UTC", "--sleep", "daily 0-8", "--prewarm-min", "999"], "prewarm_min: 0 to 180"),
]


@pytest.mark.parametrize(("args", "message"), CLI_REFUSED)
def test_cli_refuses_broken_input_with_exit_2(
    redis_url: str,
    keys: Keys,
    repo_root: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first case in a real ``python -m streamproc`` process; the others by the same
    ``main`` in this process, without an interpreter start (~2 s here) each."""
    overrides = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    argv = ("hibernation", "set", "c1", "--account", ACCOUNT, "--region", REGION, *args)
    stdin = "0" * 24 + "\n" + "1" * 24 + "\n"
    bad: CliRun | subprocess.CompletedProcess[str]
    if (args, message) == CLI_REFUSED[0]:
        bad = _cli({**os.environ, **overrides}, repo_root, *argv, stdin=stdin)
    else:
        bad = cli_in_process(monkeypatch, capsys, overrides, *argv, stdin=stdin)
    assert bad.returncode == 2, bad.stdout
    assert message in bad.stderr


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    ingest = Ingest(
        client=client,
        registry=REGISTRY,
        keys=keys,
        producer=producer,
        settings=IngestSettings(auth_cache_s=0.0, max_body_bytes=64 * 1024),
    )
    app = create_app(ingest, routes=[hibernation_api.add_routes])
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(server, session, ingest, keys)
    finally:
        await server.close()


async def test_api_puts_gets_and_deletes_a_schedule(srv: Server) -> None:
    op = await srv.token("op", (), operator=True)
    path = "/v1/clusters/prod-1/hibernation"
    body = {"account": ACCOUNT, "region": REGION, "tz": BERLIN, "sleep": ["mon-fri 20-08"]}
    status, out, _ = await srv.post(path, body, token=op, method="PUT")
    assert status == 201, out
    assert out["hibernation"]["matrix"][0] == "0" * 20 + "1" * 4
    status, out, _ = await srv.post(
        path, {**body, "matrix": ["1" * 24] * 7, "sleep": None}, token=op, method="PUT"
    )
    assert status == 200, out
    status, out, _ = await srv.post(path, token=op, method="GET")
    assert status == 200
    assert out["hibernation"]["matrix"] == ["1" * 24] * 7
    assert out["hibernation"]["updated_by"] == "api:op"
    status, _, _ = await srv.post(path, token=op, method="DELETE")
    assert status == 204
    status, out, _ = await srv.post(path, token=op, method="DELETE")
    assert status == 404


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (
            {"account": ACCOUNT, "region": REGION, "tz": "Nowhere/City", "sleep": ["daily 0-8"]},
            "$.tz",
        ),
        ({"account": ACCOUNT, "region": REGION, "tz": "UTC", "matrix": ["0" * 24] * 6}, "$.matrix"),
        ({"account": ACCOUNT, "region": REGION, "tz": "UTC", "matrix": ["0" * 24] * 8}, "$.matrix"),
        (
            {"account": ACCOUNT, "region": REGION, "tz": "UTC", "sleep": ["daily 0-8", "mon 30-2"]},
            "$.sleep[1]",
        ),
        (
            {
                "account": ACCOUNT,
                "region": REGION,
                "tz": "UTC",
                "sleep": ["daily 0-8"],
                "awake": ["x"],
            },
            "$.awake[0]",
        ),
        ({"account": ACCOUNT, "region": REGION, "tz": "UTC"}, "$.sleep"),
        ({"account": "12", "region": REGION, "tz": "UTC", "sleep": ["daily 0-8"]}, "$.account"),
        ({"account": ACCOUNT, "region": "mars", "tz": "UTC", "sleep": ["daily 0-8"]}, "$.region"),
        (
            {"account": ACCOUNT, "region": REGION, "tz": "UTC", "sleep": ["daily 0-8"], "evil": 1},
            "$",
        ),
        (
            {
                "account": ACCOUNT,
                "region": REGION,
                "tz": "UTC",
                "sleep": ["daily 0-8"],
                "prewarm_min": -1,
            },
            "$.prewarm_min",
        ),
        (
            {
                "account": ACCOUNT,
                "region": REGION,
                "tz": "UTC",
                "sleep": ["daily 0-8"],
                "asgs": ["a b"],
            },
            "$.asgs",
        ),
    ],
)
async def test_api_refuses_broken_schedules_naming_the_field(
    srv: Server, body: dict[str, Any], path: str
) -> None:
    op = await srv.token("op", (), operator=True)
    status, out, _ = await srv.post("/v1/clusters/c1/hibernation", body, token=op, method="PUT")
    assert status == 400, out
    assert out["path"] == path, out


async def test_api_refuses_hostile_requests(srv: Server) -> None:
    op = await srv.token("op", (), operator=True)
    agent = await srv.token("agent", ("*",))
    path = "/v1/clusters/c1/hibernation"
    body = {"account": ACCOUNT, "region": REGION, "tz": "UTC", "sleep": ["daily 0-8"]}
    assert (await srv.post(path, body, method="PUT"))[0] == 401
    assert (await srv.post(path, body, token=agent, method="PUT"))[0] == 403
    status, out, _ = await srv.post("/v1/clusters/a..b/hibernation", body, token=op, method="PUT")
    assert status == 400
    assert out["path"] == "cluster_id"
    for data in (b"{", b"[]", b"\xff\xfe", b"{" * 100_000):
        status, _, _ = await srv.post(
            path, data=data, token=op, method="PUT", headers={"Content-Type": "application/json"}
        )
        assert status in (400, 413)
    huge = {**body, "sleep": ["daily 0-8"] * 10_000}
    assert (await srv.post(path, huge, token=op, method="PUT"))[0] in (400, 413)
    assert (await srv.post(path, token=op, method="GET"))[0] == 404
