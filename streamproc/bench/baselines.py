"""Baselines measured in the same run: the ceiling and a bare client loop.

- ``redis-benchmark`` XADD on the same Redis (1 and 32 requests per pipeline, 50 clients):
  what the server itself takes. Skipped, with a note, when the binary is absent.
- The bare redis-py loops of ``benchmarks/throughput.py`` (pipelined XADD and
  XREADGROUP → msgspec decode → XACK, batch 100): shared, not copied.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import uuid
from typing import Any
from urllib.parse import urlparse

__all__ = ("bare_loop", "redis_benchmark")


def redis_benchmark(redis_url: str, events: int) -> dict[str, Any]:
    exe = shutil.which("redis-benchmark")
    if not exe:
        return {"skipped": "redis-benchmark not on PATH (Debian: apt-get install redis-tools)"}
    u = urlparse(redis_url)
    key = f"bench{uuid.uuid4().hex[:8]}:redis-benchmark"
    out: dict[str, Any] = {}
    try:
        for pipeline in (1, 32):
            args = [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379)]
            if u.password:
                args += ["-a", u.password]
            args += ["-n", str(events), "-c", "50", "-P", str(pipeline), "--csv"]
            args += ["XADD", key, "MAXLEN", "~", "100000", "*", "f", "v"]
            proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
            rows = list(csv.reader(io.StringIO(proc.stdout)))
            if proc.returncode or len(rows) < 2:
                return {"skipped": f"redis-benchmark failed: {proc.stderr.strip()[:200]}"}
            out[f"xadd_p{pipeline}_per_s"] = float(rows[1][1])
    finally:
        subprocess.run(
            [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-n", "1"]
            + (["-a", u.password] if u.password else [])
            + ["DEL", key],
            capture_output=True,
            check=False,
        )
    return out


async def bare_loop(redis_url: str, events: int) -> dict[str, Any]:
    """Bare pipelined XADD and the bare drain loop, each in its own process (batch 100)."""
    try:
        from benchmarks import throughput
    except ImportError:
        return {"skipped": "benchmarks/throughput.py not importable (run from the repository)"}
    return {"batch": throughput.BATCH, **await throughput.bare_loops(redis_url, events)}
