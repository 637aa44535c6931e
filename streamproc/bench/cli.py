"""``streamproc bench``: run the SLO file's scenarios, print the table, write JSON and plots.

Exit codes: 0 every SLO met, 1 an SLO breached (or a scenario failed), 2 bad arguments or SLO
file, 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import orjson

from streamproc.config import Config

__all__ = ("register",)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="latency-SLO benchmark: open-loop load, HdrHistogram latencies, verdicts",
        description=__doc__.split("\n")[0] if __doc__ else None,
    )
    p.add_argument("--slo", type=Path, default=Path("benchmarks/slo.toml"), help="SLO file")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run this scenario")
    p.add_argument("--no-baselines", action="store_true", help="skip redis-benchmark/bare loop")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared')")
    p.set_defaults(func=_cmd_bench)


def _machine(note: str) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "note": note,
    }


def _cmd_bench(args: argparse.Namespace, cfg: Config, app: Any) -> int:
    from streamproc.bench import report
    from streamproc.bench.slo import load_slo
    from streamproc.cli import run_async
    from streamproc.embedded import EmbeddedRedis

    slo = load_slo(args.slo, only=tuple(args.only))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sp-bench-"))
    server: EmbeddedRedis | None = None
    url = cfg.redis.url
    try:
        if not cfg.redis_url_given:
            # No AOF, like benchmarks/throughput.py: the figures are the engine's, not the disk's.
            server = EmbeddedRedis(work / "redis", appendonly=False).start()
            url = server.url
        cfg = msgspec.structs.replace(cfg, redis=msgspec.structs.replace(cfg.redis, url=url))
        redis_pid = server.proc.pid if server is not None and server.proc else None
        results, baselines, redis_version, failed = run_async(
            _bench(cfg, slo, work, redis_pid, args)
        )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    machine = _machine(args.note) | {
        "redis": redis_version,
        "redis_url": "embedded" if server else "REDIS_URL",
    }
    ratios = _ratios(results, baselines)
    print()
    print(
        f"# streamproc bench — {machine['date']}, {machine['host']}, {machine['cpus']} CPUs "
        f"({machine['cpu_model']}), Python {machine['python']}, Redis {machine['redis']}"
        + (f" — {args.note}" if args.note else "")
    )
    print(report.table(results))
    print()
    print(report.checks_text(results))
    if baselines:
        print()
        summary = {"baselines": baselines, "ratios": ratios}
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    (out / "results.json").write_bytes(
        orjson.dumps(
            {
                "machine": machine,
                "slo_file": str(args.slo),
                "baselines": baselines,
                "ratios": ratios,
                "scenarios": results,
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    written = [] if args.no_plots else report.plot(results, out)
    print(f"\nwrote {out / 'results.json'}" + "".join(f", {p}" for p in written))
    breached = failed or any(sc["verdict"] != "pass" for sc in results)
    if breached:
        print("SLO breached: " + ", ".join(sc["name"] for sc in results if sc["verdict"] != "pass"))
    return 1 if breached else 0


async def _bench(
    cfg: Config, slo: Any, work: Path, redis_pid: int | None, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any], str, bool]:
    from streamproc.bench import baselines as bl
    from streamproc.bench.runner import BenchError, Run
    from streamproc.bench.scenarios import run_scenario
    from streamproc.cli import open_redis

    url = cfg.redis.url
    client, info = await open_redis(cfg, wait_s=10)
    results: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    failed = False
    try:
        if slo.baseline_events and not args.no_baselines:
            n = slo.baseline_events
            print(f"baselines: redis-benchmark XADD, bare redis-py loops, {n:,} events", flush=True)
            baselines["redis_benchmark"] = await asyncio.to_thread(bl.redis_benchmark, url, n)
            baselines["bare"] = await bl.bare_loop(url, n)
        proto = Run(redis_url=url, work_dir=work, redis_pid=redis_pid)
        for sc in slo.scenario:
            print(f"scenario {sc.name} ({type(sc).__name__.lower()}, via {sc.via}) …", flush=True)
            try:
                results.append(await run_scenario(sc, proto, client, baselines))
            except BenchError as e:
                print(f"  failed: {e}", flush=True)
                failed = True
                results.append(
                    {
                        "name": sc.name,
                        "kind": "error",
                        "via": sc.via,
                        "rows": [],
                        "runs": [],
                        "checks": [],
                        "verdict": "ERROR",
                        "error": str(e),
                    }
                )
    finally:
        await client.aclose()
    return results, baselines, info.version_text, failed


def _ratios(results: list[dict[str, Any]], baselines: dict[str, Any]) -> dict[str, float]:
    """Our figures against the baselines (only those both sides of which were measured)."""
    out: dict[str, float] = {}
    bare = baselines.get("bare", {})
    rb = baselines.get("redis_benchmark", {})
    for sc in results:
        if sc["kind"] in ("burst", "scaling") and sc["runs"]:
            first = sc["runs"][0]
            if bare.get("drain_per_s"):
                out[f"{sc['name']}: drain / bare drain loop"] = (
                    first["throughput_per_s"] / bare["drain_per_s"]
                )
            if bare.get("xadd_per_s"):
                out[f"{sc['name']}: publish_many / bare pipelined XADD"] = (
                    first["publish_per_s"] / bare["xadd_per_s"]
                )
            if rb.get("xadd_p32_per_s"):
                out[f"{sc['name']}: publish_many / redis-benchmark XADD -P 32"] = (
                    first["publish_per_s"] / rb["xadd_p32_per_s"]
                )
    return out
