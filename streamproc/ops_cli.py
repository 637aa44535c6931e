"""Operator subcommands: ``inspect``, ``tail``, ``check`` and ``consumers``.

Exit codes (besides the CLI's 2 for bad arguments and 3 for Redis unreachable):
``inspect`` 1 when a group is stuck or behind its limits (``inspect.judge``: a pending entry
nobody renewed, work and no live consumer, a backlog over ``max_backlog``), 0 when busy;
``check`` 1 when a group is missing, has work waiting and no live consumer, or the
process's own ``/readyz`` does not answer 200; ``tail`` 0 when stopped or done;
``consumers`` 0. ``inspect`` and ``check`` also exit 1 when Redis' ``used_memory`` is at or
above ``STREAMPROC_REDIS_MEMORY_ALERT`` (0.8) of ``maxmemory`` (``inspect.memory_breach``),
except ``check --redis-only``: a container's health check, which prints the figures and does
not fail on them (an orchestrator would restart healthy processes, and that frees no memory).

``consumers`` and not ``workers``: ``streamproc workers`` is the EC2 worker-monitoring
feature's command (``workers/``); these are the processes consuming the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.error
import urllib.request
from typing import Any

import msgspec
import orjson

from streamproc import inspect as _inspect
from streamproc import presence as _presence
from streamproc import tail as _tail
from streamproc.app import App
from streamproc.cli import install_stop_handlers, open_redis, run_async
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.groups import group_info
from streamproc.keys import check_name

__all__ = ("register",)


def register(sub: Any) -> None:
    i = sub.add_parser("inspect", help="topics, groups, DLQs and the ticker at a glance")
    i.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    i.add_argument(
        "--max-lag",
        type=int,
        default=None,
        help="override every group's Limits.max_backlog: a backlog (lag + pending) over this "
        "breaches (default: each group's, 100 unless its Concern says)",
    )
    i.add_argument(
        "--stuck-after-s",
        "--max-pending-age-s",
        dest="stuck_after_s",
        type=float,
        default=None,
        help="override every group's Limits.stuck_after_s: a pending entry nobody renewed for "
        "this long is stuck (default: each group's, 60 unless its Concern says)",
    )
    i.add_argument("--no-memory", action="store_true", help="skip MEMORY USAGE")
    i.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("tail", help="follow a topic's events live (no group, nothing acked)")
    t.add_argument("topic")
    t.add_argument("--type", action="append", default=[], help="only this type (repeatable)")
    t.add_argument(
        "--from",
        dest="start",
        default="$",
        metavar="ID",
        help="start after this entry id: $ = new events only (default), 0 = from the start",
    )
    t.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")
    fmt = t.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON lines (default when piped)")
    fmt.add_argument("--pretty", action="store_true", help="pretty (default in a terminal)")
    t.set_defaults(func=_cmd_tail)

    c = sub.add_parser(
        "check",
        help="health check: Redis reachable, groups exist, none has work and no live consumer",
    )
    c.add_argument(
        "groups", nargs="*", metavar="GROUP", help="groups to check (default: every one)"
    )
    c.add_argument(
        "--all", action="store_true", help="every group the application defines (the default)"
    )
    c.add_argument(
        "--http-port", type=int, default=0, help="also require 200 from 127.0.0.1:PORT/readyz"
    )
    c.add_argument(
        "--redis-only",
        action="store_true",
        help="only Redis reachable (and --http-port ready): a role's container health check "
        "that must not fail for other roles' groups",
    )
    c.add_argument("--timeout-s", type=float, default=3.0, help="how long to wait for Redis")
    c.set_defaults(func=_cmd_check)

    w = sub.add_parser(
        "consumers", help="consumer processes: online/offline, groups, in flight, counts"
    )
    w.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    w.add_argument(
        "--all", action="store_true", help="offline processes too (heard from in the last hour)"
    )
    w.set_defaults(func=_cmd_consumers)


# ---------------------------------------------------------------------- inspect


def _cmd_inspect(args: argparse.Namespace, cfg: Config, app: App) -> int:
    if (args.max_lag is not None and args.max_lag <= 0) or (
        args.stuck_after_s is not None and args.stuck_after_s <= 0
    ):
        raise ConfigError("--max-lag and --stuck-after-s must be > 0")
    limits = _inspect.limits_of(
        app.concerns, stuck_after_s=args.stuck_after_s, max_backlog=args.max_lag
    )

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            report = await _inspect.collect(
                client,
                cfg.keys(),
                memory=not args.no_memory,
                schedules=app.schedules,
                limits=limits,
                memory_alert_ratio=cfg.redis.memory_alert_ratio,
            )
        finally:
            await client.aclose()
        problems = _inspect.breaches(report)
        if args.json:
            doc = {
                **msgspec.to_builtins(report),
                "health": msgspec.to_builtins(_inspect.health(report)),
                "breaches": problems,
            }
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        else:
            print(_inspect.render_table(report, problems))
        return 1 if problems else 0

    return run_async(go())


# ---------------------------------------------------------------------- tail


def _cmd_tail(args: argparse.Namespace, cfg: Config, app: App) -> int:
    check_name("topic", args.topic)
    if args.count < 0:
        raise ConfigError("--count must be >= 0")
    unknown = [t for t in args.type if t not in app.registry]
    if unknown:
        raise ConfigError(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(app.registry.names())}"
        )
    pretty = args.pretty or (not args.json and sys.stdout.isatty())
    color = pretty and sys.stdout.isatty()
    keys = cfg.keys()
    # Under the socket timeout, so a quiet stream never looks like a dead connection.
    block_ms = max(100, min(1000, int(cfg.redis.socket_timeout_s * 500)))

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        stop = asyncio.Event()
        install_stop_handlers(stop.set)
        seen = 0
        try:
            declared = [*app.registry.topics(), *app.declared_groups]
            await _tail.check_topic(client, keys, args.topic, declared)
            start = await _tail.start_id(client, keys.stream(args.topic), args.start)
            print(f"following {keys.stream(args.topic)} after {start}", file=sys.stderr, flush=True)
            async for entry in _tail.follow(
                client,
                keys,
                app.codec,
                args.topic,
                start=start,
                types=args.type,
                block_ms=block_ms,
                stop=stop,
            ):
                line = (
                    _tail.format_pretty(entry, color=color) if pretty else _tail.format_json(entry)
                )
                print(line, flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        except BrokenPipeError:  # piped into head: the reader is gone, that is fine
            sys.stderr.close()
        finally:
            await client.aclose()
        return 0

    return run_async(go())


# ---------------------------------------------------------------------- check


def _readyz(port: int, timeout_s: float) -> str | None:
    """None when 127.0.0.1:port/readyz answers 200, else what went wrong."""
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return None if r.status == 200 else f"{url} answered {r.status}"
    except urllib.error.HTTPError as e:
        return f"{url} answered {e.code}"
    except OSError as e:
        return f"{url}: {e}"


def _cmd_check(args: argparse.Namespace, cfg: Config, app: App) -> int:
    # Every group the application declares: its concerns' and the extra ones (outside readers).
    declared = app.declared_groups
    known = sorted({g for gs in declared.values() for g in gs})
    if args.redis_only and (args.groups or args.all):
        raise ConfigError("check --redis-only takes no groups")
    groups = [] if args.redis_only else known if args.all or not args.groups else args.groups
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ConfigError(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(known)}")
    keys = cfg.keys()

    async def go() -> int:
        client, info = await open_redis(cfg, wait_s=args.timeout_s)
        problems: list[str] = []
        try:
            live = await _presence.liveness(client, keys)
            now_ms = await _inspect.server_time_ms(client)
            statuses = []
            for topic, readers in sorted(declared.items()) if groups else ():
                for part in keys.partitions_of(topic):  # each partition
                    stream = keys.stream(part)
                    for g in (g for g in readers if g in groups):
                        row = await group_info(client, stream, g)
                        if row is None:
                            problems.append(f"group {g} does not exist on {stream}")
                        else:
                            status = _inspect.group_status(client, keys, part, row, now_ms, live)
                            statuses.append(await status)
            problems += _inspect.unattended(statuses)
            memory = await _inspect.redis_memory(client, cfg.redis.memory_alert_ratio)
            if not args.redis_only:
                problems += _inspect.memory_breach(memory)
        finally:
            await client.aclose()
        if args.http_port:
            why = await asyncio.to_thread(_readyz, args.http_port, args.timeout_s)
            if why:
                problems.append(f"not ready: {why}")
        for p in problems:
            print(f"streamproc check: {p}", file=sys.stderr)
        if not problems:
            print(f"ok: Redis {info.version_text}, {len(groups)} group(s)")
            print(_inspect.memory_line(memory) + (" HIGH" if memory.high else ""))
        return 1 if problems else 0

    return run_async(go())


# ---------------------------------------------------------------------- consumers


def _cmd_consumers(args: argparse.Namespace, cfg: Config, app: App) -> int:
    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            now_ms, procs = await _presence.processes(client, cfg.keys())
        finally:
            await client.aclose()
        shown = procs if args.all else [p for p in procs if p.online]
        if args.json:
            doc = {"server_time_ms": now_ms, "processes": msgspec.to_builtins(shown)}
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        else:
            print(_presence.render_table(now_ms, shown))
            hidden = len(procs) - len(shown)
            if hidden:
                print(f"({hidden} offline, shown with --all)")
        return 0

    return run_async(go())
