"""The image's HEALTHCHECK: what healthy means for the role this container runs.

Chosen by the container's environment (docker/docker-compose.yml sets it per service):

- ``STREAMPROC_CHECK_ARGS`` (default ``--redis-only``) go to ``streamproc check --timeout-s 5``:
  Redis reachable with this role's user; a consumer names its groups (``cluster-events
  --http-port 9100``: each exists on its streams, none has work waiting with no live consumer,
  and the process's own ``/readyz`` answers 200); ingest ``--redis-only --http-port 8080``.
- With ``--http-port P`` among them, the role's ``/healthz`` must report an event-loop lag
  (``loop_lag_s``, where the role reports one) under ``STREAMPROC_CHECK_MAX_LOOP_LAG_S``
  (default 2 s): a loop stalled by a blocking handler is unhealthy although Redis answers.
- ``STREAMPROC_CHECK_TICKER=1`` (the tickers): a ticker holds the leader lease (the key
  ``<prefix>:ticker:{ticker}:lease`` has a value and a TTL). Either replica may hold it; a
  standby is healthy while some leader is; none holding it for longer than the start period
  and the retries means no ticker fires.

Exit 0 healthy, 1 not (the reason on stderr, which ``podman/docker inspect`` show).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request


def _http_port(args: list[str]) -> int | None:
    for i, a in enumerate(args):
        if a == "--http-port" and i + 1 < len(args):
            return int(args[i + 1])
        if a.startswith("--http-port="):
            return int(a.split("=", 1)[1])
    return None


def _loop_lag(port: int, limit_s: float) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            body = json.loads(r.read() or b"{}")
    except (OSError, ValueError) as e:
        return f"/healthz on {port}: {e}"
    lag = body.get("loop_lag_s") if isinstance(body, dict) else None
    if isinstance(lag, int | float) and lag > limit_s:
        return f"event loop lag {lag:.2f} s > {limit_s:g} s"
    return None


def _ticker_lease() -> str | None:
    from redis import Redis

    from streamproc.config import load_config

    cfg = load_config()
    key = cfg.keys().ticker_lease()
    client = Redis.from_url(cfg.redis.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        holder, ttl_ms = client.get(key), client.pttl(key)
    finally:
        client.close()
    if not holder or ttl_ms is None or int(ttl_ms) <= 0:
        return f"no ticker holds the lease ({key})"
    return None


def main() -> int:
    args = shlex.split(os.environ.get("STREAMPROC_CHECK_ARGS", "--redis-only"))
    done = subprocess.run(["streamproc", "check", "--timeout-s", "5", *args], check=False)
    if done.returncode != 0:
        return 1
    problems = []
    port = _http_port(args)
    if port is not None:
        limit = float(os.environ.get("STREAMPROC_CHECK_MAX_LOOP_LAG_S", "2"))
        problems.append(_loop_lag(port, limit))
    if os.environ.get("STREAMPROC_CHECK_TICKER", "") not in ("", "0"):
        problems.append(_ticker_lease())
    for p in filter(None, problems):
        print(f"unhealthy: {p}", file=sys.stderr)
    return 1 if any(problems) else 0


if __name__ == "__main__":
    sys.exit(main())
