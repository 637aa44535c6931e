"""Scenario kinds → load runs → table rows and SLO checks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from streamproc.bench.runner import Run, run_once
from streamproc.bench.slo import Burst, Ramp, RenderMix, Scaling, Scenario, Soak, Steady, Targets

__all__ = ("run_scenario",)


def _base_run(sc: Scenario, proto: Run) -> Run:
    return replace(
        proto,
        via=sc.via,
        event_bytes=sc.event_bytes,
        warmup_s=sc.warmup_s,
        consumers=sc.consumers,
        concurrency=sc.concurrency,
        dedup_window_ms=sc.dedup_window_ms,
        trim_interval_ms=sc.trim_interval_ms,
        batch=sc.batch,
        drain_timeout_s=sc.drain_timeout_s,
    )


def _row(name: str, rate: float | str, res: dict[str, Any]) -> dict[str, Any]:
    lat = res["latency_start"]
    return {
        "scenario": name,
        "rate": rate,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "p999_ms": lat["p999_ms"],
        "max_ms": lat["max_ms"],
        "ack_p99_ms": res["latency_ack"]["p99_ms"],
        "from_send_p99_ms": res["latency_start_from_send"]["p99_ms"],
        "throughput_per_s": res["throughput_per_s"],
    }


def _check(
    checks: list[dict[str, Any]], what: str, measured: float, target: float, ok: bool
) -> None:
    checks.append({"check": what, "measured": measured, "target": target, "ok": ok})


def _latency_checks(
    t: Targets, res: dict[str, Any], rate: float, checks: list[dict[str, Any]]
) -> None:
    lat, ack = res["latency_start"], res["latency_ack"]
    for field, key in (("p50_ms", "p50_ms"), ("p99_ms", "p99_ms"), ("p999_ms", "p999_ms")):
        target = getattr(t, field)
        if target is not None:
            _check(checks, f"{field} <=", lat[key], target, lat[key] <= target)
    if t.ack_p99_ms is not None:
        _check(checks, "ack_p99_ms <=", ack["p99_ms"], t.ack_p99_ms, ack["p99_ms"] <= t.ack_p99_ms)
    if t.min_rate_ratio is not None and rate:
        ratio = res["throughput_per_s"] / rate
        _check(checks, "throughput/rate >=", ratio, t.min_rate_ratio, ratio >= t.min_rate_ratio)


def _accounting(res: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    ok = res["lost"] == 0 and res["send_errors"] == 0 and res["drained"]
    _check(checks, "events lost (offered - acked)", res["lost"] + res["send_errors"], 0, ok)


async def run_scenario(
    sc: Scenario, proto: Run, client: aioredis.Redis, baselines: dict[str, Any]
) -> dict[str, Any]:
    """Run one scenario; return its rows (for the table), runs, checks and verdict."""
    base = _base_run(sc, proto)
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    t = sc.slo
    if isinstance(sc, Steady):  # also Soak and RenderMix
        run = replace(base, rate_per_s=sc.rate_per_s, duration_s=sc.duration_s)
        if isinstance(sc, Soak):
            run = replace(run, sample_every_s=sc.sample_every_s)
        if isinstance(sc, RenderMix):
            run = replace(
                run,
                render_every=sc.render_every,
                render_ms=sc.render_ms,
                render_workers=sc.render_workers,
            )
        res = await run_once(run, client)
        runs.append(res)
        rows.append(_row(sc.name, sc.rate_per_s, res))
        _accounting(res, checks)
        _latency_checks(t, res, sc.rate_per_s, checks)
        if isinstance(sc, Soak):
            extra["growth_pct"] = growth = _soak_growth(res["samples"])
            for field, key in (("max_rss_growth_pct", "rss"), ("max_redis_growth_pct", "redis")):
                target = getattr(t, field)
                if target is not None:
                    _check(checks, f"{key} growth % <=", growth[key], target, growth[key] <= target)
        if isinstance(sc, RenderMix) and t.loop_lag_p99_ms is not None:
            lag = res["loop_lag_p99_ms"]
            _check(checks, "loop lag p99 ms <=", lag, t.loop_lag_p99_ms, lag <= t.loop_lag_p99_ms)
    elif isinstance(sc, Burst):  # also Scaling
        counts = sc.processes if isinstance(sc, Scaling) else (sc.consumers,)
        by_count: dict[int, float] = {}
        for k in counts:
            res = await run_once(
                replace(base, rate_per_s=0.0, events=sc.events, consumers=k), client
            )
            res["consumers"] = k
            runs.append(res)
            label = f"{sc.events} burst" + (f", {k} proc" if isinstance(sc, Scaling) else "")
            rows.append(_row(sc.name, label, res))
            _accounting(res, checks)
            _latency_checks(t, res, 0.0, checks)
            by_count[k] = res["throughput_per_s"]
        drain = baselines.get("bare", {}).get("drain_per_s")
        if drain:
            extra["ratio_to_bare_drain"] = {str(k): v / drain for k, v in by_count.items()}
        if t.min_ratio_to_bare is not None and drain:
            ratio = by_count[counts[0]] / drain
            _check(
                checks,
                "drain/bare loop >=",
                ratio,
                t.min_ratio_to_bare,
                ratio >= t.min_ratio_to_bare,
            )
        if 1 in by_count and 2 in by_count:
            extra["speedup_2"] = by_count[2] / by_count[1]
            if t.min_speedup_2 is not None:
                sp = extra["speedup_2"]
                _check(checks, "2 proc / 1 proc >=", sp, t.min_speedup_2, sp >= t.min_speedup_2)
    elif isinstance(sc, Ramp):
        held = 0.0
        for rate in sc.rates_per_s:
            res = await run_once(replace(base, rate_per_s=rate, duration_s=sc.step_s), client)
            res["rate_per_s"] = rate
            runs.append(res)
            rows.append(_row(sc.name, rate, res))
            kept_up = res["throughput_per_s"] >= 0.95 * rate and res["lost"] == 0
            if res["latency_start"]["p99_ms"] >= sc.saturation_p99_ms or not kept_up:
                break
            held = rate
        extra["saturation_per_s"] = held
        if t.min_saturation_per_s is not None:
            _check(
                checks,
                "saturation rate >=",
                held,
                t.min_saturation_per_s,
                held >= t.min_saturation_per_s,
            )
    verdict = "pass" if all(c["ok"] for c in checks) else "FAIL"
    return {
        "name": sc.name,
        "kind": type(sc).__name__.lower(),
        "via": sc.via,
        "rows": rows,
        "runs": runs,
        "checks": checks,
        "verdict": verdict,
        **extra,
    }


def _soak_growth(samples: list[dict[str, float]]) -> dict[str, float]:
    """Mean of the second half against the first half, in %, for consumer RSS and Redis."""

    def growth(key: str) -> float:
        values = [s[key] for s in samples if key in s]
        if len(values) < 4:
            return 0.0
        half = len(values) // 2
        first, second = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
        return 100.0 * (second - first) / first if first else 0.0

    return {"rss": growth("rss_consumer0"), "redis": growth("redis_used_memory")}
