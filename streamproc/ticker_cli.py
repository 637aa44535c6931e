"""``streamproc ticker``: the ticker role (one leader fires, the others stand by).

    streamproc ticker                                  # the application's table (App.schedules)
    streamproc ticker --list                           # each schedule's next fire times
    streamproc ticker --schedules mymod:SCHEDULES --lease-ttl-ms 3000

The leader also fires the runtime schedules (``streamproc.scheduler``; ``streamproc
schedules``), kept in Redis.

SIGTERM/SIGINT: finish the current step, release the lease (a standby takes over at once),
exit 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec

from streamproc import _human
from streamproc.app import App
from streamproc.cli import install_stop_handlers, open_redis, run_async
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.keys import check_name
from streamproc.producer import Producer
from streamproc.schedule import Every, Schedule, Tick
from streamproc.scheduler import Scheduler, check_schedule_name
from streamproc.ticker import Ticker, TickerSettings

__all__ = ("UP_ROLE", "register")

UP_ROLE = ["ticker"]


def load_schedules(spec: str, app: App) -> tuple[Schedule, ...]:
    """``module:ATTRIBUTE`` naming a sequence of Schedules; empty: the application's own.

    The ticks must be event types of the application's registry (its consumers decode them).
    """
    if not spec:
        return app.schedules  # may be empty: the runtime schedules still fire
    module, _, attr = spec.partition(":")
    try:
        table = getattr(importlib.import_module(module), attr or "SCHEDULES")
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--schedules {spec!r}: {e}") from None
    if not table or not all(isinstance(s, Schedule) for s in table):
        raise ConfigError(f"--schedules {spec!r} is not a non-empty sequence of Schedule")
    unknown = sorted({s.event.type_name() for s in table} - set(app.registry.names()))
    if unknown:
        raise ConfigError(
            f"--schedules {spec!r} fires {', '.join(unknown)}, not in the application's registry"
        )
    return tuple(table)


def default_node() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"{host.strip('-_.')[:40] or 'ticker'}-{os.getpid()}"


def _cmd_ticker(args: argparse.Namespace, cfg: Config, app: App) -> int:
    schedules = load_schedules(args.schedules, app)
    if args.list:
        now = datetime.now(UTC)
        times: list[str]
        for s in schedules:
            t, times = now, []
            for _ in range(3):
                t = s.trigger.next_after(t)
                times.append(_human.when(t, now) if not times else _human.iso(t))
            trigger = s.trigger
            text = _human.every(trigger.interval_s) if isinstance(trigger, Every) else str(trigger)
            print(f"{s.name:<18} {text:<28} {s.event.type_name():<24} {s.missed:<8} "
                  f"next: {', '.join(times)}")  # fmt: skip
        return 0
    settings = TickerSettings(
        node=check_name("ticker node", args.node or default_node()),
        lease_ttl_ms=args.lease_ttl_ms,
    )

    async def go() -> int:
        client, _ = await open_redis(cfg, role=True)
        keys = cfg.keys()
        producer = Producer(client, app.codec, keys, cfg.producer)
        ticker = Ticker(schedules, client=client, producer=producer, keys=keys, settings=settings)
        install_stop_handlers(ticker.stop)
        try:
            async with app.lifespan(role="ticker", redis=client, keys=keys, producer=producer):
                await ticker.run()
        finally:
            await client.aclose()
        return 0

    return run_async(go())


def _cmd_schedules(args: argparse.Namespace, cfg: Config, app: App) -> int:
    """``streamproc schedules list|show|add|remove``: the runtime schedules."""
    ticks = {
        name: t
        for name, t in app.registry.by_name.items()
        if isinstance(t, type) and issubclass(t, Tick)
    }
    if args.action == "add":
        check_schedule_name(args.name)
        if args.event not in ticks:
            raise ConfigError(
                f"--event {args.event!r}: not a tick type of the application "
                f"(known: {', '.join(sorted(ticks))})"
            )
        if (args.every is None) == (args.cron is None):
            raise ConfigError("give exactly one of --every and --cron")
    elif args.action in ("show", "remove"):
        check_schedule_name(args.name)

    async def go() -> int:
        client, _ = await open_redis(cfg)
        s = Scheduler(client, cfg.keys())
        try:
            if args.action == "list":
                page, cursor = await s.list(prefix=args.prefix, limit=args.limit)
                total = await s.count()
                now = datetime.now(UTC)
                for i in page:
                    nxt = _human.when(i.next_at, now)
                    print(f"{i.name:<32} {_human.trigger(i.trigger):<34} {i.event:<24} "
                          f"key={i.key:<16} next {nxt}")  # fmt: skip
                more = " (more: narrow with --prefix or raise --limit)" if cursor else ""
                print(f"{len(page)} of {total} runtime schedule(s){more}")
                return 0
            if args.action == "show":
                info = await s.get(args.name)
                if info is None:
                    print(f"no runtime schedule {args.name!r}", file=sys.stderr)
                    return 1
                print(msgspec.json.format(msgspec.json.encode(info)).decode())
                return 0
            if args.action == "remove":
                if not await s.remove(args.name):
                    print(f"no runtime schedule {args.name!r}", file=sys.stderr)
                    return 1
                print(f"removed {args.name}")
                return 0
            changed = await s.add(
                args.name,
                event=ticks[args.event],
                every=args.every,
                cron=args.cron,
                tz=args.tz,
                key=args.key,
                missed=args.missed,
            )
            info = await s.get(args.name)
            nxt = _human.when(info.next_at if info else None, datetime.now(UTC))
            print(f"{'set' if changed else 'unchanged'} {args.name}: next {nxt}")
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def register(sub: Any) -> None:
    p = sub.add_parser("ticker", help="run the ticker (periodic events, one leader)")
    p.add_argument(
        "--schedules",
        default="",
        metavar="MODULE:ATTR",
        help="another schedule table than the application's (App.schedules)",
    )
    p.add_argument("--node", default="", help="this replica's name (default host-pid)")
    p.add_argument("--lease-ttl-ms", type=int, default=10_000, help="leader lease TTL")
    p.add_argument("--list", action="store_true", help="print the schedules and exit")
    p.set_defaults(func=_cmd_ticker, role=True)
    _register_schedules(sub)


def _register_schedules(sub: Any) -> None:
    sp = sub.add_parser(
        "schedules", help="runtime schedules (added while the system runs; the ticker fires them)"
    )
    actions = sp.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="list them (name, trigger, tick, next time)")
    ls.add_argument("--prefix", default="", help="only names starting with this")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    show = actions.add_parser("show", help="one schedule as JSON")
    show.add_argument("name")
    add = actions.add_parser("add", help="create or change one (an upsert)")
    add.add_argument("name")
    add.add_argument("--event", required=True, help="the tick type it fires")
    add.add_argument("--every", default=None, help="an interval: '5 min', '30s', '6h'")
    add.add_argument("--cron", default=None, help="a cron line or 'Mon 09:00' (in --tz)")
    add.add_argument("--tz", default="UTC")
    add.add_argument("--key", default="", help="the ticks' key (default: the name)")
    add.add_argument("--missed", choices=("skip", "latest", "catch_up"), default="latest")
    rm = actions.add_parser("remove", help="stop one")
    rm.add_argument("name")
    sp.set_defaults(func=_cmd_schedules)
