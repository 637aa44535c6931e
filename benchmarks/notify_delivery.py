"""Notification delivery: signed webhooks per second through one ``notify-deliver`` process.

Everything runs on this machine against an embedded Redis (unless REDIS_URL is set) and a
webhook receiver in a process of its own (aiohttp on uvloop, 127.0.0.1) that answers 200 after
``--latency-ms`` (10 ms) per request. The delivery side runs in child processes on uvloop
(``streamproc.cli.run_async``), each told ``go`` once it has connected, as in
``benchmarks/throughput.py``. Phases, each in every round:

- capacity-64 / -256  a bare aiohttp client (no Redis, a pre-signed body) posting the same
                      webhooks to the receiver with 64 / 256 requests at once: the receiver's
                      own capacity, and the most any aiohttp sender reaches here
- deliver             N ``notify.delivery`` events (pre-fanned, one webhook subscription)
                      on ``deliveries`` before ``go``; ONE ``DELIVER`` consumer (concurrency
                      64) delivers them; timed from ``go`` to its last ack
- fanout+deliver      N ``Notification`` events on ``notify`` before ``go``; ``FANOUT`` and
                      ``DELIVER`` in one process (as ``streamproc consume --all`` runs them)
- paced               the same two, with events published at each of ``--rates`` per second
                      to a consumer already running, ``--warm-s`` of warm-up then
                      ``--seconds`` measured: publish → receive latency (HdrHistogram), from
                      the publish call and from the intended send time (open loop)
- fan-out 100         one notification to a cluster with 100 webhook subscriptions, FANOUT +
                      DELIVER in one process, repeated: publish → all 100 received
- fan-out cost        M such notifications before ``go``, FANOUT alone: its CPU per
                      notification (the 100 delivery events it appends, the feed entry)

Measured: deliveries/s; CPU per delivery of the delivery process (getrusage user+sys from
``go`` to its last ack), of Redis (INFO delta) and of the receiver; publish → receive latency
(the receiver stamps each request on arrival, before its delay; the machine's monotonic
clock is shared by every process). Checked, not assumed: every expected (subscription,
``webhook-id``) pair arrived exactly once and nothing else did, the delivery process settled
nothing but acks (no retry, no dead letter), and every 25th request's Standard Webhooks
signature verifies with the subscription's key (the ``standardwebhooks`` reference package).
A failed check ends the run. ``--profile`` runs one pre-fanned phase under
``benchmarks/throughput.py``'s CPU-time sampler instead and prints where the CPU goes.

Usage: .venv/bin/python benchmarks/notify_delivery.py [--events 5000] [--rounds 3] [--quick]
       [--rates 200,500] [--seconds 5] [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import (  # noqa: E402
    Control,
    CpuSampler,
    cleanup,
    cpu_s,
    machine,
    redis_cpu_s,
    result_of,
    say,
)
from notifications import concern as notify  # noqa: E402
from notifications.http_channels import webhook_body  # noqa: E402
from notifications.messages import message_of  # noqa: E402
from notifications.settings import NotifySettings  # noqa: E402
from notifications.subscriptions import Subscription, SubscriptionStore, new_subscription  # noqa: E402
from schemas import REGISTRY, Notification  # noqa: E402
from schemas.notify import DeliveryRequested  # noqa: E402
from streamproc import (  # noqa: E402
    Codec,
    Consumer,
    ConsumerSettings,
    Context,
    Event,
    Keys,
    Producer,
    ProducerSettings,
    RedisSettings,
    connect,
)
from streamproc.bench import _hist  # noqa: E402
from streamproc.cli import run_async  # noqa: E402
from streamproc.consumer import Acked, Outcome, Settled  # noqa: E402
from streamproc.event import derived_id  # noqa: E402
from streamproc.logs import configure_logging  # noqa: E402

#: The receiver keeps the headers and body of every SAMPLE_EVERY-th request, to verify.
SAMPLE_EVERY = 25
#: Subscriptions of the fan-out phases.
FAN = 100
BODY = "Node ip-10-0-3-17 reports memory pressure; 3 pods were evicted in the last 5 minutes."


# ---------------------------------------------------------------- receiver (its own process)


class Hook:
    """The receiver's state: every arrival (path, webhook-id, monotonic time), a sample of
    whole requests, the most requests in flight at once, and its CPU since ``reset``."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.reset()

    def reset(self) -> None:
        self.arrivals: list[tuple[str, str, float]] = []
        self.samples: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.cpu0 = cpu_s()

    async def handle(self, request: web.Request) -> web.Response:
        t = time.monotonic()
        body = await request.read()
        if len(self.arrivals) % SAMPLE_EVERY == 0:
            self.samples.append(
                {
                    "path": request.path,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                    "body": body.decode(),
                }
            )
        self.arrivals.append((request.path, request.headers.get("webhook-id", ""), t))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        return web.Response(text="ok")

    def report(self) -> dict[str, Any]:
        return {
            "arrivals": self.arrivals,
            "samples": self.samples,
            "max_in_flight": self.max_in_flight,
            "cpu_s": cpu_s() - self.cpu0,
        }


