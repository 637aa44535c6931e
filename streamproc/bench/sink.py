"""The measuring consumer process: a bench concern whose handler records latencies.

Handler start: ``time.time()`` when the handler begins, against the event's intended send time
(``occurred_at``, set by the load generator), and against the time the generator handed it to
the publish call (``sent_at``: the engine's part alone). Ack: the time the consumer's settle
step (XACK + dedup mark, one Lua script per batch) returned, taken by the consumer's public
``after_settle`` hook. All go to HdrHistograms (microseconds) written as JSON on SIGTERM.

Run in its own process: ``python -m streamproc.bench.sink SPEC_JSON``; prints ``ready`` once
the consumer reads, writes the result to ``spec.result_path`` when stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson

from streamproc.bench import _hist
from streamproc.bench.events import GROUP, REGISTRY, BenchEvent
from streamproc.bench.loadgen import WARMUP_KEY
from streamproc.codec import Codec
from streamproc.concern import Concern, Context
from streamproc.connection import connect
from streamproc.consumer import Consumer, Outcome, Settled
from streamproc.keys import Keys
from streamproc.offload import Job, LoopLagMonitor, OffloadSettings, RenderPool, WorkerContext
from streamproc.producer import Producer
from streamproc.settings import ConsumerSettings, ProducerSettings, RedisSettings

__all__ = ("GROUP", "SinkSpec", "burn_cpu", "run_sink")


class SinkSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    redis_url: str
    prefix: str
    result_path: str
    consumer: str = "c1"
    batch: int = 100
    concurrency: int = 10
    max_in_flight: int = 256
    dedup_window_ms: int = 86_400_000
    trim_interval_ms: int = 30_000
    #: Every ``render_every``-th event (by index) runs ``render_ms`` of CPU in the render pool.
    render_every: int = 0
    render_ms: float = 20.0
    render_workers: int = 1


def burn_cpu(payload: bytes, ctx: WorkerContext) -> bytes:
    """A render stand-in: spin the CPU for ``payload`` milliseconds (in a pool worker)."""
    end = time.perf_counter() + float(payload) / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return str(n).encode()


class _Recorder:
    def __init__(self) -> None:
        self.start, self.ack = _hist.new_histogram(), _hist.new_histogram()
        self.start_from_send = _hist.new_histogram()
        self.pending: dict[str, float] = {}
        self.handled = self.handled_warmup = self.acked = self.renders = 0
        self.first_start_s = 0.0
        self.last_ack_s = 0.0

    def settled(self, outcomes: Sequence[Outcome]) -> None:
        """The consumer's ``after_settle`` hook: a batch was settled."""
        now = time.time()
        for o in outcomes:
            intended = self.pending.pop(o.entry.entry_id.decode(), None)
            if intended is not None and o.status is Settled.ACKED:
                _hist.record_s(self.ack, now - intended)
                self.acked += 1
                self.last_ack_s = now


async def run_sink(spec: SinkSpec, ready: asyncio.Event, stop: asyncio.Event) -> dict[str, Any]:
    rec = _Recorder()
    pool: RenderPool | None = None
    if spec.render_every:
        pool = await RenderPool(
            OffloadSettings(cpu_workers=spec.render_workers, gpus=(), max_tasks_per_child=0)
        ).start()
    render_ms = str(spec.render_ms).encode()

    async def handle(event: BenchEvent, ctx: Context) -> None:
        now = time.time()
        if event.key == WARMUP_KEY:
            rec.handled_warmup += 1
            return
        intended = event.occurred_at.timestamp()
        _hist.record_s(rec.start, now - intended)
        if event.sent_at:
            _hist.record_s(rec.start_from_send, now - event.sent_at)
        if not rec.first_start_s:
            rec.first_start_s = now
        rec.handled += 1
        if pool is not None and event.seq % spec.render_every == 0:
            await pool.run(Job(fn=burn_cpu, payload=render_ms, job_id=event.id, kind="bench"))
            rec.renders += 1
        rec.pending[ctx.entry_id] = intended

    client = connect(RedisSettings(url=spec.redis_url, key_prefix=spec.prefix))
    codec: Codec[Any] = Codec(REGISTRY)
    keys = Keys(spec.prefix)
    consumer = Consumer(
        Concern(
            group=GROUP,
            topics=(BenchEvent.topic,),
            handlers={BenchEvent: handle},
            concurrency=spec.concurrency,
        ),
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys, ProducerSettings()),
        settings=ConsumerSettings(
            consumer=spec.consumer,
            batch=spec.batch,
            max_in_flight=spec.max_in_flight,
            dedup_window_ms=spec.dedup_window_ms,
            trim_interval_ms=spec.trim_interval_ms,
        ),
        after_settle=rec.settled,
    )
    lag = LoopLagMonitor(interval_s=0.01)
    lag_task = asyncio.create_task(lag.run())
    run = asyncio.create_task(consumer.run(started=ready))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([run, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    consumer.stop()
    await run  # a consumer that failed on its own raises here: the process exits non-zero
    lag_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await lag_task
    if pool is not None:
        await pool.close()
    await client.aclose()
    return {
        "consumer": spec.consumer,
        "handled": rec.handled,
        "handled_warmup": rec.handled_warmup,
        "acked": rec.acked,
        "renders": rec.renders,
        "first_start_s": rec.first_start_s,
        "last_ack_s": rec.last_ack_s,
        "start": _hist.encode(rec.start),
        "start_from_send": _hist.encode(rec.start_from_send),
        "ack": _hist.encode(rec.ack),
        "loop_lag_p99_ms": lag.percentile_s(99) * 1000,
        "loop_lag_max_ms": max(lag.samples_s, default=0.0) * 1000,
        "stats": consumer.stats.as_dict(),
    }


async def _main(spec: SinkSpec) -> dict[str, Any]:
    ready, stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def announce() -> None:
        await ready.wait()
        print("ready", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        return await run_sink(spec, ready, stop)
    finally:
        announcer.cancel()


def main(argv: list[str]) -> int:
    from streamproc.cli import run_async
    from streamproc.logs import configure_logging

    configure_logging("warning", json=True)
    spec = msgspec.json.decode(argv[0], type=SinkSpec)
    result = run_async(_main(spec))  # uvloop, as `streamproc consume` runs
    Path(spec.result_path).write_bytes(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
