"""Media transcode: throughput per codec by hand vs through the task runner (issue 15).

    .venv/bin/python benchmarks/media_transcode.py [--seconds 10] [--codecs h264,h265,vp9,av1]
        [--repeat 1] [--lag-codec h264] [--json FILE]

Targets (issue 15): the queue's overhead on a transcode < 5 % (seconds of video per second of
wall time through the task runner vs ``ffmpeg`` run by hand with the same settings), and the
consumer's event-loop lag p99 < 10 ms while 2 transcodes run at once.

Steps:

1. A source of ``--seconds`` of 1080p (lavfi ``testsrc2`` 1920x1080, 25 fps, a 440 Hz sine;
   H.264 CRF 16 + AAC in MP4) in a local media store in a temp folder.
2. The real task runner in this process: ``Consumer(task_concern(media.TASK_TYPES))``
   running ``Consumer.run()`` on an embedded redis-server (no AOF; or REDIS_URL), as the
   application's ``tasks`` group does. Software encoders (``MediaSettings(gpus=())``): this
   measures the CPU encoders, NVENC is not part of it.
3. Per codec in its usual container (h264 and h265 in MP4, vp9 and av1 in WebM) with the
   job's defaults (speed ``medium``, the codec's default CRF, audio kept), ``--repeat`` pairs:
   (a) **by hand**: ``nice -n 3 ffmpeg ...`` as a subprocess with the command line the job
   runs (built below from ``media.transcode.encoder_args`` and the job's other options), wall
   time of the process; (b) **task**: the same payload as a ``media.transcode`` task (checked
   against the type's payload struct, ``TaskStore.create`` + publish of the request, as
   ``POST /v1/tasks`` does), wall time from submission to the runner's settle of the
   completed task (the concern's ``after_settle`` hook). The pairs alternate which goes first
   (ABBA), and the job's ffmpeg command line (read from the process table while it runs) must
   equal the hand-run one but for the output path, or the run fails.
   Overhead = task wall / by-hand wall - 1 (medians over the repeats).
4. Event-loop lag: a sampler in the runner's event loop sleeps 10 ms in a loop and records how
   late it wakes: 3 s with the runner idle, then while 2 ``--lag-codec`` transcodes of the
   source run at once (the type's concurrency is 2); p50/p99/max.

uvloop, as the ``streamproc`` CLI runs consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs in the dev group
import uvloop

import media
from media.ffmpeg import encoders
from media.jobs import QUEUES, nice_of
from media.runtime import MediaSettings, use_settings
from media.transcode import SOFTWARE, TranscodeRequest, canonical_codec, encoder_args
from schemas import REGISTRY
from streamproc import (
    Codec,
    Consumer,
    ConsumerSettings,
    Keys,
    Producer,
    ProducerSettings,
    RedisSettings,
    connect,
)
from streamproc.consumer.outcomes import Outcome
from streamproc.embedded import EmbeddedRedis
from streamproc.logs import configure_logging
from streamproc.tasks import TaskStore, TaskView, task_concern, task_event_class

#: Each codec into its usual container.
CONTAINER = {"h264": "mp4", "h265": "mp4", "vp9": "webm", "av1": "webm"}
#: ffmpeg's muxer per container (as the job names them).
MUXER = {"mp4": "mp4", "webm": "webm", "mkv": "matroska"}
SOURCE_KEY = "uploads/bench-1080p.mp4"
LAG_PERIOD_S = 0.010


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def make_source(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=25:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "16", "-pix_fmt", "yuv420p",
            "-g", "50", "-c:a", "aac", "-b:a", "192k", "-shortest", str(path),
        ],
        check=True,
    )  # fmt: skip


def job_command(
    src: Path, out: Path, codec: str, encoder: str, req: TranscodeRequest, ffmpeg: str
) -> list[str]:
    """The command line ``media.transcode`` runs for ``req`` on a software encoder.

    ``encoder_args`` is the job's own builder; the other options are written inline in
    ``media.transcode.transcode`` and ``media.ffmpeg.run_ffmpeg`` (no builder to call), so they
    are repeated here, and ``run_codec`` fails when the job's real command line differs.
    """
    args = ["-i", str(src), "-map", "0:v:0", "-pix_fmt", "yuv420p"]
    args += encoder_args(encoder, codec, req)
    if codec == "hevc" and req.container == "mp4":
        args += ["-tag:v", "hvc1"]
    acodec = "libopus" if req.container == "webm" else "aac"
    args += ["-map", "0:a:0", "-c:a", acodec, "-b:a", f"{req.audio_bitrate_kbps}k"]
    args += ["-sn", "-dn", "-f", MUXER[req.container]]
    if req.container == "mp4":
        args += ["-movflags", "+faststart"]
    nice = ["nice", "-n", str(nice_of(QUEUES["media.transcode"].priority))]
    prefix = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "warning"]
    return [*nice, *prefix, "-progress", "pipe:1", "-y", *args, str(out)]


def cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its reaped children so far."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def ffmpeg_cmdlines() -> list[list[str]]:
    """Command lines of this process's running ffmpeg children (the job's encode)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and Path(cmd[0]).name == "ffmpeg" and "-progress" in cmd:
            found.append(cmd)
    return found