async def receiver_main(latency_s: float) -> None:
    """Serve until stdin closes; ``mark`` resets the counts, ``report`` prints them (JSON)."""
    hook = Hook(latency_s)
    app = web.Application()
    app.router.add_post("/{tail:.*}", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(f"ready {runner.addresses[0][1]}", flush=True)
    while line := (await stdin.readline()).strip():
        if line == b"mark":
            hook.reset()
            print("ok", flush=True)
        elif line == b"report":
            print(json.dumps(hook.report()), flush=True)
    await runner.cleanup()


# ---------------------------------------------------------------- roles (run in a child)


def notification(i: int, cluster: str) -> Notification:
    return Notification(
        key=cluster,
        source="bench",
        cluster_id=cluster,
        severity="warning",
        title=f"Memory pressure on node {i}",
        body=BODY,
    )


async def role_blast(a: argparse.Namespace, ctl: Control) -> dict[str, Any]:
    """A bare aiohttp sender: ``a.events`` signed-size webhooks, ``a.concurrency`` at once."""
    message = message_of(notification(0, "c1"), NotifySettings().base_url)
    now = datetime.now(UTC).replace(microsecond=0)
    body = webhook_body(message, "sub_0", now)
    secret = new_subscription(cluster="c1", channel="webhook", destination=a.target).secret
    signature = Webhook(secret).sign(message.notification_id, now, body.decode())
    base = {
        "Content-Type": "application/json",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512, limit_per_host=128),
        headers={"User-Agent": "bench"},
    )
    left = a.events
    errors = 0

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            headers = {**base, "webhook-id": f"blast-{left}"}
            async with session.post(a.target, data=body, headers=headers) as resp:
                await resp.read()
                errors += resp.status != 200
            ctl.mark(1)

    await ctl.ready()
    await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    await session.close()
    return ctl.result(errors=errors)


async def role_deliver(a: argparse.Namespace, ctl: Control) -> dict[str, Any]:
    """DELIVER (and with ``--fanout`` FANOUT, or with ``--fanout-only`` FANOUT alone) in this
    process until ``a.events`` entries of the last group were acked."""
    notify.use_settings(NotifySettings())
    client = connect(RedisSettings(url=a.url))
    keys, codec = Keys(a.prefix), Codec(REGISTRY)
    producer = Producer(client, codec, keys)
    done = asyncio.Event()
    handler_hist = _hist.new_histogram()
    outcomes: collections.Counter[str] = collections.Counter()

    def settled(batch: Sequence[Outcome]) -> None:
        before = ctl.events
        for o in batch:
            outcomes[f"{type(o).__name__}/{o.status.value}"] += 1
        ctl.mark(sum(isinstance(o, Acked) and o.status is Settled.ACKED for o in batch))
        if a.report_every and ctl.events // a.report_every > before // a.report_every:
            print(f"acked {ctl.events}", flush=True)
        if ctl.events >= a.events:
            done.set()

    fan_out = next(iter(notify.FANOUT.handlers.values()))

    async def timed_fan_out(event: Any, ctx: Context) -> None:
        t = time.perf_counter()
        try:
            await fan_out(event, ctx)
        finally:
            _hist.record_s(handler_hist, time.perf_counter() - t)

    fanout = dataclasses.replace(
        notify.FANOUT, handlers=dict.fromkeys(notify.FANOUT.handlers, timed_fan_out)
    )
    concerns = (
        [fanout] if a.fanout_only else [fanout, notify.DELIVER] if a.fanout else [notify.DELIVER]
    )
    consumers = [
        Consumer(
            c,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            settings=ConsumerSettings(consumer=a.name, block_ms=200),
            after_settle=settled if c is concerns[-1] else None,
        )
        for c in concerns
    ]
    await client.ping()
    tasks: list[asyncio.Task[None]] = []
    if a.warm:  # running before go: its start (groups, name) is not in the figures
        for c in consumers:
            started = asyncio.Event()
            tasks.append(asyncio.create_task(c.run(started=started)))
            await started.wait()
        await asyncio.sleep(0.1)  # its loops start
    await ctl.ready()
    sampler = CpuSampler()
    with sampler if a.profile else contextlib.nullcontext():
        tasks = tasks or [asyncio.create_task(c.run()) for c in consumers]
        waits = [asyncio.create_task(e.wait()) for e in (done, ctl.stop)]
        await asyncio.wait(waits, return_when="FIRST_COMPLETED")
    for c in consumers:
        c.stop()
    await asyncio.gather(*tasks)
    await notify.runtime().close()
    await client.aclose()
    if a.profile:
        print(profile_table(sampler, ctl.events, ctl.cpu_last - ctl.cpu_go), file=sys.stderr)
    return ctl.result(outcomes=dict(outcomes), handler=_hist.encode(handler_hist))


