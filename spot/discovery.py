"""The ``discovery`` concern: on each ``tick.discovery``, scan every registered AWS account.

For each account (``spot.aws.AccountStore``), one replica at a time: a scan takes the account's
lease (``<p>:state:{aws}:scan-lease:<account>``, ``SET NX PX``, renewed while it runs); a
replica that finds it taken skips the account. Then, per region: EC2 DescribeInstances (all
pages), EKS ListClusters + DescribeCluster, CloudWatch GetMetricData (average CPU of the
running instances, 500 per call); the difference with the stored inventory becomes
``inventory.*`` events (``schemas.inventory``), published before the inventory is written, with
ids derived from the tick, account, region, resource and change: a scan that runs again for the
same tick (a retry, a crash before the ack) publishes nothing new. The inventory write is one
Lua script that checks the lease is still this scan's.

Failures, per account: a permanent one (AccessDenied, a role that cannot be assumed) raises a
critical notification once (when the account starts failing, or fails differently), and the
other accounts are scanned; transient ones (throttling, 5xx, timeouts, an open breaker) let the
other accounts finish, then retry the tick with the concern's backoff (3 retries), which
rescans every account, emitting only what is new. A scan of one account still running after
``scan_alert_s`` (300 s: WORKLOADS §1) raises a warning notification.

Progress: after each region, one ``inventory.scan`` entry on the live feed of each EKS cluster
found there (by cluster name: the feed of the cluster id the agents use when it is the same).

Settings: ``STREAMPROC_DISCOVERY_*`` (``DiscoverySettings``) and ``STREAMPROC_AWS_*``.
Subcommands: ``streamproc accounts`` (``spot.accounts``) and ``streamproc aws-demo``
(``spot.discovery_demo``, the ``up`` role that serves a seeded moto server for ``make run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter, Gauge, Histogram

from notifications import feed_keys
from schemas.notify import Notification, fit
from schemas.ticks import DiscoveryTick
from spot import _inventory as inv
from spot import accounts, discovery_demo
from spot.aws import Account, AccountStore, Aws, AwsSettings
from streamproc._aio import stop
from streamproc._lua import Lua
from streamproc.breaker import BreakerOpen
from streamproc.concern import Concern, Context
from streamproc.config import settings_from_env
from streamproc.event import derived_id, utcnow
from streamproc.outbound import CallPermanent
from streamproc.settings import RetryPolicy

__all__ = (
    "CONCERN",
    "CONCERNS",
    "UP_ROLE",
    "DiscoverySettings",
    "add_routes",
    "configure_from_env",
    "register",
    "scan",
    "use_settings",
)

log = structlog.get_logger("spot.discovery")

_NS = uuid.UUID("2b8e6f0a-4c1d-4e57-9a3b-7d15c0e2f4a8")

SCAN_SECONDS = Histogram(
    "streamproc_discovery_scan_seconds",
    "Time to scan one AWS account (every region)",
    ["outcome"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SCAN_ERRORS = Counter(
    "streamproc_discovery_errors", "Account scans that failed, by class", ["kind"]
)
SCANS_SKIPPED = Counter(
    "streamproc_discovery_skipped", "Account scans skipped: another replica held the lease"
)
RESOURCES = Gauge(
    "streamproc_discovery_resources",
    "Resources found by the latest scan",
    ["account", "region", "kind"],
)
CHANGES = Counter("streamproc_discovery_changes", "inventory.* events emitted", ["change"])


class DiscoverySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``STREAMPROC_DISCOVERY_<FIELD>``."""

    #: A scan of one account running longer raises a warning notification (WORKLOADS §1).
    scan_alert_s: float = 300.0
    #: The account's scan lease; renewed every third of it while the scan runs.
    lease_ttl_s: float = 60.0
    #: CPU averaged over this window (CloudWatch GetMetricData).
    cpu_window_s: int = 900
    #: DescribeInstances page size.
    page_size: int = 1000
    #: inventory.* events per publish call.
    publish_batch: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.scan_alert_s <= 86_400:
            raise ValueError("scan_alert_s within 0..86400")
        if not 0.3 <= self.lease_ttl_s <= 3600:
            raise ValueError("lease_ttl_s within 0.3..3600")
        if not 60 <= self.cpu_window_s <= 86_400:
            raise ValueError("cpu_window_s within 60..86400")
        if not 5 <= self.page_size <= 1000 or not 1 <= self.publish_batch <= 10_000:
            raise ValueError("page_size within 5..1000, publish_batch within 1..10000")


