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
from datetime import UTC, datetime
from typing import Any

from streamproc.app import App
from streamproc.cli import install_stop_handlers, open_redis, run_async
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.keys import Keys, check_name
from streamproc.producer import Producer
from streamproc.schedule import Schedule
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
        for s in schedules:
            t, times = now, []
            for _ in range(3):
                t = s.trigger.next_after(t)
                times.append(t.isoformat(timespec="seconds"))
            print(f"{s.name:<18} {s.trigger!s:<28} {s.event.type_name():<24} {s.missed:<8} "
                  f"next: {', '.join(times)}")  # fmt: skip
        return 0
    settings = TickerSettings(
        node=check_name("ticker node", args.node or default_node()),
        lease_ttl_ms=args.lease_ttl_ms,
    )

    async def go() -> int:
        client, _ = await open_redis(cfg, role=True)
        keys = Keys(cfg.redis.key_prefix)
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