Role = Callable[[argparse.Namespace, Control], Awaitable[dict[str, Any]]]
ROLES: dict[str, Role] = {"blast": role_blast, "deliver": role_deliver}


async def child_main(a: argparse.Namespace) -> None:
    result = await ROLES[a.role](a, Control())
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


class ReceiverProcess:
    """The parent's handle on the receiver process."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc, self.port = proc, port

    @classmethod
    async def start(cls, latency_s: float) -> ReceiverProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--role",
            "receiver",
            "--latency-ms",
            str(latency_s * 1000),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=1 << 26,
        )
        assert proc.stdout is not None
        word, _, port = (await proc.stdout.readline()).decode().partition(" ")
        if word != "ready":
            raise SystemExit("the receiver did not start")
        return cls(proc, int(port))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{path}"

    async def ask(self, word: str) -> bytes:
        assert self.proc.stdout is not None
        await say(self.proc, word)
        return await self.proc.stdout.readline()

    async def mark(self) -> None:
        await self.ask("mark")

    async def report(self) -> dict[str, Any]:
        return dict(json.loads(await self.ask("report")))

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


@dataclasses.dataclass
class Bench:
    """What every phase of a run shares."""

    client: aioredis.Redis
    url: str
    receiver: ReceiverProcess
    latency_s: float
    figures: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    #: Per-phase extras kept for --json (latency histograms, fan-out runs).
    detail: dict[str, list[Any]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    phase_no: int = 0
    #: Deliveries that arrived exactly once, and signatures verified, over the whole run.
    checked: int = 0
    verified: int = 0

    def prefix(self, name: str) -> str:
        self.phase_no += 1
        return f"nb{self.phase_no}{name.replace('-', '').replace('+', '')}"

    def check(
        self,
        report: dict[str, Any],
        expected: set[tuple[str, str]],
        subs: dict[str, Subscription],
        result: dict[str, Any] | None = None,
    ) -> None:
        """Every expected (path, webhook-id) arrived exactly once and nothing else did; every
        sampled request's signature verifies; the delivery process settled nothing but acks."""
        got = collections.Counter((p, w) for p, w, _ in report["arrivals"])
        missing = expected - got.keys()
        extra = got.keys() - expected
        dupes = sum(c - 1 for c in got.values() if c > 1)
        if missing or extra or dupes:
            raise SystemExit(
                f"delivery check failed: {len(missing)} missing, {len(extra)} unexpected, "
                f"{dupes} duplicates (of {len(expected)})"
            )
        outcomes = (result or {}).get("outcomes", {})
        not_acked = {k: v for k, v in outcomes.items() if k != "Acked/acked"}
        if not_acked:
            raise SystemExit(f"settled other than acked: {not_acked}")
        for s in report["samples"]:
            try:
                Webhook(subs[s["path"]].secret).verify(s["body"], s["headers"])
            except WebhookVerificationError as e:
                raise SystemExit(f"signature check failed for {s['path']}: {e}") from e
        if not report["samples"]:
            raise SystemExit("no signature was sampled")
        self.checked += len(expected)
        self.verified += len(report["samples"])

    def add(self, **figures: float) -> None:
        for k, v in figures.items():
            self.figures[k].append(v)


async def spawn(
    role: str, url: str, prefix: str, events: int, **opts: Any
) -> asyncio.subprocess.Process:
    args = [sys.executable, __file__, "--role", role, "--url", url, "--prefix", prefix]
    args += ["--events", str(events)]
    for k, v in opts.items():
        if v is True:
            args.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            args += [f"--{k.replace('_', '-')}", str(v)]
    p = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 24
    )
    assert p.stdout is not None
    line = await p.stdout.readline()
    if line.strip() != b"ready":
        await p.wait()
        raise SystemExit(f"{role} did not start ({p.returncode}): {line!r}")
    return p


async def finish(p: asyncio.subprocess.Process, role: str, timeout_s: float) -> dict[str, Any]:
    """The child's result; after ``timeout_s`` it is told to stop and the phase fails."""
    task = asyncio.create_task(result_of(p, role))
    done, _ = await asyncio.wait([task], timeout=timeout_s)
    if not done:
        await say(p, "stop")
        got = await task
        raise SystemExit(f"{role}: only {got['events']} acked in {timeout_s:.0f} s: {got}")
    return task.result()