class Bench:
    def __init__(self, args: argparse.Namespace, client: Any, keys: Keys, root: Path) -> None:
        self.args, self.client, self.keys, self.root = args, client, keys, root
        codec: Codec[Any] = Codec(REGISTRY)
        self.producer = Producer(client, codec, keys, ProducerSettings())
        self.store = TaskStore(client, keys)
        self.settled = asyncio.Event()
        self.runner = Consumer(
            task_concern(media.TASK_TYPES),
            client=client,
            codec=codec,
            keys=keys,
            producer=self.producer,
            settings=ConsumerSettings(consumer="media-bench"),
            after_settle=self._after_settle,
        )
        #: Submission to the runner's start of each task (from the hash's ms stamps).
        self.pickup_s: list[float] = []
        #: CPU seconds of each task leg: (the job's children, this process).
        self.task_cpu: list[tuple[float, float]] = []
        self.lag_s: list[float] | None = None  # the sampler records while this is a list

    def _after_settle(self, done: Sequence[Outcome]) -> None:
        self.settled.set()

    async def sample_lag(self) -> None:
        """In the runner's loop: sleep 10 ms, record how late the wake-up was."""
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(LAG_PERIOD_S)
            if self.lag_s is not None:
                self.lag_s.append(time.perf_counter() - t0 - LAG_PERIOD_S)

    async def submit(self, payload: dict[str, Any]) -> str:
        """What ``TaskApi.create`` does: validate, store the task, publish its request."""
        tt = media.TASK_TYPES["media.transcode"]
        checked = msgspec.to_builtins(msgspec.convert(payload, tt.payload_type))
        task_id = f"bench-{uuid.uuid4().hex[:12]}"
        created = await self.store.create(
            task_id, type=tt.name, priority="normal", submitted_by="bench"
        )
        if not created:
            raise RuntimeError(f"task {task_id} exists")
        event = task_event_class("normal")(
            id=task_id, key=tt.name, task_type=tt.name, payload=checked, priority="normal"
        )
        await self.producer.publish(event)
        return task_id

    async def wait_done(self, ids: Sequence[str]) -> dict[str, tuple[float, TaskView]]:
        """Each task's view and the time (perf_counter) its settle was seen, once all ended."""
        ended: dict[str, tuple[float, TaskView]] = {}
        while len(ended) < len(ids):
            await self.settled.wait()
            self.settled.clear()
            now = time.perf_counter()
            for task_id in ids:
                view = await self.store.get(task_id)
                if task_id not in ended and view and view.status not in ("queued", "running"):
                    ended[task_id] = (now, view)
        for task_id, (_, view) in ended.items():
            if view.status != "completed":
                raise RuntimeError(f"task {task_id} ended {view.status}: {view.error}")
        return ended

    async def by_hand(self, cmd: list[str]) -> tuple[float, float]:
        """Wall time and ffmpeg's CPU time of one run."""
        t0, (_, kids0) = time.perf_counter(), cpu_s()
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, check=False)
        wall, (_, kids1) = time.perf_counter() - t0, cpu_s()
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace")[-2000:]
            raise RuntimeError(f"ffmpeg by hand exited {done.returncode}: {tail}")
        return wall, kids1 - kids0

    async def as_task(self, payload: dict[str, Any]) -> tuple[float, TaskView, list[list[str]]]:
        seen: list[list[str]] = []

        async def watch() -> None:
            while True:
                for cmd in await asyncio.to_thread(ffmpeg_cmdlines):
                    if cmd not in seen:
                        seen.append(cmd)
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        t0, submitted, (me0, kids0) = time.perf_counter(), time.time(), cpu_s()
        try:
            task_id = await self.submit(payload)
            [(t1, view)] = (await self.wait_done([task_id])).values()
        finally:
            watcher.cancel()
        me1, kids1 = cpu_s()
        self.pickup_s.append(_iso_s(view.started_at or "") - submitted)
        # the job's ffprobe and ffmpeg runs; this process (runner, sampler, watcher) apart
        self.task_cpu.append((kids1 - kids0, me1 - me0))
        return t1 - t0, view, seen

    async def run_codec(self, name: str, src: Path, available: frozenset[str]) -> dict[str, Any]:
        codec = canonical_codec(name)
        encoder = next(e for e in SOFTWARE[codec] if e in available)
        payload = {"source": SOURCE_KEY, "codec": name, "container": CONTAINER[name]}
        req = msgspec.convert(payload, TranscodeRequest)
        out = self.root / "by-hand" / f"output-{name}.{req.container}"
        out.parent.mkdir(exist_ok=True)
        cmd = job_command(src, out, codec, encoder, req, "ffmpeg")
        hand_s: list[float] = []
        hand_cpu: list[float] = []
        task_s: list[float] = []
        encode_s: list[float] = []
        for i in range(self.args.repeat):
            order = ("hand", "task") if i % 2 == 0 else ("task", "hand")
            for leg in order:
                if leg == "hand":
                    wall_s, child_cpu_s = await self.by_hand(cmd)
                    hand_s.append(wall_s)
                    hand_cpu.append(child_cpu_s)
                    continue
                wall, view, seen = await self.as_task(payload)
                result = view.result
                if result["encoder"] != encoder or result["device"] != "cpu":
                    raise RuntimeError(f"{name}: the job used {result['encoder']}, not {encoder}")
                job_cmd = next((c for c in seen if "-progress" in c), None)
                if job_cmd is None:
                    raise RuntimeError(f"{name}: the job's ffmpeg was not seen running")
                if job_cmd[:-1] != cmd[3:-1]:  # cmd[:3] is `nice -n 3`; [-1] the output
                    raise RuntimeError(
                        f"{name}: the job ran\n  {job_cmd}\nnot the by-hand command\n  {cmd}"
                    )
                task_s.append(wall)
                encode_s.append(float(result["encode_s"]))
            print(
                f"  {name:<5} pair {i + 1}: by hand {hand_s[-1]:.2f} s, task {task_s[-1]:.2f} s"
                f" (its ffmpeg {encode_s[-1]:.2f} s)",
                flush=True,
            )
        video_s = self.args.seconds
        hand, task = statistics.median(hand_s), statistics.median(task_s)
        task_cpu = self.task_cpu[-self.args.repeat :]
        kids_cpu = statistics.median(k for k, _ in task_cpu)
        return {
            "codec": name,
            "container": req.container,
            "encoder": encoder,
            "speed": req.speed,
            "by_hand_s": [round(s, 3) for s in hand_s],
            "task_s": [round(s, 3) for s in task_s],
            "task_encode_s": [round(s, 3) for s in encode_s],
            "by_hand_cpu_s": [round(s, 2) for s in hand_cpu],
            "task_children_cpu_s": [round(k, 2) for k, _ in task_cpu],
            "task_runner_process_cpu_s": [round(m, 2) for _, m in task_cpu],
            "cpu_overhead_pct": round(100 * (kids_cpu / statistics.median(hand_cpu) - 1), 2),
            "by_hand_speed_x": round(video_s / hand, 3),
            "task_speed_x": round(video_s / task, 3),
            "overhead_pct": round(100 * (task / hand - 1), 2),
            # submission to settle, less the job's own ffmpeg run: pickup, probes, copy, Redis
            "task_minus_encode_s": round(task - statistics.median(encode_s), 3),
            "command": " ".join(cmd),
        }

    async def lag(self) -> dict[str, Any]:
        self.lag_s = []
        await asyncio.sleep(3.0)
        idle = self.lag_s
        self.lag_s = []
        codec = self.args.lag_codec
        payload = {"source": SOURCE_KEY, "codec": codec, "container": CONTAINER[codec]}
        t0 = time.perf_counter()
        ids = [await self.submit(payload), await self.submit(payload)]
        ended = await self.wait_done(ids)
        wall = time.perf_counter() - t0
        busy, self.lag_s = self.lag_s, None
        views = [view for _, view in ended.values()]
        starts = [v.started_at or "" for v in views]
        ends = [v.finished_at or "" for v in views]
        overlap_s = _iso_s(min(ends)) - _iso_s(max(starts))
        ms = [x * 1000 for x in busy]
        idle_ms = [x * 1000 for x in idle]
        return {
            "codec": codec,
            "tasks": 2,
            "wall_s": round(wall, 2),
            "both_running_s": round(overlap_s, 2),
            "encode_s": [v.result["encode_s"] for v in views],
            "samples": len(ms),
            "lag_ms_p50": round(pct(ms, 0.50), 2),
            "lag_ms_p99": round(pct(ms, 0.99), 2),
            "lag_ms_max": round(max(ms), 2),
            "idle_samples": len(idle_ms),
            "idle_lag_ms_p50": round(pct(idle_ms, 0.50), 2),
            "idle_lag_ms_p99": round(pct(idle_ms, 0.99), 2),
            "idle_lag_ms_max": round(max(idle_ms), 2),
        }

    async def main(self) -> dict[str, Any]:
        src = self.root / "store" / SOURCE_KEY
        await asyncio.to_thread(make_source, src, self.args.seconds)
        use_settings(
            MediaSettings(store=str(self.root / "store"), work_dir=str(self.root / "w"), gpus=())
        )
        available = await encoders()
        started = asyncio.Event()
        run = asyncio.create_task(self.runner.run(started=started))
        sampler = asyncio.create_task(self.sample_lag())
        await started.wait()
        load_before = os.getloadavg()
        try:
            codecs = [await self.run_codec(c, src, available) for c in self.args.codecs]
            lag = await self.lag()
        finally:
            sampler.cancel()
            self.runner.stop()
            await run
            use_settings(MediaSettings())
        return {
            "source": f"{self.args.seconds:g} s 1920x1080 25 fps testsrc2 + sine, H.264/AAC MP4",
            "cpus": os.cpu_count(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "pickup_ms_max": round(1000 * max(self.pickup_s), 1),
            "codecs": codecs,
            "lag": lag,
        }


def _iso_s(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def bench(url: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(RedisSettings(url=url, key_prefix=keys.prefix))
    try:
        return await Bench(args, client, keys, root).main()
    finally:
        async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            await client.delete(key)
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the source")
    ap.add_argument("--codecs", default="h264,h265,vp9,av1", help="comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="by-hand/task pairs per codec")
    ap.add_argument("--lag-codec", default="h264", choices=sorted(CONTAINER))
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    args.codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = [c for c in args.codecs if c not in CONTAINER]
    if unknown or not args.codecs:
        ap.error(f"--codecs: some of {', '.join(CONTAINER)} (not {unknown})")
    if not 0.5 <= args.seconds <= 600 or args.repeat < 1:
        ap.error("--seconds: 0.5..600; --repeat >= 1")
    configure_logging("warning")
    server = None
    url = os.environ.get("REDIS_URL")
    tmp = tempfile.TemporaryDirectory(prefix="media-bench-")
    root = Path(tmp.name)
    if not url:
        server = EmbeddedRedis(root / "redis", appendonly=False).start()
        url = server.url
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(bench(url, args, root))
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    print(f"source: {out['source']}; cpus {out['cpus']}, load average (1 min) before "
          f"{out['loadavg_1m_before']}, after {out['loadavg_1m_after']}; "
          f"submission to the runner's start: at most {out['pickup_ms_max']} ms")  # fmt: skip
    print(
        f"{'codec':<6}{'container':<10}{'encoder':<12}{'by hand s':>10}{'x':>7}"
        f"{'task s':>9}{'x':>7}{'overhead':>10}{'task - its ffmpeg s':>21}{'CPU overhead':>14}"
    )
    for c in out["codecs"]:
        print(
            f"{c['codec']:<6}{c['container']:<10}{c['encoder']:<12}"
            f"{statistics.median(c['by_hand_s']):>10.2f}{c['by_hand_speed_x']:>7.3f}"
            f"{statistics.median(c['task_s']):>9.2f}{c['task_speed_x']:>7.3f}"
            f"{c['overhead_pct']:>9.1f}%{c['task_minus_encode_s']:>21.2f}"
            f"{c['cpu_overhead_pct']:>13.1f}%"
        )
    lag = out["lag"]
    print(
        f"loop lag, 2 {lag['codec']} transcodes at once ({lag['both_running_s']} s both running,"
        f" {lag['samples']} samples): p50 {lag['lag_ms_p50']} ms, p99 {lag['lag_ms_p99']} ms,"
        f" max {lag['lag_ms_max']} ms; idle: p50 {lag['idle_lag_ms_p50']} ms,"
        f" p99 {lag['idle_lag_ms_p99']} ms, max {lag['idle_lag_ms_max']} ms"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
