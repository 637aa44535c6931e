"""``streamproc replay GROUP`` and ``streamproc group reset GROUP``: guarded, dry run by default.

Without ``--yes`` both print what they would do (entries per topic and type, the range or the
positions, how many of them the group already handled) and write nothing. Exit codes: 0 done
or dry run, 1 refused at run time (live consumers during a reset, without ``--force``; a reset
back over entries the group already handled, without ``--ignore-dedup``), 2 bad arguments
(unknown group or type, a bad time or id, ``--from`` after ``--to``, a range or a DLQ over
``--max``), 3 Redis unreachable. See ``streamproc.replay`` for what "handled" means (the
pending list and the DLQ; there are no per-event marks) and how each works.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from streamproc import replay as _replay
from streamproc.app import App
from streamproc.cli import open_redis, run_async
from streamproc.config import Config
from streamproc.errors import ConfigError, StreamprocError
from streamproc.printable import printable
from streamproc.settings import ConsumerSettings

__all__ = ("register",)


def register(sub: Any) -> None:
    r = sub.add_parser(
        "replay",
        help="re-deliver a range of a group's topics to that group only (dry run unless --yes)",
    )
    r.add_argument("group", metavar="GROUP")
    r.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="TIME|ID",
        help="first entry: ISO-8601 time (UTC unless it has a zone), epoch ms, or an entry id",
    )
    r.add_argument(
        "--to",
        dest="end",
        default="latest",
        metavar="TIME|ID",
        help="last entry, inclusive (default: the last entry the group was delivered)",
    )
    r.add_argument(
        "--types",
        "--type",
        dest="types",
        nargs="+",
        action="extend",
        default=[],
        metavar="TYPE",
        help="only these event types",
    )
    _guards(r, what="the range")
    r.set_defaults(func=_cmd_replay)

    g = sub.add_parser("group", help="consumer-group operations (reset: move a group's position)")
    actions = g.add_subparsers(dest="group_action", required=True, metavar="ACTION")
    rs = actions.add_parser(
        "reset",
        help="move a group on its topics, like Kafka's offset reset (dry run unless --yes)",
    )
    rs.add_argument("group", metavar="GROUP")
    rs.add_argument(
        "--to",
        required=True,
        metavar="TIME|ID|latest|earliest",
        help="where the group's next read starts (that entry included); latest: skip "
        "everything there now; earliest: re-read everything still in the stream",
    )
    rs.add_argument(
        "--force",
        action="store_true",
        help="reset although consumers of the group look alive",
    )
    _guards(rs, what="a topic's re-read part")
    rs.set_defaults(func=_cmd_reset)


def _guards(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument("--yes", action="store_true", help="do it (without: a dry run)")
    p.add_argument(
        "--ignore-dedup",
        action="store_true",
        help="also the entries the group already handled (acked, not dead-lettered): "
        "their effects apply again",
    )
    p.add_argument(
        "--max",
        type=int,
        default=_replay.DEFAULT_MAX,
        help=f"refuse when {what} (or the group's DLQ) holds more entries (default %(default)s)",
    )


def _consumer_settings(cfg: Config, app: App, group: str) -> ConsumerSettings:
    concern = app.concerns.get(group)
    if concern is None or not concern.settings:
        return cfg.consumer
    merged = {**msgspec.structs.asdict(cfg.consumer), **concern.settings}
    out: ConsumerSettings = ConsumerSettings.from_mapping(merged)
    return out


def _check_max(n: int) -> None:
    if n < 1:
        raise ConfigError("--max must be >= 1")


# ---------------------------------------------------------------------- replay


def _cmd_replay(args: argparse.Namespace, cfg: Config, app: App) -> int:
    concern = app.concerns.get(args.group)
    if concern is None:
        raise ConfigError(f"unknown group {args.group!r}; known: {', '.join(sorted(app.concerns))}")
    _check_max(args.max)
    start = _replay.parse_position(args.start)
    end = None if args.end == "latest" else _replay.parse_position(args.end, end=True)
    if end is not None and start > end:
        raise ConfigError(f"--from {args.start} is after --to {args.end}")
    for t in args.types:
        cls = app.registry.get(t) if t in app.registry else None
        if cls is None:
            raise ConfigError(f"unknown event type {t!r}; known: {', '.join(app.registry.names())}")
        if cls.topic not in concern.topics:
            raise ConfigError(
                f"{t} is published to topic {cls.topic}, which group {args.group} does not read"
            )
    handled = {cls.type_name() for cls in concern.handlers}
    keys = cfg.keys()  # a partitioned topic is replayed partition by partition

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            plan = await _replay.plan_replay(
                client,
                keys,
                args.group,
                keys.all_partitions(concern.topics),
                start=start,
                end=end,
                types=args.types,
                handled=handled,
                max_entries=args.max,
            )
            _print_replay(plan, args)
            if not args.yes or not plan.to_replay(ignore_dedup=args.ignore_dedup):
                return 0
            done = await _replay.apply_replay(client, keys, plan, ignore_dedup=args.ignore_dedup)
        finally:
            await client.aclose()
        replayed = sum(n for n, _ in done.values())
        again = sum(a for _, a in done.values())
        print(
            f"replayed {replayed} entries to group {args.group}"
            + (
                f" ({again} of them already handled: their effects apply again)"
                if args.ignore_dedup
                else ""
            )
        )
        return 0

    return run_async(go())


def _print_replay(plan: _replay.ReplayPlan, args: argparse.Namespace) -> None:
    mode = "" if args.yes else " (dry run: nothing written; add --yes to replay)"
    print(f"replay to group {plan.group}{mode}")
    end = "latest" if plan.end is None else f"{_replay.fmt(plan.end)} ({_replay.when(plan.end)})"
    print(f"range: {_replay.fmt(plan.start)} ({_replay.when(plan.start)}) .. {end}, inclusive")
    print(f"types: {', '.join(sorted(plan.types)) or 'all'}")
    for t in plan.topics:
        print(f"topic {t.topic}: {t.matched} of {t.scanned} entries in range -> {t.target}")
        for kind, n in sorted(t.by_type.items()):
            print(f"  {printable(kind)[:60]:<40} {n}")
        if t.unhandled:
            print(f"  ({t.unhandled} of a type without a handler in this group: acked unread)")
        if t.delivered is None:
            print("  (the group is not on this stream yet: it will read all of it)")
        elif (plan.end is None and t.undelivered != 0) or (
            plan.end is not None and plan.end > _replay.parse_position(t.delivered)
        ):
            later = "later entries" if t.undelivered is None else f"{t.undelivered} later"
            print(
                f"  (read up to {t.delivered}, the group's last delivered entry; {later} it "
                "has not read yet come from the topic)"
            )
    print(f"total: {plan.total} entries")
    if not plan.total:
        print("nothing to replay")
        return
    if args.ignore_dedup:
        print(
            f"dedup: ignored: all {plan.total} entries are replayed; the {plan.handled} the "
            "group already handled are handled again and their effects apply again (there are "
            "no dedup marks to delete)"
        )
    elif not plan.handled:
        print(f"dedup: none of the {plan.total} entries was handled by this group yet")
    else:
        print(
            f"dedup: {plan.handled} of {plan.total} entries were already handled by this group "
            "(acked, not dead-lettered): they are not replayed; --ignore-dedup replays them too"
        )
    if plan.pending:
        print(
            f"pending: {plan.pending} of them are in the group's pending list: "
            + (
                "replayed too, their effects may then apply twice (the pending one is "
                "delivered again from the pending list as well)"
                if args.ignore_dedup
                else "they are delivered again from there, not replayed"
            )
        )
    n = plan.to_replay(ignore_dedup=args.ignore_dedup)
    print(f"to replay: {n} entries" if n else "nothing to replay")


# ---------------------------------------------------------------------- group reset


def _cmd_reset(args: argparse.Namespace, cfg: Config, app: App) -> int:
    declared = app.declared_groups
    topics = sorted(t for t, groups in declared.items() if args.group in groups)
    if not topics:
        known = sorted({g for gs in declared.values() for g in gs})
        raise ConfigError(f"unknown group {args.group!r}; known: {', '.join(known)}")
    _check_max(args.max)
    to = args.to.strip().lower()
    if to not in ("latest", "earliest"):
        _replay.parse_position(args.to)  # a bad one fails here, before Redis
        to = args.to.strip()
    ours = args.group in app.concerns
    if args.ignore_dedup and not ours:
        raise ConfigError(
            f"group {args.group} is read by an outside system (App.extra_groups): its dedup, "
            "if any, is not streamproc's; --ignore-dedup does not apply"
        )
    settings = _consumer_settings(cfg, app, args.group)
    keys = cfg.keys()  # a partitioned topic is moved partition by partition

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            plan = await _replay.plan_reset(
                client,
                keys,
                args.group,
                keys.all_partitions(topics),
                to=to,
                ours=ours,
                live_idle_ms=settings.min_idle_ms,
                max_entries=args.max,
            )
            _print_reset(plan, args, ours=ours)
            if not args.yes:
                return 0
            if plan.live and not args.force:
                raise StreamprocError(
                    f"group {args.group} has live consumers ({', '.join(plan.live)}): stop "
                    "them first (they would go on from where they are), or add --force"
                )
            again = await _replay.apply_reset(client, keys, plan, ignore_dedup=args.ignore_dedup)
        finally:
            await client.aclose()
        moved = sum(1 for t in plan.topics if t.exists)
        print(
            f"reset group {args.group} on {moved} topic(s)"
            + (
                f" ({again} re-read entries it already handled are handled again)"
                if args.ignore_dedup
                else ""
            )
        )
        return 0

    return run_async(go())


def _count(n: int | None, limit: int) -> str:
    return f"more than {limit}" if n is None else str(n)


def _print_reset(plan: _replay.ResetPlan, args: argparse.Namespace, *, ours: bool) -> None:
    mode = "" if args.yes else " (dry run: nothing written; add --yes to reset)"
    print(f"reset group {plan.group} to {plan.to}{mode}")
    for t in plan.topics:
        if not t.exists:
            print(f"topic {t.topic}: no stream yet, nothing to move")
            continue
        now = t.last_delivered if t.group_exists else "(group not created yet: created here)"
        print(
            f"topic {t.topic}: last delivered {now} -> {t.target}; "
            f"re-read {_count(t.reread, args.max)}, skip {_count(t.skipped, args.max)}, "
            f"pending {t.pending}"
        )
    if any(t.pending for t in plan.topics):
        print(
            "pending entries stay pending (their consumers may still ack them); those in a "
            "re-read range are delivered again by the next read"
        )
    if not ours:
        print(
            "dedup: outside reader (App.extra_groups): re-read entries are delivered again; "
            "its own dedup, if any, decides"
        )
    elif not plan.handled:
        if plan.reread:
            print(f"dedup: none of the {plan.reread} re-read entries was handled by this group")
    elif args.ignore_dedup:
        print(
            f"dedup: ignored: the {plan.handled} of {plan.reread} re-read entries the group "
            "already handled are handled again and their effects apply again"
        )
    else:
        print(
            f"dedup: {plan.handled} of {plan.reread} re-read entries were already handled by "
            "this group: moving back would apply their effects again, so the reset refuses "
            "(exit 1) unless --ignore-dedup; 'streamproc replay' re-delivers only the ones it "
            "did not handle"
        )
    if plan.live:
        print(
            f"live consumers: {', '.join(plan.live)} — the reset refuses unless they are "
            "stopped or --force is given"
        )