async def subscribe(
    client: aioredis.Redis, prefix: str, url: Callable[[str], str], n: int
) -> dict[str, Subscription]:
    """``n`` webhook subscriptions of cluster ``c<n>`` posting to ``url("s<i>")``, by the
    receiver path each posts to."""
    store = SubscriptionStore(client, Keys(prefix))
    subs = {}
    for i in range(n):
        sub = await store.add(
            new_subscription(cluster=f"c{n}", channel="webhook", destination=url(f"s{i}"))
        )
        subs[f"/hook/s{i}"] = sub
    return subs


def deliveries(notes: Sequence[Notification], sub: Subscription) -> list[DeliveryRequested]:
    """What FANOUT would append for ``notes`` and one subscription (pre-fanned)."""
    base_url = NotifySettings().base_url
    return [
        DeliveryRequested(
            id=derived_id(n.id, sub.id),
            key=sub.id,
            source="notify-fanout",
            subscription_id=sub.id,
            message=message_of(n, base_url),
        )
        for n in notes
    ]


async def prefill(client: aioredis.Redis, prefix: str, events: Sequence[Event]) -> None:
    producer = Producer(
        client,
        Codec(REGISTRY),
        Keys(prefix),
        ProducerSettings(dedup_window_ms=0, high_watermark=10**9),
    )
    for i in range(0, len(events), 1000):
        await producer.publish_many(events[i : i + 1000])


def latency(arrivals: Sequence[Sequence[Any]], sent: dict[str, float]) -> tuple[Any, float]:
    """HdrHistogram of arrival - ``sent[webhook-id]``; and the last arrival."""
    hist = _hist.new_histogram()
    for _, wid, t in arrivals:
        _hist.record_s(hist, t - sent[wid])
    return hist, max(t for _, _, t in arrivals)


async def phase_capacity(b: Bench, n: int, concurrency: int) -> None:
    await b.receiver.mark()
    p = await spawn(
        "blast", b.url, "unused", n, concurrency=concurrency, target=b.receiver.url("x")
    )
    t_go = time.monotonic()
    await say(p, "go")
    got = await finish(p, "blast", 60 + n / 100)
    rep = await b.receiver.report()
    if got["errors"] or len(rep["arrivals"]) != n:
        raise SystemExit(f"capacity-{concurrency}: {got['errors']} errors, {len(rep['arrivals'])}")
    name = f"capacity{concurrency}"
    b.add(
        **{
            f"{name}_per_s": n / (got["t_last"] - t_go),
            f"{name}_client_cpu_us": got["cpu_s"] / n * 1e6,
            f"{name}_receiver_cpu_us": rep["cpu_s"] / n * 1e6,
            f"{name}_max_in_flight": rep["max_in_flight"],
        }
    )


async def phase_burst(b: Bench, n: int, *, fanout: bool) -> None:
    """N deliveries (pre-fanned, or N notifications with fan-out) on the stream before go."""
    name = "fanout" if fanout else "deliver"
    prefix = b.prefix(name)
    subs = await subscribe(b.client, prefix, b.receiver.url, 1)
    [sub] = subs.values()
    notes = [notification(i, sub.cluster) for i in range(n)]
    await prefill(b.client, prefix, notes if fanout else deliveries(notes, sub))
    p = await spawn("deliver", b.url, prefix, n, fanout=fanout)
    await b.receiver.mark()
    redis0 = await redis_cpu_s(b.client)
    t_go = time.monotonic()
    await say(p, "go")
    got = await finish(p, name, 60 + n / 50)
    redis_s = await redis_cpu_s(b.client) - redis0
    rep = await b.receiver.report()
    b.check(rep, {(path, x.id) for x in notes for path in subs}, subs, got)
    last = max(t for _, _, t in rep["arrivals"])
    b.add(
        **{
            f"{name}_per_s": n / (got["t_last"] - t_go),
            f"{name}_received_per_s": n / (last - t_go),
            f"{name}_cpu_us": got["cpu_s"] / n * 1e6,
            f"{name}_redis_cpu_us": redis_s / n * 1e6,
            f"{name}_receiver_cpu_us": rep["cpu_s"] / n * 1e6,
            f"{name}_max_in_flight": rep["max_in_flight"],
        }
    )
    b.detail[f"{name}_outcomes"].append(got["outcomes"])
    await cleanup(b.client, prefix)


