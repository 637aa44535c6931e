"""The open-loop load generator: events leave on a fixed schedule, whatever the system does.

Event ``i`` is due at ``start + i / rate`` (computed from the start, never from the previous
send's completion) and carries that *intended* time in ``occurred_at``; latency is measured
from it, so a slow system that delays sending shows up as latency (no coordinated omission).
Due events go out in batches of at most ``batch`` with up to ``max_in_flight`` sends at once;
a send never waits for the previous one to finish unless that many are outstanding.

What the generator itself adds is kept small and measured apart: it runs on a loop whose timers
have microseconds (``precise_loop``), builds events before they are due, records its
histograms after the run, and stamps ``sent_at`` when it hands a batch to the publish call, so
the sinks can tell the engine's latency (from ``sent_at``) from the generator's lateness
(``send_lag``, intended time → send).

Run in its own process: ``python -m streamproc.bench.loadgen SPEC_JSON``; writes its result
(JSON) to ``spec.result_path``.
"""

from __future__ import annotations

import asyncio
import selectors
import sys
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import orjson

from streamproc.bench import _hist
from streamproc.bench.events import REGISTRY, BenchEvent
from streamproc.codec import Codec
from streamproc.connection import connect
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.settings import ProducerSettings, RedisSettings

__all__ = ("LoadSpec", "bench_event", "run_load")

#: ``key`` of warm-up events: sent, handled, not recorded.
WARMUP_KEY, MEASURED_KEY = "w", "m"


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    redis_url: str
    prefix: str
    result_path: str
    via: Literal["producer", "http"] = "producer"
    #: Events per second; 0 = every event due at the start (a burst).
    rate_per_s: float = 1000.0
    duration_s: float = 1.0
    warmup_s: float = 0.0
    #: Burst size (``rate_per_s`` = 0).
    events: int = 0
    event_bytes: int = 256
    batch: int = 100
    max_in_flight: int = 64
    dedup_window_ms: int = 86_400_000
    #: HTTP ingest: ``http://127.0.0.1:PORT/v1/events`` and an agent token.
    ingest_url: str = ""
    token: str = ""


def bench_event(i: int, intended_s: float, *, warm: bool, pad: str) -> BenchEvent:
    """Event ``i`` of a run; ``occurred_at`` is its intended send time."""
    return BenchEvent(
        key=WARMUP_KEY if warm else MEASURED_KEY,
        source="bench",
        seq=i,
        pad=pad,
        occurred_at=datetime.fromtimestamp(intended_s, UTC),
    )


def _pad_for(codec: Codec[Any], event_bytes: int) -> str:
    probe = msgspec.structs.replace(
        bench_event(10**6, time.time(), warm=False, pad=""), sent_at=time.time()
    )
    return "x" * max(0, event_bytes - len(codec.encode(probe)[b"data"]))


Send = Callable[[list[BenchEvent]], Awaitable[int]]


async def _producer_sender(spec: LoadSpec, codec: Codec[Any]) -> tuple[Send, Callable[[], Any]]:
    client = connect(RedisSettings(url=spec.redis_url, max_connections=spec.max_in_flight + 8))
    producer = Producer(
        client, codec, Keys(spec.prefix), ProducerSettings(dedup_window_ms=spec.dedup_window_ms)
    )

    async def send(events: list[BenchEvent]) -> int:
        return len(await producer.publish_many(events))

    return send, client.aclose


