"""Dedup cost in Redis instructions per event (callgrind): dedup on vs off, two trees (issue 20).

    .venv/bin/python benchmarks/dedup_instructions.py --before 29211fa [--events 5000]
        [--window-ms 20000] [--json out.json] [--redis-server PATH --top 30]

Why. ``benchmarks/dedup_cost.py`` measures Redis CPU time, the figure the issue's target is
written in; on this shared 2-vCPU VM the same code's on/off ratio moves by ±0.06 between runs
(cache and CPU contention), more than the difference being judged. Instructions executed are
deterministic: the same code gives the same count to ~1 % whatever else runs. They are not CPU
time (a cache miss costs no instructions), so both figures are reported, each for what it is.

How. Per tree (as in dedup_cost.py: ``--before REV`` a worktree in /tmp/sp-before, ``--before
PATH`` a folder, "after" this tree or ``--after PATH``) and dedup off/on, a child with
``PYTHONPATH=<tree>`` runs redis-server under ``valgrind --tool=callgrind`` (Debian's valgrind)
and the bulk steps of dedup_cost.py with its ``_Child``: 500 events warm-up; at the start of a
generation of the window, N published and drained (the prefill: the records of one generation,
which sizes the next); then at the start of the next generation (``MINTED_SKEW_MS`` = 0: what a
24 h window does after its first minute), N events published, counted (``callgrind_control -z``
/ ``-d``), then drained by a new consumer, counted. Each step must end in the generation it
began in, or the run fails (the counts would depend on where the boundary fell: raise
``--window-ms``). The child's drain check polls every 0.5 s (not 5 ms): polls are counted too.
Every effect must be applied once or the run fails. Redis runs ~50x slower under callgrind:
N = 5,000 takes ~2 min a variant with the 60 s window (most of it waiting for generations).

Where the instructions go. ``--top N`` prints, per tree, the N functions whose instructions per
published event differ most between dedup on and off (exclusive counts of the publish step, by
``callgrind_annotate``). Debian's redis-server has no symbols (all of it is "???"): give a build
that has them with ``--redis-server PATH``, e.g. the 7.0.15 source tarball built with
``make OPTIMIZATION=-O2`` (~2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 500
BATCH = 500


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _summary(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no summary line in {path}")


def _child(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    import streamproc.producer as producer_module

    if hasattr(producer_module, "MINTED_SKEW_MS"):
        producer_module.MINTED_SKEW_MS = 0
    port = _free_port()
    vg = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}/cg.%p",
            spec.get("redis_server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    try:
        module, applied, expected = asyncio.run(_measure(spec, port, vg.pid))
    finally:
        vg.terminate()
        vg.wait()
    if applied != expected:
        raise SystemExit(f"effects applied {applied} times for {expected} events")
    dumps = sorted(out.glob("cg.*.*"), key=lambda p: int(p.suffix[1:]))
    publish, drained = (_summary(p) for p in dumps[:2])
    n = int(spec["events"])
    return {
        "streamproc": module,
        "publish": publish / n,
        "drain": drained / n,
        "total": (publish + drained) / n,
        "functions": _functions(dumps[0]) if spec.get("top") else {},
    }


def _functions(dump: Path) -> dict[str, int]:
    """Exclusive instructions per function in one callgrind dump (``callgrind_annotate``)."""
    text = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", "--inclusive=no", str(dump)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[str, int] = {}
    rows = text.split("file:function", 1)[-1].splitlines()
    for row in rows:
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)", row)
        if m:  # "<file>:<function> [<object>]": the function's name alone
            name = m.group(2).split(" [")[0].rsplit(":", 1)[-1]
            found[name] = found.get(name, 0) + int(m.group(1).replace(",", ""))
    return found


async def _measure(spec: dict[str, Any], port: int, pid: int) -> tuple[str, int, int]:
    """The bulk steps against the redis-server under callgrind: (streamproc's path, effects
    applied, events published)."""
    import redis.asyncio as aioredis

    from benchmarks.dedup_cost import _Child

    def ctl(arg: str) -> None:
        subprocess.run(["callgrind_control", arg, str(pid)], capture_output=True, check=True)

    probe = aioredis.Redis(port=port)
    for _ in range(200):
        try:
            await probe.ping()
            break
        except OSError:
            await asyncio.sleep(0.2)
    await probe.aclose()
    ch = _Child({**spec, "url": f"redis://127.0.0.1:{port}/0", "mode": "bulk"})
    n, window = int(spec["events"]), int(spec["window_ms"])

    async def drain(name: str, total: int) -> None:
        c = ch.consumer(name)
        run = asyncio.create_task(c.run())
        while True:
            groups: Any = await ch.raw.xinfo_groups(ch.stream)
            g = next(x for x in groups if x["name"] == b"g")
            if g["entries-read"] == total and g["lag"] == 0 and g["pending"] == 0:
                break
            await asyncio.sleep(0.5)
        c.stop()
        await run

    async def now_gen() -> int:
        t: Any = await ch.raw.time()
        return int((t[0] * 1000 + t[1] // 1000) // window)

    async def next_gen() -> int:
        gen = await now_gen()
        while await now_gen() <= gen:  # noqa: ASYNC110 - Redis' clock
            await asyncio.sleep(0.1)
        return gen + 1

    def same(gen: int, now: int, what: str) -> None:
        if now != gen:  # the counts would hold a rotation or a half-full generation
            raise SystemExit(f"{what} crossed a generation: raise --window-ms")

    await ch.create_group()
    await ch.publish(ch.events(WARMUP, 0), BATCH)
    await drain("warmup", WARMUP)
    # the prefill fills one whole generation, the measure runs in the next one, alone
    gen = await next_gen()
    await ch.publish(ch.events(n, WARMUP), BATCH)
    await drain("prefill", WARMUP + n)
    same(gen, await now_gen(), "the prefill")
    gen = await next_gen()
    done = WARMUP + n
    events = ch.events(n, done)
    ctl("-z")
    await ch.publish(events, BATCH)
    ctl("-d")
    same(gen, await now_gen(), "the measured publish")
    await drain("c1", done + n)
    ctl("-d")
    applied = await ch.applied()
    await ch.close()
    return ch.module, applied, done + n


def run_child(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dedup-instr-") as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(tree),
            "STREAMPROC_LOG_LEVEL": os.environ.get("STREAMPROC_LOG_LEVEL", "warning"),
        }
        p = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps({**spec, "out": tmp})],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
    if p.returncode:
        raise SystemExit(f"variant {spec} failed ({p.returncode})")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    if not Path(result["streamproc"]).is_relative_to(tree):
        raise SystemExit(f"the child imported {result['streamproc']}, not {tree}'s streamproc")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="git revision (a worktree in /tmp/sp-before) or a folder")
    p.add_argument("--after", type=Path, default=ROOT, help="the tree to compare (default: here)")
    p.add_argument("--keep-worktree", action="store_true")
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--window-ms", type=int, default=60_000)
    p.add_argument("--json", type=Path)
    p.add_argument("--redis-server", help="the redis-server to run (default: the one on PATH)")
    p.add_argument("--top", type=int, default=0, help="print the N functions on - off differ most")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.append(str(ROOT))  # benchmarks.dedup_cost; the tree's streamproc comes first
        spec = json.loads(a.child)
        print(json.dumps(_child(spec, Path(spec["out"]))), flush=True)
        return
    if a.events < 1 or a.window_ms < 1000 or a.top < 0:
        p.error("--events must be >= 1, --window-ms >= 1000 and --top >= 0")
    if a.redis_server and not os.access(a.redis_server, os.X_OK):
        p.error(f"--redis-server {a.redis_server}: not an executable file")
    from benchmarks.dedup_cost import WORKTREE, before_tree, git, machine

    trees: list[tuple[str, Path]] = []
    created = False
    if a.before:
        path, label, created = before_tree(a.before, a.keep_worktree)
        trees.append((label, path))
    trees.append(("after", a.after.resolve()))
    print(f"# dedup instructions (callgrind) — {machine()}")
    for label, tree in trees:
        head = git("log", "-1", "--format=%h %s", cwd=tree)[:100]
        print(f"# {label}: {tree} — {head}")
    print(f"# {a.events:,} events per variant, batches of {BATCH}, window {a.window_ms:,} ms")
    results: dict[str, dict[str, Any]] = {}
    try:
        for label, tree in trees:
            for dedup in (False, True):
                spec = {
                    "events": a.events,
                    "window_ms": a.window_ms,
                    "dedup": dedup,
                    "redis_server": a.redis_server,
                    "top": a.top,
                }
                name = f"{label} dedup {'on' if dedup else 'off'}"
                results[name] = run_child(tree, spec)
                r = results[name]
                print(f"  {name}: {r['publish']:,.0f} + {r['drain']:,.0f} instr/event", flush=True)
    finally:
        if created:
            git("worktree", "remove", "--force", str(WORKTREE))
    print("\n| tree | dedup | publish | drain | total (Redis instructions per event) |")
    print("|---|---|---:|---:|---:|")
    for name, r in results.items():
        label, setting = name.rsplit(" dedup ", 1)
        print(
            f"| {label} | {setting} | {r['publish']:,.0f} | {r['drain']:,.0f} | {r['total']:,.0f} |"
        )
    print("\n| tree | total on/off | publish on - off |")
    print("|---|---:|---:|")
    ratios: dict[str, float] = {}
    for label, _ in trees:
        r_off, r_on = results[f"{label} dedup off"], results[f"{label} dedup on"]
        ratios[label] = r_on["total"] / r_off["total"]
        print(f"| {label} | {ratios[label]:.3f} | {r_on['publish'] - r_off['publish']:,.0f} |")
    if a.top:
        for label, _ in trees:
            off, on = results[f"{label} dedup off"], results[f"{label} dedup on"]
            names = set(off["functions"]) | set(on["functions"])
            diff = {
                f: (on["functions"].get(f, 0) - off["functions"].get(f, 0)) / a.events
                for f in names
            }
            print(
                f"\n{label}: the {a.top} functions differing most, on - off, instructions per event"
            )
            for f, d in sorted(diff.items(), key=lambda x: -abs(x[1]))[: a.top]:
                print(f"  {d:+9,.0f}  {f}")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "variants": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