async def phase_paced(
    b: Bench, rate: float, warm_s: float, seconds: float, *, fanout: bool
) -> None:
    """Events published at ``rate``/s to a running consumer: publish → receive latency of
    those after the first ``warm_s`` (its pools fill, its first batches)."""
    name = f"paced_{'fanout' if fanout else 'deliver'}_{rate:g}"
    prefix = b.prefix(name)
    subs = await subscribe(b.client, prefix, b.receiver.url, 1)
    [sub] = subs.values()
    warm, n = int(rate * warm_s), int(rate * (warm_s + seconds))
    notes = [notification(i, sub.cluster) for i in range(n)]
    events: Sequence[Event] = notes if fanout else deliveries(notes, sub)
    producer = Producer(b.client, Codec(REGISTRY), Keys(prefix))
    p = await spawn("deliver", b.url, prefix, n, fanout=fanout, warm=True)
    await b.receiver.mark()
    intended: dict[str, float] = {}
    published: dict[str, float] = {}
    redis0 = await redis_cpu_s(b.client)
    await say(p, "go")
    start, i = time.monotonic() + 0.05, 0
    while i < n:
        now = time.monotonic()
        due = min(n, math.floor((now - start) * rate) + 1)
        if due > i:
            batch = events[i:due]
            await producer.publish_many(batch)
            for k, note in enumerate(notes[i:due], i):
                intended[note.id], published[note.id] = start + k / rate, now
            i = due
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
    t_sent = time.monotonic()
    got = await finish(p, name, 60 + n / 50)
    redis_s = await redis_cpu_s(b.client) - redis0
    rep = await b.receiver.report()
    b.check(rep, {(path, x.id) for x in notes for path in subs}, subs, got)
    measured = {x.id for x in notes[warm:]}
    arrivals = [r for r in rep["arrivals"] if r[1] in measured]
    from_pub, last = latency(arrivals, published)
    from_intended, _ = latency(arrivals, intended)
    s_pub, s_int = _hist.summary(from_pub), _hist.summary(from_intended)
    b.add(
        **{
            f"{name}_p50_ms": s_pub["p50_ms"],
            f"{name}_p99_ms": s_pub["p99_ms"],
            f"{name}_max_ms": s_pub["max_ms"],
            f"{name}_intended_p50_ms": s_int["p50_ms"],
            f"{name}_intended_p99_ms": s_int["p99_ms"],
            f"{name}_publish_lag_ms": (t_sent - start - (n - 1) / rate) * 1000,
            f"{name}_per_s": (n - warm) / (last - start - warm_s),
            f"{name}_redis_cpu_us": redis_s / n * 1e6,
            f"{name}_cpu_us": got["cpu_s"] / n * 1e6,
        }
    )
    b.detail[name].append({"from_publish": s_pub, "from_intended": s_int})
    await cleanup(b.client, prefix)


async def phase_fan100(b: Bench, runs: int) -> None:
    """One notification at a time to 100 subscriptions: publish → all 100 received."""
    prefix = b.prefix("fan100")
    subs = await subscribe(b.client, prefix, b.receiver.url, FAN)
    cluster = next(iter(subs.values())).cluster
    notes = [notification(i, cluster) for i in range(runs)]
    producer = Producer(b.client, Codec(REGISTRY), Keys(prefix))
    p = await spawn("deliver", b.url, prefix, runs * FAN, fanout=True, report_every=FAN)
    assert p.stdout is not None
    await b.receiver.mark()
    await say(p, "go")
    published: dict[str, float] = {}
    acked_s: list[float] = []
    for k, note in enumerate(notes):
        await asyncio.sleep(0.2)  # the previous run's settles and the breaker's writes end
        published[note.id] = t = time.monotonic()
        await producer.publish(note)
        while True:
            line = await asyncio.wait_for(p.stdout.readline(), 30)
            if line.startswith(b"acked ") and int(line.split()[1]) >= (k + 1) * FAN:
                acked_s.append(time.monotonic() - t)
                break
    got = await finish(p, "fan100", 30)
    rep = await b.receiver.report()
    b.check(rep, {(path, x.id) for x in notes for path in subs}, subs, got)
    by_id: dict[str, list[float]] = collections.defaultdict(list)
    for _, wid, t in rep["arrivals"]:
        by_id[wid].append(t - published[wid])
    all_ms = [max(v) * 1000 for v in by_id.values()]
    first_ms = [min(v) * 1000 for v in by_id.values()]
    handler = _hist.summary(_hist.merge([got["handler"]]))
    b.add(
        fan100_all_ms=statistics.median(all_ms),
        fan100_first_ms=statistics.median(first_ms),
        fan100_acked_ms=statistics.median(acked_s) * 1000,
        fan100_handler_ms=handler["p50_ms"],
        fan100_cpu_ms=got["cpu_s"] / runs * 1000,
    )
    b.detail["fan100_all_ms"].append(all_ms)
    await cleanup(b.client, prefix)


