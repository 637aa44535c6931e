"""``streamproc dlq list|show|replay|purge GROUP``: judge dead letters, then act on a selection.

``list`` shows each letter's age, the consumer that last had it, deliveries, reason, type and
a one-line error, and "N of M"; ``show --id`` the pretty-printed payload and the full error.
A selection is ``--id``, ``--type`` and ``--reason`` (all optional, combined with AND).
``replay`` of anything but ``--id`` selections, ``replay`` of a letter that did not decode
(it fails the same way again unless the code changed: warned on stderr) and every ``purge``
need ``--yes``: without it they print what they would do, by type and reason, write nothing
and exit 0. Exit codes: 0 done or dry run, 1 an ``--id`` not found, 2 bad arguments, 3 Redis
unreachable.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from streamproc import dlq
from streamproc.app import App
from streamproc.cli import open_redis, run_async
from streamproc.concern import Concern
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.printable import printable, printable_json

__all__ = ("register",)

#: ``dlq list`` shows this many unless ``--count`` says otherwise.
LIST_COUNT = 100


def register(sub: Any) -> None:
    d = sub.add_parser(
        "dlq",
        help="list, show, replay or purge a group's dead letters",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    d.add_argument("action", choices=("list", "show", "replay", "purge"))
    d.add_argument("group", metavar="GROUP")
    d.add_argument("--type", action="append", help="only this event type (repeatable)")
    d.add_argument(
        "--reason",
        action="append",
        metavar="REASON",
        help=f"only this reason (repeatable): {', '.join(dlq.REASONS)}",
    )
    d.add_argument("--id", action="append", help="only this event/entry id (repeatable)")
    d.add_argument(
        "--count",
        type=int,
        help=f"at most this many (list: {LIST_COUNT} by default; replay, purge: every match)",
    )
    d.add_argument(
        "--to-topic",
        action="store_true",
        help="replay to the topic stream instead of the group's own: every group reading "
        "the topic handles it again, those that applied it before too",
    )
    d.add_argument("--json", action="store_true", help="list, show: JSON lines")
    d.add_argument(
        "--yes",
        action="store_true",
        help="confirm a purge, a replay without --id, or a replay of letters that did not decode",
    )
    d.set_defaults(func=_cmd_dlq)


def _cmd_dlq(args: argparse.Namespace, cfg: Config, app: App) -> int:
    concern = app.concerns.get(args.group)
    if concern is None:
        raise ConfigError(f"unknown group {args.group!r}; known: {', '.join(sorted(app.concerns))}")
    if args.action == "show" and not args.id:
        raise ConfigError("dlq show needs --id")
    if bad := sorted(set(args.reason or ()) - set(dlq.REASONS)):
        raise ConfigError(f"unknown reason(s) {', '.join(bad)}; known: {', '.join(dlq.REASONS)}")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    keys = cfg.keys()

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            selected = bool(args.id or args.type or args.reason)
            # list: "N of M", where M (matching a selection) needs every match counted
            count = args.count if args.action != "list" else None if selected else LIST_COUNT
            letters = await dlq.dead_letters(
                client,
                keys,
                concern,
                count=count,
                types=args.type or (),
                reasons=args.reason or (),
                ids=args.id or (),
            )
            if missing := _missing(args.id or (), letters):
                for i in missing:
                    print(f"not found: {printable(i)}", file=sys.stderr)
                if not letters:
                    return 1
            if args.action in ("replay", "purge"):
                return await _act(args, concern, letters, client, keys)
            # A dead letter's fields are what a client posted: control characters in them are
            # shown as escapes, never sent to the terminal raw.
            if args.json:
                for d in letters:
                    print(printable_json(orjson.dumps(d.as_dict()).decode()))
                return 0
            now_ms = _now_ms(await client.time())
            if args.action == "show":
                for d in letters:
                    _show(d, now_ms)
                return 0
            of = await dlq.total(client, keys, concern)
            matching = len(letters) if selected else of
            replayed = await dlq.replayed_count(client, keys, concern)
            _list(args, letters[: args.count or LIST_COUNT], matching, of, replayed, now_ms)
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def _missing(ids: Any, letters: list[dlq.DeadLetter]) -> list[str]:
    seen = {v for d in letters for v in (d.get("id"), d.get("dlq_entry_id"), d.dlq_id)}
    return [i for i in dict.fromkeys(ids) if i not in seen]


async def _act(
    args: argparse.Namespace,
    concern: Concern,
    letters: list[dlq.DeadLetter],
    client: Any,
    keys: Any,
) -> int:
    """Replay or purge a selection; a dry run (exit 0, nothing written) unless confirmed."""
    verb = args.action
    selected = bool(args.id or args.type or args.reason)
    if not letters:
        print(f"no dead letters of {concern.group} match: nothing to {verb}")
        return 0
    undecodable = [d for d in letters if d.undecodable] if verb == "replay" else []
    if undecodable:
        reasons = ", ".join(sorted({d.reason or "DecodeError" for d in undecodable}))
        print(
            f"warning: {len(undecodable)} of these did not decode ({reasons}): replayed, they"
            " fail the same way again unless the code changed since",
            file=sys.stderr,
        )
    needs_yes = verb == "purge" or not args.id or bool(undecodable)
    if needs_yes and not args.yes:
        where = "" if verb == "purge" else " to " + _target(args)
        print(f"would {verb} {len(letters)} dead letter(s) of {concern.group}{where}:")
        for line in dlq.selection_summary(letters):
            print("  " + printable(line))
        print(f"nothing done: add --yes to {verb} them")
        return 0
    if verb == "purge":
        n = await dlq.purge(client, keys, concern, letters if selected else None)
        print(f"purged {n} dead letter(s) of {concern.group}")
        return 0
    new_ids = await dlq.replay(client, keys, concern, letters, to_topic=args.to_topic)
    print(f"replayed {len(new_ids)} dead letter(s) of {concern.group} to {_target(args)}:")
    for line in dlq.selection_summary(letters):
        print("  " + printable(line))
    if len(new_ids) < len(letters):
        print(f"{len(letters) - len(new_ids)} were gone already (replayed or purged meanwhile)")
    return 0


def _target(args: argparse.Namespace) -> str:
    return "the topic stream (every group)" if args.to_topic else "the group's retry stream"


def _now_ms(time_reply: Any) -> int:
    seconds, micros = time_reply
    return int(seconds) * 1000 + int(micros) // 1000


def _ago(ms: int, now_ms: int) -> str:
    """``12 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago`` (Redis' clock on both sides)."""
    s = max(now_ms - ms, 0) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit} ago"
    return f"{s} s ago"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _one_line(d: dlq.DeadLetter) -> str:
    error_type, error = d.get("dlq_error_type"), d.get("dlq_error")
    first = error.strip().splitlines()[0] if error.strip() else ""
    return f"{error_type}: {first}" if error_type else first


