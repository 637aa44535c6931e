"""`streamproc bench` on the CI SLO file: real Redis, real processes, no timing asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from streamproc.bench.events import REGISTRY, BenchEvent
from streamproc.bench.loadgen import LoadSpec, run_load
from streamproc.bench.slo import Burst, Steady, load_slo
from streamproc.codec import Codec
from streamproc.errors import ConfigError
from streamproc.keys import Keys

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # benchmark scripts: timed subprocesses


def _bench(repo_root: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "STREAMPROC_LOG_LEVEL": "warning"}
    return subprocess.run(
        [sys.executable, "-m", "streamproc", "bench", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_ci_slo_file_runs_accounts_for_every_event_and_writes_json_and_plots(
    repo_root: Path, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = _bench(repo_root, redis_url, "--slo", "benchmarks/slo-ci.toml", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| steady-ci | producer |" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert {s["name"] for s in results["scenarios"]} == {"steady-ci", "http-ci", "burst-ci"}
    for sc in results["scenarios"]:
        assert sc["verdict"] == "pass"
        for run in sc["runs"]:
            assert run["lost"] == 0
            assert run["acked"] == run["offered"] == run["latency_start"]["count"] > 0
            assert run["latency_ack"]["count"] == run["offered"]
            assert run["cpu_s"]["consumer0"] > 0
    assert results["baselines"]["bare"]["drain_per_s"] > 0
    assert (out / "latency-percentiles.png").stat().st_size > 0
    assert (out / "rate.png").stat().st_size > 0


def test_an_impossible_slo_makes_the_exit_code_non_zero(
    repo_root: Path, redis_url: str, tmp_path: Path
) -> None:
    slo = tmp_path / "impossible.toml"
    slo.write_text(
        'baseline_events = 0\n[[scenario]]\nname = "impossible"\nkind = "steady"\n'
        "rate_per_s = 200\nduration_s = 0.5\nwarmup_s = 0\nslo = { p99_ms = 0.0001 }\n"
    )
    r = _bench(repo_root, redis_url, "--slo", str(slo), "--out", str(tmp_path), "--no-plots")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SLO breached: impossible" in r.stdout


def test_the_slo_files_parse_and_unknown_keys_are_refused(repo_root: Path, tmp_path: Path) -> None:
    full = load_slo(repo_root / "benchmarks/slo.toml")
    steady = {s.name: s for s in full.scenario if isinstance(s, Steady)}
    assert any(s.slo.p99_ms == 2.0 and s.rate_per_s == 1000 for s in steady.values())
    assert any(isinstance(s, Burst) and s.events == 100_000 for s in full.scenario)
    load_slo(repo_root / "benchmarks/slo-ci.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[scenario]]\nname = "x"\nkind = "steady"\nrate_per_s = 1\nduration_s = 1\nrte = 2\n'
    )
    with pytest.raises(ConfigError, match="rte"):
        load_slo(bad)


def test_the_throughput_script_runs_every_phase_and_checks_every_event(
    repo_root: Path, redis_url: str, tmp_path: Path
) -> None:
    """A smoke run of benchmarks/throughput.py: every phase accounts for all its events (the
    script exits non-zero otherwise) and the table has a verdict for each target."""
    out = tmp_path / "throughput.json"
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/throughput.py",
            "--events",
            "2000",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        cwd=repo_root,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for label in (
        "| Consumer, dedup off, 1 process |",
        "| Consumer, dedup off, 2 processes |",
        "| **Redis CPU per event**",
    ):
        assert label in r.stdout
    phases = json.loads(out.read_text())["phases"]
    assert {"bare-1", "engine-off-1", "engine-on-1", "bare-2", "engine-off-2"} <= set(phases)
    for rounds in phases.values():
        assert rounds[0]["events_per_s"] > 0
        assert rounds[0]["cpu_us"] > 0


async def test_the_load_generator_sends_nothing_before_its_intended_time_and_stamps_sent_at(
    redis_url: str, client: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """A burst is due at its start: no event reaches Redis before its intended time (the
    entry id's milliseconds, Redis' clock on this host), and each carries the time it was
    handed to the publish call, at or after that intended time."""
    spec = LoadSpec(
        redis_url=redis_url,
        prefix=keys.prefix,
        result_path=str(tmp_path / "load.json"),
        rate_per_s=0,
        events=300,
        batch=50,
    )
    result = await run_load(spec)
    assert result["sent"] == result["offered"] == 300
    rows: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(  # type: ignore[assignment]
        keys.stream(BenchEvent.topic)
    )
    assert len(rows) == 300
    codec = Codec(REGISTRY)
    for entry_id, fields in rows:
        event = codec.decode(fields)
        assert isinstance(event, BenchEvent)
        intended_s = event.occurred_at.timestamp()
        assert int(entry_id.split(b"-")[0]) >= int(intended_s * 1000)
        assert event.sent_at >= intended_s