async def phase_fanout_cost(b: Bench, m: int) -> None:
    """FANOUT alone over ``m`` notifications, each to 100 subscriptions."""
    prefix = b.prefix("fancost")
    subs = await subscribe(b.client, prefix, b.receiver.url, FAN)
    cluster = next(iter(subs.values())).cluster
    await prefill(b.client, prefix, [notification(i, cluster) for i in range(m)])
    p = await spawn("deliver", b.url, prefix, m, fanout_only=True)
    redis0 = await redis_cpu_s(b.client)
    t_go = time.monotonic()
    await say(p, "go")
    got = await finish(p, "fan-out cost", 60 + m)
    redis_s = await redis_cpu_s(b.client) - redis0
    appended = await b.client.xlen(Keys(prefix).stream("deliveries"))
    if appended != m * FAN:
        raise SystemExit(f"fan-out cost: {appended} deliveries appended, expected {m * FAN}")
    handler = _hist.summary(_hist.merge([got["handler"]]))
    b.add(
        fancost_per_s=m / (got["t_last"] - t_go),
        fancost_cpu_ms=got["cpu_s"] / m * 1000,
        fancost_redis_cpu_ms=redis_s / m * 1000,
        fancost_handler_ms=handler["p50_ms"],
    )
    await cleanup(b.client, prefix)


async def measure(a: argparse.Namespace, url: str) -> Bench:
    receiver = await ReceiverProcess.start(a.latency_ms / 1000)
    b = Bench(connect(RedisSettings(url=url)), url, receiver, a.latency_ms / 1000)
    try:
        paced = [
            (f"paced {w} {rate:g}/s", partial(phase_paced, b, rate, a.warm_s, a.seconds, fanout=f))
            for rate in a.rates
            for w, f in (("deliver", False), ("fanout+deliver", True))
        ]
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("capacity-64", partial(phase_capacity, b, a.events, 64)),
            ("capacity-256", partial(phase_capacity, b, a.events, 256)),
            ("deliver", partial(phase_burst, b, a.events, fanout=False)),
            ("fanout+deliver", partial(phase_burst, b, a.events, fanout=True)),
            *paced,
            ("fan-out 100", partial(phase_fan100, b, a.fan_runs)),
            ("fan-out cost", partial(phase_fanout_cost, b, a.fan_cost)),
        ]
        for rnd in range(a.rounds):
            for label, step in steps:
                t = time.monotonic()
                await step()
                print(f"round {rnd + 1} {label}: {time.monotonic() - t:.1f} s", file=sys.stderr)
    finally:
        await receiver.stop()
        await b.client.aclose()
    return b


# ---------------------------------------------------------------- report