async def _http_sender(spec: LoadSpec) -> tuple[Send, Callable[[], Any]]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=spec.max_in_flight),
        headers={"Authorization": f"Bearer {spec.token}", "Content-Type": "application/json"},
    )

    async def send(events: list[BenchEvent]) -> int:
        body = orjson.dumps(
            [
                {
                    "type": e.type_name(),
                    "id": e.id,
                    "occurred_at": e.occurred_at,
                    "key": e.key,
                    "seq": e.seq,
                    "pad": e.pad,
                    "sent_at": e.sent_at,
                }
                for e in events
            ]
        )
        async with session.post(spec.ingest_url, data=body) as r:
            await r.read()
            return len(events) if r.status == 202 else 0

    return send, session.close


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Send the whole schedule; return counts, times and histograms (send lag, publish)."""
    codec: Codec[Any] = Codec(REGISTRY)
    pad = _pad_for(codec, spec.event_bytes)
    if spec.via == "http":
        send, close = await _http_sender(spec)
    else:
        send, close = await _producer_sender(spec, codec)
    rate = spec.rate_per_s
    n_warm = int(rate * spec.warmup_s) if rate else 0
    n_total = n_warm + (int(rate * spec.duration_s) if rate else spec.events)
    # Raw seconds, turned into histograms after the run: nothing but the send in the hot path.
    send_lags, publish_s = array("d"), array("d")
    sent = [0, 0]  # warm-up, measured
    errors = 0
    room = asyncio.Semaphore(spec.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(events: list[BenchEvent], intended: list[float], warm: int) -> None:
        nonlocal errors
        now = time.time()
        for t in intended[warm:]:
            send_lags.append(now - t)
        try:
            ok = await send([msgspec.structs.replace(e, sent_at=now) for e in events])
        except Exception:
            ok = 0
        finally:
            room.release()
        done = time.time()
        if ok != len(events):
            errors += len(events)
            return
        sent[0] += warm
        sent[1] += len(events) - warm
        for t in intended[warm:]:
            publish_s.append(done - t)

    start_wall = time.time() + 0.05
    start_perf = time.perf_counter() + 0.05

    def intended_s(k: int) -> float:
        return start_wall + (k / rate if rate else 0.0)

    # Events are built ahead (up to ``batch`` of them), after the previous send and before
    # they are due, so building them delays no event.
    ahead: deque[tuple[BenchEvent, float]] = deque()
    built = 0

    def build_ahead() -> None:
        nonlocal built
        while built < n_total and len(ahead) < spec.batch:
            t = intended_s(built)
            ahead.append((bench_event(built, t, warm=built < n_warm, pad=pad), t))
            built += 1

    build_ahead()
    # Nothing leaves before the schedule starts (a burst used to go out up to 50 ms before
    # its intended time, which hid that much of its latency).
    await asyncio.sleep(max(0.0, start_perf - time.perf_counter()))
    i = 0
    while i < n_total:
        elapsed = time.perf_counter() - start_perf
        due = n_total if not rate else min(n_total, int(elapsed * rate) + 1)
        if due <= i:
            await asyncio.sleep(max(0.0, i / rate - elapsed))
            continue
        while i < due:
            j = min(due, i + spec.batch)
            await room.acquire()
            events, intended = zip(*(ahead.popleft() for _ in range(j - i)), strict=True)
            warm = max(0, min(j, n_warm) - i)
            task = asyncio.create_task(one(list(events), list(intended), warm))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i = j
            build_ahead()
    await asyncio.gather(*tasks)
    end_wall = time.time()
    await close()
    send_lag, publish = _hist.new_histogram(), _hist.new_histogram()
    for s in send_lags:
        _hist.record_s(send_lag, s)
    for s in publish_s:
        _hist.record_s(publish, s)
    first = start_wall + (n_warm / rate if rate else 0.0)
    return {
        "sent_warmup": sent[0],
        "sent": sent[1],
        "errors": errors,
        "offered": n_total - n_warm,
        "first_intended_s": first,
        "last_intended_s": intended_s(n_total - 1),
        "end_s": end_wall,
        "send_lag": _hist.encode(send_lag),
        "publish": _hist.encode(publish),
    }


def precise_loop() -> asyncio.AbstractEventLoop:
    """The stdlib loop on ``select()``, whose timeout has microseconds. On epoll (the default
    selector) and on uvloop, timers wake in whole milliseconds: at 1,000 events/s that made
    every event up to 1 ms late (0.55 ms at the median) before it was even sent. (select()
    watches file descriptors below 1024 only: ample for the generator's few dozen sockets.)"""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def main(argv: list[str]) -> int:
    spec = msgspec.json.decode(argv[0], type=LoadSpec)
    with asyncio.Runner(loop_factory=precise_loop) as runner:
        result = runner.run(run_load(spec))
    Path(spec.result_path).write_bytes(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
