"""``streamproc hibernation set|show|list|remove`` and ``streamproc audit``.

Exit codes: 0 done, 1 no such cluster, 2 bad arguments (a precise message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import orjson

from spot._schedule import Schedule, apply_rules, grid, new_schedule, parse_matrix
from spot.aws import AccountStore
from spot.hibernation_store import ScheduleStore, cli_user, read_audit, sizes_text
from spot.hibernation_view import public, state_of
from streamproc.app import App
from streamproc.cli import open_redis, run_async
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.keys import Keys

__all__ = ("register", "week_of_args")

#: A matrix file is 7 lines of 24 characters: anything near this size is not one.
_MATRIX_MAX_BYTES = 16 * 1024


def week_of_args(sleep: list[str], awake: list[str], matrix: str | None) -> str:
    """The week of ``--sleep``/``--awake`` rules or of ``--matrix FILE`` (``-`` = stdin)."""
    if matrix is not None:
        if sleep or awake:
            raise ConfigError("give --matrix or --sleep/--awake rules, not both")
        try:
            if matrix == "-":
                text = sys.stdin.read(_MATRIX_MAX_BYTES + 1)
            else:
                with Path(matrix).open(encoding="utf-8") as f:
                    text = f.read(_MATRIX_MAX_BYTES + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--matrix {matrix}: cannot read it: {e}") from e
        if len(text) > _MATRIX_MAX_BYTES:
            raise ConfigError(f"--matrix {matrix}: larger than {_MATRIX_MAX_BYTES} bytes")
        try:
            return parse_matrix(text.splitlines())
        except ConfigError as e:
            raise ConfigError(f"--matrix {matrix}: {e}") from None
    if not sleep:
        raise ConfigError("give --sleep rules (e.g. --sleep 'mon-fri 20-08') or --matrix FILE")
    return apply_rules(sleep, awake)


def _cmd_hibernation(args: argparse.Namespace, cfg: Config, app: App) -> int:
    now = datetime.now(UTC)
    schedule: Schedule | None = None
    if args.action == "set":
        try:
            week = week_of_args(args.sleep, args.awake, args.matrix)
            schedule = new_schedule(
                cluster=args.cluster,
                account=args.account,
                region=args.region,
                tz=args.tz,
                week=week,
                asgs=args.asg,
                prewarm_min=args.prewarm_min,
                updated_by=cli_user(),
                now=now,
            )
        except ConfigError as e:
            print(f"streamproc: {e}", file=sys.stderr)
            return 2

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            store = ScheduleStore(client, Keys(cfg.redis.key_prefix))
            if schedule is not None:
                keys = Keys(cfg.redis.key_prefix)
                if await AccountStore(client, keys).get(schedule.account) is None:
                    print(
                        f"streamproc: warning: account {schedule.account} is not registered "
                        "(streamproc accounts add): the schedule fails until it is",
                        file=sys.stderr,
                    )
                new = await store.put(schedule, who=cli_user(), detail=f"tz={schedule.tz}")
                verb = "added" if new else "replaced"
                print(f"hibernation schedule of {schedule.cluster} {verb} ({schedule.tz}):")
                print("\n".join(grid(schedule.week)))
                print("# = sleep, . = awake; local hours", file=sys.stderr)
                return 0
            if args.action == "remove":
                outcome = await store.remove(args.cluster, who=cli_user(), forget=args.forget)
                if outcome == "absent":
                    print(
                        f"streamproc: no hibernation schedule for {args.cluster!r}", file=sys.stderr
                    )
                    return 1
                if outcome == "forgotten":
                    print(
                        f"hibernation schedule of {args.cluster} removed; its node groups were "
                        "NOT restored (the sizes they had are in the audit entry)"
                    )
                elif outcome == "pending":
                    print(
                        f"{args.cluster} is asleep: it is woken at the next tick, then its "
                        "schedule is removed"
                    )
                else:
                    print(f"hibernation schedule of {args.cluster} removed")
                return 0
            if args.action == "show":
                s = await store.get(args.cluster)
                if s is None:
                    print(
                        f"streamproc: no hibernation schedule for {args.cluster!r}", file=sys.stderr
                    )
                    return 1
                rec = await store.record(args.cluster)
                shown = public(s, rec, now)
                if args.json:
                    print(orjson.dumps(shown).decode())
                    return 0
                print(
                    f"{s.cluster}: account {s.account}, {s.region}, {s.tz}, pre-warm "
                    f"{s.prewarm_min} min, node groups "
                    f"{', '.join(s.asgs) if s.asgs else 'tagged with the cluster name'}"
                    + (" (removal pending)" if s.removing else "")
                )
                print("\n".join(grid(s.week)))
                print(f"state: {shown['state']}; next change: {shown['next_change'] or 'never'}")
                if rec is not None:
                    for name, sizes in sorted(rec.asgs.items()):
                        print(f"  {name}: restores to {sizes_text(sizes)} ({sizes.instance_type})")
                return 0
            schedules = await store.all()
            records = await store.asleep()
            if args.json:
                for s in schedules:
                    print(orjson.dumps(public(s, records.get(s.cluster), now)).decode())
                return 0
            print(f"{'cluster':<24} {'account':<13} {'region':<15} {'tz':<22} {'state':<15} asgs")
            for s in schedules:
                state = state_of(records.get(s.cluster)) + ("*" if s.removing else "")
                print(
                    f"{s.cluster:<24} {s.account:<13} {s.region:<15} {s.tz:<22} {state:<15} "
                    f"{','.join(s.asgs) or '(tags)'}"
                )
            print(f"{len(schedules)} schedule(s)")
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def _cmd_audit(args: argparse.Namespace, cfg: Config, app: App) -> int:
    if not 1 <= args.count <= 10_000:
        print("streamproc: --count: 1 to 10000", file=sys.stderr)
        return 2

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            entries = await read_audit(
                client, Keys(cfg.redis.key_prefix), cluster=args.cluster, count=args.count
            )
        finally:
            await client.aclose()
        if args.json:
            for e in entries:
                print(orjson.dumps(msgspec.structs.asdict(e)).decode())
            return 0
        print(f"{'at':<26} {'who':<24} {'action':<16} {'cluster':<20} {'asg':<24} before -> after")
        for e in entries:
            change = f"{e.before} -> {e.after}" if e.before or e.after else e.detail[:100]
            print(
                f"{e.at:<26} {e.who[:24]:<24} {e.action:<16} {e.cluster[:20]:<20} "
                f"{e.asg[:24]:<24} {change}"
            )
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
        return 0

    return run_async(go())


def register(sub: Any) -> None:
    h = sub.add_parser(
        "hibernation", help="clusters' weekly sleep schedules: set, show, list, remove"
    )
    hsub = h.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = hsub.add_parser(
        "set",
        help="set a cluster's schedule (replaces it)",
        description="Rules are 'DAYS START-END' in the cluster's local time: "
        "--sleep 'mon-fri 20-08' --sleep 'sat-sun 0-24'; END <= START runs past midnight. "
        "--awake rules carve exceptions out of the sleep rules. Or --matrix FILE: 7 lines "
        "(Monday first) of 24 characters, 1/S = sleep, 0/. = awake.",
    )
    st.add_argument("cluster")
    st.add_argument("--account", required=True, help="12-digit AWS account id (registered)")
    st.add_argument("--region", required=True, help="e.g. eu-central-1")
    st.add_argument("--tz", required=True, help="IANA time zone, e.g. Europe/Berlin")
    st.add_argument("--sleep", action="append", default=[], metavar="RULE")
    st.add_argument("--awake", action="append", default=[], metavar="RULE")
    st.add_argument("--matrix", metavar="FILE", help="7 lines of 24 hours ('-' = stdin)")
    st.add_argument(
        "--asg",
        action="append",
        default=[],
        metavar="NAME",
        help="node Auto Scaling groups by name (default: those tagged with the cluster name)",
    )
    st.add_argument("--prewarm-min", type=int, default=30, help="wake this early (0-180)")
    sh = hsub.add_parser("show", help="a cluster's schedule, state and next change")
    sh.add_argument("cluster")
    sh.add_argument("--json", action="store_true")
    ls = hsub.add_parser("list", help="every schedule and its state")
    ls.add_argument("--json", action="store_true")
    rm = hsub.add_parser("remove", help="remove a schedule (a sleeping cluster is woken first)")
    rm.add_argument("cluster")
    rm.add_argument(
        "--forget",
        action="store_true",
        help="asleep: drop the sizes to restore instead of waking (node groups deleted meanwhile)",
    )
    h.set_defaults(func=_cmd_hibernation)

    a = sub.add_parser("audit", help="what hibernation did and who changed schedules")
    a.add_argument("--cluster", help="only this cluster's entries")
    a.add_argument("--count", type=int, default=20)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_audit)