def report(b: Bench, a: argparse.Namespace) -> str:
    """The figures as one markdown table: median over rounds, range, a note, a verdict."""
    f = b.figures
    conc = notify.DELIVER.concurrency
    lat, seq_bound, conc_bound = f"{b.latency_s * 1000:g} ms", 1 / b.latency_s, conc / b.latency_s

    def m(k: str) -> float:
        return statistics.median(f[k])

    def ratio(k: str, base: str) -> float:
        """Median of the per-round ratios."""
        return statistics.median(x / y for x, y in zip(f[k], f[base], strict=True))

    def bounds(k: str) -> str:
        return (
            f"{m(k) / seq_bound:.1f}x the sequential bound, {m(k) / conc_bound:.2f} of the "
            f"{conc}-at-once bound, {ratio(k, 'capacity64_per_s'):.2f} of bare aiohttp at 64"
        )

    def verdict(k: str) -> str:
        return "pass" if m(k) >= 1000 else "**miss**"

    three = {w: m(f"{w}_cpu_us") + m(f"{w}_redis_cpu_us") + m(f"{w}_receiver_cpu_us")
             for w in ("deliver", "fanout")}  # fmt: skip
    # (label, figure, format, unit, note, verdict); a row without a figure is a heading.
    rows: list[tuple[str, str, str, str, str, str]] = [
        (f"**Bounds**: sequential sender 1 / {lat} = {seq_bound:,.0f}/s; {conc} at once / "
         f"{lat} = {conc_bound:,.0f}/s", "", "", "", "", ""),
        ("receiver capacity: bare aiohttp client, 64 at once, req/s", "capacity64_per_s", ",.0f",
         "", f"{m('capacity64_per_s') / conc_bound:.2f} of {conc_bound:,.0f}", ""),
        ("receiver capacity: bare aiohttp client, 256 at once, req/s", "capacity256_per_s",
         ",.0f", "", f"{m('capacity256_max_in_flight'):.0f} in flight at most", ""),
        ("receiver CPU per request (at 256)", "capacity256_receiver_cpu_us", ",.0f", " µs",
         f"one core: {1e6 / m('capacity256_receiver_cpu_us'):,.0f} req/s", ""),
        ("bare client CPU per request (at 64)", "capacity64_client_cpu_us", ",.0f", " µs", "", ""),
        (f"**Deliveries/s, one process, DELIVER concurrency {conc}** (target >= 1,000/s)",
         "", "", "", "", ""),
        ("pre-fanned: DELIVER alone, to its last ack", "deliver_per_s", ",.0f", "",
         bounds("deliver_per_s"), verdict("deliver_per_s")),
        ("pre-fanned: to the last arrival", "deliver_received_per_s", ",.0f", "", "", ""),
        ("with fan-out: FANOUT + DELIVER in one process, to the last ack", "fanout_per_s",
         ",.0f", "", bounds("fanout_per_s"), verdict("fanout_per_s")),
        ("requests in flight at the receiver at most (pre-fanned)", "deliver_max_in_flight",
         ".0f", "", f"of {conc}; on average {m('deliver_per_s') * b.latency_s:.1f} "
         f"(rate x {lat}, Little's law)", ""),
        ("**CPU per delivery** (getrusage user+sys; Redis: INFO)", "", "", "", "", ""),
        ("delivery process, pre-fanned", "deliver_cpu_us", ",.0f", " µs",
         f"{ratio('deliver_cpu_us', 'capacity64_client_cpu_us'):.1f}x the bare client; one "
         f"core: {1e6 / m('deliver_cpu_us'):,.0f}/s", ""),
        ("delivery process, with fan-out", "fanout_cpu_us", ",.0f", " µs",
         f"one core: {1e6 / m('fanout_cpu_us'):,.0f}/s", ""),
        ("Redis, pre-fanned", "deliver_redis_cpu_us", ",.0f", " µs", "", ""),
        ("Redis, with fan-out", "fanout_redis_cpu_us", ",.0f", " µs", "", ""),
        ("receiver, pre-fanned", "deliver_receiver_cpu_us", ",.0f", " µs",
         f"the three, pre-fanned: {three['deliver']:,.0f} µs = {2e6 / three['deliver']:,.0f}/s "
         f"on 2 cores; with fan-out {three['fanout']:,.0f} µs", ""),
    ]  # fmt: skip
    for rate in a.rates:
        rows.append((f"**Publish → receive at {rate:,g}/s** (consumer running; {a.warm_s:g} s "
                     f"warm-up, then {a.seconds:g} s measured; HdrHistogram; arrival stamped by "
                     "the receiver)", "", "", "", "", ""))  # fmt: skip
        for w, label in (("deliver", "pre-fanned"), ("fanout", "with fan-out")):
            k = f"paced_{w}_{rate:g}"
            rows += [
                (f"{label}: p50", f"{k}_p50_ms", ",.1f", " ms", "", ""),
                (f"{label}: p99", f"{k}_p99_ms", ",.1f", " ms",
                 f"from the intended send time: p50 {m(k + '_intended_p50_ms'):,.1f}, p99 "
                 f"{m(k + '_intended_p99_ms'):,.1f} ms", ""),
                (f"{label}: delivered/s", f"{k}_per_s", ",.0f", "",
                 "held" if m(f"{k}_per_s") >= 0.95 * rate else "**not held**", ""),
                (f"{label}: delivery process CPU per delivery", f"{k}_cpu_us", ",.0f", " µs",
                 f"Redis {m(k + '_redis_cpu_us'):,.0f} µs (with the publishing)", ""),
            ]  # fmt: skip
    rows += [
        (f"**Fan-out: one notification to {FAN} webhooks** (median of {a.fan_runs} runs per "
         "round)", "", "", "", "", ""),
        (f"publish → all {FAN} received", "fan100_all_ms", ",.1f", " ms", "", ""),
        ("publish → first received", "fan100_first_ms", ",.1f", " ms", "", ""),
        (f"publish → {FAN} acked (as the parent saw it)", "fan100_acked_ms", ",.1f", " ms", "",
         ""),
        ("fan-out handler wall time, p50", "fan100_handler_ms", ".2f", " ms", "", ""),
        (f"FANOUT alone: CPU per notification ({FAN} deliveries appended)", "fancost_cpu_ms",
         ".2f", " ms", f"{m('fancost_cpu_ms') * 1000 / FAN:.1f} µs per delivery appended", ""),
        ("FANOUT alone: Redis CPU per notification", "fancost_redis_cpu_ms", ".2f", " ms", "",
         ""),
        (f"FANOUT alone: notifications/s ({a.fan_cost} queued, concurrency "
         f"{notify.FANOUT.concurrency})", "fancost_per_s", ",.0f", "", "", ""),
        ("FANOUT alone: handler wall time, p50", "fancost_handler_ms", ".2f", " ms", "", ""),
    ]  # fmt: skip
    out = [
        f"| figure (receiver answers after {lat}; {a.events:,} deliveries per burst; median of "
        f"{a.rounds}) | median | range | note | verdict |",
        "|---|---:|---:|---|---|",
    ]
    for label, k, fmt, unit, note, ok in rows:
        if not k:
            out.append(f"| {label} | | | | |")
            continue
        spread = "" if len(f[k]) < 2 else f"{min(f[k]):{fmt}}-{max(f[k]):{fmt}}"
        out.append(f"| {label} | {m(k):{fmt}}{unit} | {spread} | {note} | {ok} |")
    return "\n".join(out)


