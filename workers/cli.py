"""``streamproc workers list|show|add|terminate|discover``.

Exit codes: 0 done, 1 no such worker (or discovery failed somewhere), 2 bad arguments (a
precise message on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from schemas.workers import WORKER_ID_RE, WorkerCreated, WorkerTerminated
from streamproc import _human
from streamproc.app import App
from streamproc.cli import open_redis, run_async
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.keys import Keys
from streamproc.producer import Producer
from workers import jobs
from workers._runtime import configure_from_env
from workers.registry import Worker, WorkerStore

__all__ = ("new_created", "register")


def new_created(**values: Any) -> WorkerCreated:
    """A checked ``worker.created``; ``ConfigError("field: reason")`` otherwise."""
    try:
        return msgspec.convert(
            {k: v for k, v in values.items() if v is not None}, WorkerCreated, strict=True
        )
    except msgspec.ValidationError as e:
        message, _, where = str(e).partition(" - at `$.")
        field = where.rstrip("`") or "event"
        raise ConfigError(f"{field}: {message}") from None


def _check_id(worker_id: str) -> None:
    if not WORKER_ID_RE.fullmatch(worker_id):
        raise ConfigError(
            f"worker id {worker_id[:80]!r}: expected 1-64 characters of letters, digits, "
            "'.', '_', '-'"
        )


def _pct(w: Worker, metric: str) -> str:
    v = w.cpu if metric == "cpu" else w.memory
    return "-" if v is None else f"{v:.1f}"


def _alert(w: Worker) -> str:
    on = [m for m, s in (("cpu", w.alert_cpu), ("mem", w.alert_memory)) if s == "alert"]
    return ",".join(on) or "ok"


def _cmd_workers(args: argparse.Namespace, cfg: Config, app: App) -> int:
    event: WorkerCreated | WorkerTerminated | None = None
    try:
        if args.action == "add":
            event = new_created(
                worker_id=args.worker_id,
                name=args.name,
                instance_id=args.instance,
                region=args.region,
                account_id=args.account,
                cpu_threshold=args.cpu_threshold,
                memory_threshold=args.memory_threshold,
                interval_s=args.interval,
                key=args.worker_id if WORKER_ID_RE.fullmatch(args.worker_id) else "",
                source="cli",
            )
        elif args.action in ("show", "terminate"):
            _check_id(args.worker_id)
            if args.action == "terminate":
                event = WorkerTerminated(
                    worker_id=args.worker_id, key=args.worker_id, source="cli", reason=args.reason
                )
        elif args.action == "list" and not 1 <= args.limit <= 100_000:
            raise ConfigError("--limit: 1 to 100000")
        if args.action == "terminate" and len(args.reason) > 512:
            raise ConfigError("--reason: at most 512 characters")
    except ConfigError as e:
        print(f"streamproc: {e}", file=sys.stderr)
        return 2
    if args.action == "discover":
        configure_from_env(os.environ)

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        keys = Keys(cfg.redis.key_prefix)
        store = WorkerStore(client, keys)
        producer = Producer(client, app.codec, keys, cfg.producer)
        try:
            if args.action == "discover":
                from workers.discover import discover

                r = await discover(client, keys, producer)
                print(
                    f"{r.found} tagged instance(s), {r.known} already known, "
                    f"{r.imported} worker.imported published"
                )
                for e in r.errors:
                    print(f"streamproc: {e}", file=sys.stderr)
                return 1 if r.errors else 0
            if args.action == "terminate" and await store.get(args.worker_id) is None:
                print(f"streamproc: no worker {args.worker_id!r}", file=sys.stderr)
                return 1
            if event is not None:
                [(entry_id, duplicate)] = await producer.append([event])
                shown = {"type": event.type_name(), "id": event.id, "entry_id": entry_id}
                print(orjson.dumps(shown | {"duplicate": duplicate}).decode())
                return 0
            now = datetime.now(UTC)
            if args.action == "show":
                w = await store.get(args.worker_id)
                if w is None:
                    print(f"streamproc: no worker {args.worker_id!r}", file=sys.stderr)
                    return 1
                nxt = await jobs.next_poll(client, keys, w.id)
                shown = w.public() | {"next_poll_at": nxt.isoformat() if nxt else None}
                print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
                return 0
            workers = await store.many(await store.ids(count=args.limit))
            total = await store.count()
            if args.json:
                for w in workers:
                    print(orjson.dumps(w.public()).decode())
                return 0
            print(
                f"{'id':<24} {'status':<12} {'cpu%':>6} {'mem%':>6} {'alert':<8} "
                f"{'last polled':<34} next poll"
            )
            for w in workers:
                nxt = await jobs.next_poll(client, keys, w.id)
                print(
                    f"{w.id[:24]:<24} {w.status:<12} {_pct(w, 'cpu'):>6} {_pct(w, 'memory'):>6} "
                    f"{_alert(w):<8} {_human.when(w.last_polled_at, now):<34} "
                    f"{_human.when(nxt, now) if nxt else 'no job'}"
                )
            print(f"{len(workers)} of {total} worker(s)")
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{value:g} is not within 0 (excluded)..100")
    return value


def _interval(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a whole number of seconds"
        ) from None
    if not 5 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"{value} is not within 5..86400 seconds")
    return value


def register(sub: Any) -> None:
    w = sub.add_parser(
        "workers", help="monitored EC2 workers: list, show, add, terminate, discover"
    )
    wsub = w.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = wsub.add_parser("list", help="workers with status, CPU, memory, alerts, next poll")
    ls.add_argument("--limit", type=int, default=1000, help="at most this many (oldest first)")
    ls.add_argument("--json", action="store_true")
    sh = wsub.add_parser("show", help="one worker's record and next poll (JSON)")
    sh.add_argument("worker_id")
    add = wsub.add_parser("add", help="monitor an EC2 instance (publishes worker.created)")
    add.add_argument("worker_id")
    add.add_argument("--instance", required=True, help="EC2 instance id, i-0123456789abcdef0")
    add.add_argument("--region", required=True, help="e.g. eu-west-1")
    add.add_argument("--account", help="12-digit registered account (default: the base one)")
    add.add_argument("--name", help="a display name")
    add.add_argument("--cpu-threshold", type=_percent, help="percent (default 90)")
    add.add_argument("--memory-threshold", type=_percent, help="percent (default 90)")
    add.add_argument("--interval", type=_interval, help="seconds between polls (default 300)")
    tm = wsub.add_parser(
        "terminate", help="stop monitoring and forget (publishes worker.terminated)"
    )
    tm.add_argument("worker_id")
    tm.add_argument("--reason", default="", help="recorded in the log")
    wsub.add_parser("discover", help="import the tagged instances now")
    w.set_defaults(func=_cmd_workers)