def _list(
    args: argparse.Namespace,
    letters: list[dlq.DeadLetter],
    matching: int,
    of: int,
    replayed: int,
    now_ms: int,
) -> None:
    def row(*cells: str) -> str:
        return "{:<17} {:<10} {:<12} {:<28} {:<17} {:>5} {:<16} {}".format(*cells)

    print(row("dlq id", "age", "topic", "type", "reason", "deliv", "consumer", "error"))
    for d in letters:
        kind, reason, consumer, deliveries, error = (
            printable(v)
            for v in (
                d.get("type"),
                d.reason,
                d.get("dlq_consumer"),
                d.get("dlq_deliveries"),
                _one_line(d),
            )
        )
        age = _ago(d.at_ms, now_ms)
        print(
            row(
                d.dlq_id,
                age,
                d.topic,
                kind[:28],
                reason[:17],
                deliveries,
                consumer[:16],
                error[:70],
            )
        )
    filters = " ".join(
        f"{name}={','.join(v)}"
        for name, v in (("type", args.type), ("reason", args.reason), ("id", args.id))
        if v
    )
    shown = f"shown {len(letters)} of {matching} dead letter(s)"
    if filters:
        shown = f"shown {len(letters)} of {matching} matching {filters} ({of} in the group)"
    print(f"{shown} · {replayed} replayed so far")


def _show(d: dlq.DeadLetter, now_ms: int) -> None:
    """One letter for a person: its story, the pretty-printed payload, the full error."""
    for label, value in (
        ("dlq id", d.dlq_id),
        ("topic", d.topic),
        ("type", d.get("type")),
        ("event id", d.get("id")),
        ("key", d.get("key")),
        ("reason", d.reason),
        ("attempts", d.get("dlq_attempts")),
        ("deliveries", d.get("dlq_deliveries")),
        ("consumer", d.get("dlq_consumer")),
        ("entry id", d.get("dlq_entry_id")),
        ("dead-lettered", f"{d.get('dlq_at') or _iso(d.at_ms)} ({_ago(d.at_ms, now_ms)})"),
    ):
        if value:
            print(f"{label + ':':<15}{printable(value)}")
    if d.undecodable:
        print(
            "               (did not decode: a replay fails the same way unless the code changed)"
        )
    pretty = d.payload()
    print("payload:")
    for line in (
        printable_json(pretty) if pretty is not None else printable(d.get("data"))
    ).splitlines():
        print("  " + line)
    print(f"error:         {printable(d.get('dlq_error_type'))}")
    for line in d.get("dlq_error").splitlines() or [""]:
        print("  " + printable(line))