# ---------------------------------------------------------------- profile


#: Functions whose inclusive CPU the profile reports, per delivery.
PARTS = (
    "Consumer._reader_loop",
    "Consumer._settler_loop",
    "Handlers.run",
    "deliver",
    "SubscriptionStore.get",
    "Breaker.admit",
    "guarded",
    "HttpChannels.webhook",
    "Webhook.sign",
    "webhook_body",
    "http_post",
    "DeliveryLog.record",
    "Redis.execute_command",
    "Pipeline.execute",
)


def profile_table(sampler: CpuSampler, n: int, cpu: float) -> str:
    out = [f"DELIVER, pre-fanned, {n:,} deliveries", sampler.table(n, cpu, top=20), ""]
    total = sum(sampler.stacks.values())
    incl: collections.Counter[str] = collections.Counter()
    for stack, count in sampler.stacks.items():
        for name in {fn for _, fn, _ in stack}:
            incl[name] += count
    out += ["| part (with callees) | CPU per delivery | share |", "|---|---:|---:|"]
    for name in PARTS:
        us = incl[name] / max(1, total) * cpu / n * 1e6
        out.append(f"| `{name}` | {us:.0f} µs | {incl[name] / max(1, total):.0%} |")
    return "\n".join(out)


async def profile(a: argparse.Namespace, url: str) -> None:
    """One pre-fanned DELIVER run with the CPU sampler in the delivery process."""
    receiver = await ReceiverProcess.start(a.latency_ms / 1000)
    client = connect(RedisSettings(url=url))
    try:
        prefix = "nbprofile"
        subs = await subscribe(client, prefix, receiver.url, 1)
        [sub] = subs.values()
        notes = [notification(i, sub.cluster) for i in range(a.events)]
        await prefill(client, prefix, deliveries(notes, sub))
        p = await spawn("deliver", url, prefix, a.events, profile=True)
        await receiver.mark()
        t_go = time.monotonic()
        await say(p, "go")
        got = await finish(p, "profile", 60 + a.events / 50)
        expected = {(path, x.id) for x in notes for path in subs}
        Bench(client, url, receiver, 0).check(await receiver.report(), expected, subs, got)
        print(
            f"{a.events / (got['t_last'] - t_go):,.0f} deliveries/s under the sampler, "
            f"{got['cpu_s'] / a.events * 1e6:,.0f} µs CPU per delivery"
        )
    finally:
        await receiver.stop()
        await client.aclose()


# ---------------------------------------------------------------- entry point


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--events", type=int, default=5000, help="deliveries per burst phase")
    ap.add_argument("--rounds", type=int, default=3, help="median of N rounds")
    ap.add_argument(
        "--rates",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[200.0, 500.0],
        help="paced phases: events per second (comma-separated)",
    )
    ap.add_argument("--seconds", type=float, default=5, help="paced phases: seconds measured")
    ap.add_argument("--warm-s", type=float, default=1, help="paced phases: seconds not measured")
    ap.add_argument("--fan-runs", type=int, default=10, help="fan-out 100: runs per round")
    ap.add_argument("--fan-cost", type=int, default=100, help="fan-out cost: notifications")
    ap.add_argument("--latency-ms", type=float, default=10, help="the receiver's delay")
    ap.add_argument("--quick", action="store_true", help="1,000 deliveries, 1 round (~30 s)")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    ap.add_argument("--profile", action="store_true", help="profile one pre-fanned run instead")
    ap.add_argument("--role", choices=(*ROLES, "receiver"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="nb", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--fanout", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fanout-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report-every", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    a = ap.parse_args()
    configure_logging("warning")
    if a.role == "receiver":
        run_async(receiver_main(a.latency_ms / 1000))
        return
    if a.role:
        run_async(child_main(a))
        return
    if a.quick:
        a.events, a.rounds, a.seconds, a.warm_s, a.fan_runs, a.fan_cost = 1000, 1, 1, 0.5, 5, 30
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        from streamproc.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="sp-notify-")), appendonly=False)
        url = server.start().url
    try:
        if a.profile:
            run_async(profile(a, url))
            return
        b = run_async(measure(a, url))
    finally:
        if server is not None:
            server.stop()
    print(f"# notify_delivery — {machine()}, load average before {load}")
    print(report(b, a))
    print(
        f"\nChecked: {b.checked:,} deliveries arrived exactly once each (by subscription and "
        "webhook-id), nothing else arrived, the delivery processes settled nothing but acks; "
        f"{b.verified:,} sampled Standard Webhooks signatures verified."
    )
    if a.json:
        body = {"args": {k: str(v) for k, v in vars(a).items()}, "machine": machine()}
        a.json.write_text(json.dumps({**body, "figures": b.figures, "detail": b.detail}, indent=1))


if __name__ == "__main__":
    main()