class _Runtime:
    def __init__(self, settings: DiscoverySettings, aws: AwsSettings) -> None:
        self.settings = settings
        self.aws = Aws(aws)


_runtime: _Runtime | None = None


def use_settings(settings: DiscoverySettings, aws: AwsSettings | None = None) -> None:
    """Use these settings from now on (``configure_from_env`` calls it at start)."""
    global _runtime
    _runtime = _Runtime(settings, aws or AwsSettings())


def runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        _runtime = _Runtime(DiscoverySettings(), AwsSettings())
    return _runtime


def configure_from_env(env: Mapping[str, str]) -> None:
    from spot import aws_settings

    use_settings(
        settings_from_env(DiscoverySettings, "STREAMPROC_DISCOVERY_", env), aws_settings(env)
    )


# ---------------------------------------------------------------------- the lease

_ACQUIRE = Lua("return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0")
# Extend, or take again when it expired and nobody took it (nobody else scans then).
_RENEW = Lua("""
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")
_RELEASE = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


class _ScanLease:
    """One account's scan lease (``SET NX PX``; compare-and-extend, or take again when it
    expired and nobody took it; compare-and-delete). Not
    the ticker's ``Lease``, which is the single leader key; this one is per account, and the
    inventory write checks it (``_inventory.write``) instead of a fencing counter."""

    def __init__(self, ctx: Context, account_id: str, ttl_s: float) -> None:
        self.redis, self.key = ctx.redis, inv.lease_key(ctx.keys, account_id)
        self.token = f"{ctx.consumer}/{ctx.event_id or ctx.entry_id}/{uuid.uuid4().hex[:8]}"
        self.ttl_ms = max(300, int(ttl_s * 1000))

    async def acquire(self) -> bool:
        return bool(await _ACQUIRE(self.redis, [self.key], [self.token, self.ttl_ms]))

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled or lost."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            if not await _RENEW(self.redis, [self.key], [self.token, self.ttl_ms]):
                log.warning("scan_lease_lost", key=self.key)
                return

    async def release(self) -> None:
        await _RELEASE(self.redis, [self.key], [self.token])


# ---------------------------------------------------------------------- the scan


class _LeaseLost(Exception):
    pass


async def _scan_region(
    rt: _Runtime,
    ctx: Context,
    tick: DiscoveryTick,
    account: Account,
    region: str,
    lease: _ScanLease,
) -> None:
    s, aws = rt.settings, rt.aws
    found = await aws.call(
        ctx.redis,
        ctx.keys,
        account,
        "ec2",
        region,
        lambda c: inv.describe_instances(c, s.page_size),
    )
    clusters = await aws.call(ctx.redis, ctx.keys, account, "eks", region, inv.describe_clusters)
    running = [i.instance_id for i in found if i.state == "running"]
    if running:
        cpu = await aws.call(
            ctx.redis,
            ctx.keys,
            account,
            "cloudwatch",
            region,
            lambda c: inv.cpu_averages(c, running, window_s=s.cpu_window_s),
        )
        found = [
            msgspec.structs.replace(i, cpu_avg=cpu[i.instance_id]) if i.instance_id in cpu else i
            for i in found
        ]
    before_i, before_c = await inv.load(ctx.redis, ctx.keys, account.id, region)
    where = {"cause_id": tick.id, "account_id": account.id, "region": region}
    d_i = inv.diff_instances(before_i, found, **where)
    d_c = inv.diff_clusters(before_c, clusters, **where)
    events = d_i.events + d_c.events
    for first in range(0, len(events), s.publish_batch):
        await ctx.producer.append(events[first : first + s.publish_batch])
    if not await inv.write(
        ctx.redis, ctx.keys, account.id, region, lease.token, lease.ttl_ms, d_i, d_c
    ):
        raise _LeaseLost(f"{account.id}: lease lost during {region}")
    for e in events:
        CHANGES.labels(e.type_name().removeprefix("inventory.")).inc()
    kept = [i for i in found if i.state != "terminated"]
    RESOURCES.labels(account.id, region, "instances").set(len(kept))
    RESOURCES.labels(account.id, region, "clusters").set(len(clusters))
    await _progress(ctx, account, region, kept, [c.name for c in clusters], d_i)
    log.info(
        "region_scanned",
        account=account.id,
        region=region,
        instances=len(kept),
        clusters=len(clusters),
        added=d_i.added + d_c.added,
        changed=d_i.changed + d_c.changed,
        removed=d_i.removed + d_c.removed,
    )


async def _progress(
    ctx: Context,
    account: Account,
    region: str,
    instances: list[Any],
    eks: list[str],
    d: inv.Diff,
) -> None:
    """One ``inventory.scan`` feed entry per EKS cluster (listed, or named by instance tags)."""
    per: dict[str, int] = dict.fromkeys(eks, 0)
    for i in instances:
        if i.cluster:
            per[i.cluster] = per.get(i.cluster, 0) + 1
    touched: dict[str, int] = {}
    for e in d.events:
        inst = inv.instance_of(e)
        name = inst.cluster if inst is not None else ""
        if name:
            touched[name] = touched.get(name, 0) + 1
    for name, count in sorted(per.items())[:100]:
        await feed_keys.append(
            ctx.redis,
            ctx.keys,
            name,
            "inventory.scan",
            {
                "account_id": account.id,
                "region": region,
                "cluster": name,
                "instances": count,
                "changes": touched.get(name, 0),
                "tick_id": ctx.event_id,
            },
        )


async def _alert(
    ctx: Context, tick: DiscoveryTick, account: Account, what: str, severity: str, body: str
) -> None:
    await ctx.producer.publish(
        fit(
            Notification(
                id=derived_id(tick.id, f"discovery/{account.id}/{what}", namespace=_NS),
                source="discovery",
                cluster_id="",  # about an account, not one cluster: the '*' subscribers get it
                severity=severity,  # type: ignore[arg-type]
                title=f"discovery of AWS account {account.id} "
                f"({account.name or 'unnamed'}): {what}",
                body=body,
                cause_id=tick.id,
            )
        )
    )


async def _watch(
    ctx: Context, tick: DiscoveryTick, account: Account, limit_s: float, alerting: asyncio.Event
) -> None:
    """After ``limit_s``, the "slow" warning. Once it is being published (``alerting`` set)
    the scan waits for it instead of cancelling it: a scan that ends while its warning is
    in flight no longer loses the warning."""
    await asyncio.sleep(limit_s)
    alerting.set()
    log.warning("scan_slow", account=account.id, limit_s=limit_s)
    try:
        await _alert(
            ctx,
            tick,
            account,
            "slow",
            "warning",
            f"the scan has been running for more than {limit_s:g} s (regions: "
            f"{', '.join(account.regions)})",
        )
    except Exception as e:  # the scan goes on; its own outcome is what the tick reports
        log.error("scan_slow_alert_failed", account=account.id, error=str(e))


async def _scan_account(rt: _Runtime, ctx: Context, tick: DiscoveryTick, account: Account) -> str:
    """Scan every region of one account under its lease; the outcome."""
    lease = _ScanLease(ctx, account.id, rt.settings.lease_ttl_s)
    if not await lease.acquire():
        SCANS_SKIPPED.inc()
        log.info("scan_skipped", account=account.id, reason="another replica holds the lease")
        return "skipped"
    started = time.monotonic()
    keeper = asyncio.create_task(lease.keep())
    alerting = asyncio.Event()
    watchdog = asyncio.create_task(_watch(ctx, tick, account, rt.settings.scan_alert_s, alerting))
    outcome = "transient"
    try:
        for region in account.regions:
            await _scan_region(rt, ctx, tick, account, region, lease)
        outcome = "ok"
    except CallPermanent:
        outcome = "permanent"
        raise
    except _LeaseLost:
        outcome = "lost"
        raise
    finally:
        if alerting.is_set():  # bounded by the producer's retry timeout
            await asyncio.wait([watchdog])
        await stop(keeper, watchdog)
        with contextlib.suppress(Exception):
            await lease.release()
        elapsed = time.monotonic() - started
        SCAN_SECONDS.labels(outcome).observe(elapsed)
        if outcome == "ok":
            await ctx.redis.hset(
                inv.status_key(ctx.keys, account.id),
                mapping={
                    "ok_at": utcnow().isoformat(),
                    "duration_s": f"{elapsed:.3f}",
                    "error": "",
                },
            )
    return outcome


async def scan(tick: DiscoveryTick, ctx: Context) -> None:
    """The handler of ``tick.discovery``: every account, then retry if any failed transiently."""
    rt = runtime()
    retry: BaseException | None = None
    for account in await AccountStore(ctx.redis, ctx.keys).all():
        try:
            await _scan_account(rt, ctx, tick, account)
        except CallPermanent as e:
            SCAN_ERRORS.labels("permanent").inc()
            log.error("scan_failed", account=account.id, error=str(e))
            await _permanent(ctx, tick, account, e)
        except Exception as e:  # transient (CallTransient, BreakerOpen, Redis), or lease lost
            kind = (
                "breaker"
                if isinstance(e, BreakerOpen)
                else "lease_lost"
                if isinstance(e, _LeaseLost)
                else "transient"
            )
            SCAN_ERRORS.labels(kind).inc()
            log.warning("scan_interrupted", account=account.id, kind=kind, error=str(e))
            if isinstance(e, _LeaseLost):
                continue  # another replica scans it now
            retry = retry or e
    if retry is not None:
        raise retry


async def _permanent(ctx: Context, tick: DiscoveryTick, account: Account, e: CallPermanent) -> None:
    """A critical alert when the account starts failing, or fails with another error code."""
    key = inv.status_key(ctx.keys, account.id)
    code = e.body or type(e).__name__
    previous: Any = await ctx.redis.hget(key, "error")
    if previous is None or previous.decode() != code:
        await _alert(ctx, tick, account, f"failed ({code})", "critical", str(e))
    await ctx.redis.hset(key, "error", code)


CONCERN = Concern(
    group="discovery",
    topics=("ticks",),
    handlers={DiscoveryTick: scan},
    concurrency=1,
    # WORKLOADS §1: exponential backoff, at most 3 retries.
    retry=RetryPolicy(max_retries=3, base_s=5.0, cap_s=60.0),
)

#: The consumer groups of this part.
CONCERNS: tuple[Concern, ...] = (CONCERN,)
#: ``streamproc up`` runs it: the demo's moto server when the AWS endpoint is the demo one.
UP_ROLE = ["aws-demo"]


def register(sub: Any) -> None:
    """``streamproc accounts`` and ``streamproc aws-demo``."""
    accounts.register(sub)
    discovery_demo.register(sub)


def add_routes(app: Any, ingest: Any) -> None:
    """``/v1/accounts`` on the ingest service."""
    accounts.add_routes(app, ingest)
