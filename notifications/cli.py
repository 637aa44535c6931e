"""``streamproc subscriptions add|list|remove`` and ``streamproc notifications log|recent``.

Secrets are never printed back: a webhook's signing key is printed once, when it is made.
Exit codes: 0 done, 1 nothing to remove / no such notification, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec
import orjson

from notifications.delivery_log import DeliveryLog
from notifications.settings import NotifySettings
from notifications.subscriptions import CHANNELS, SEVERITIES, SubscriptionStore, new_subscription
from streamproc.app import App
from streamproc.cli import open_redis, run_async
from streamproc.config import Config
from streamproc.keys import Keys
from streamproc.printable import printable, printable_json

__all__ = ("register",)


def _cmd_subscriptions(args: argparse.Namespace, cfg: Config, app: App) -> int:
    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            store = SubscriptionStore(client, Keys(cfg.redis.key_prefix), cache_s=0)
            if args.action == "add":
                types = [t for v in args.types for t in v.replace(",", " ").split()] or ["*"]
                sub = new_subscription(
                    cluster=args.cluster,
                    channel=args.channel,
                    destination=args.to,
                    min_severity=args.min_severity,
                    types=types,
                    secret=args.secret or "",
                )
                await store.add(sub)
                print(sub.id)
                shown = sub.public()
                print(
                    f"subscription {sub.id} added: {shown['channel']} to {shown['destination']} "
                    f"for cluster {sub.cluster!r}, {sub.min_severity}+, types "
                    f"{', '.join(sub.types)}",
                    file=sys.stderr,
                )
                if sub.channel == "webhook" and not args.secret:
                    print(sub.secret)
                    print(
                        "the line above is the webhook signing key (Standard Webhooks); it is "
                        "shown only now",
                        file=sys.stderr,
                    )
                return 0
            if args.action == "remove":
                if not await store.remove(args.id):
                    print(f"streamproc: no subscription {args.id!r}", file=sys.stderr)
                    return 1
                print(f"subscription {args.id} removed")
                return 0
            subs = await store.all(args.cluster)
            if args.json:
                for s in subs:
                    print(printable_json(orjson.dumps(s.public()).decode()))
                return 0
            print(f"{'id':<21} {'cluster':<16} {'channel':<8} {'severity':<9} {'types':<20} to")
            for s in subs:
                p = s.public()
                print(
                    printable(
                        f"{s.id:<21} {s.cluster:<16} {s.channel:<8} {s.min_severity:<9} "
                        f"{','.join(s.types):<20} {p['destination']}"
                    )
                )
            print(f"{len(subs)} subscription(s)")
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def _cmd_notifications(args: argparse.Namespace, cfg: Config, app: App) -> int:
    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            s = NotifySettings()
            dlog = DeliveryLog(
                client, Keys(cfg.redis.key_prefix), maxlen=s.log_maxlen, ttl_s=s.log_ttl_s
            )
            if args.action == "log":
                attempts = await dlog.for_notification(args.id)
                if not attempts:
                    print(f"streamproc: no delivery attempts of {args.id!r}", file=sys.stderr)
                    return 1
            else:
                attempts = await dlog.recent(args.count)
            _print_attempts([msgspec.structs.asdict(a) for a in attempts], args.json)
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def _print_attempts(rows: list[dict[str, Any]], as_json: bool) -> None:
    """The delivery log; an error holds the start of a destination's answer (anyone's text),
    so control characters are printed as escapes."""
    if as_json:
        for r in rows:
            print(printable_json(orjson.dumps(r).decode()))
        return
    print(
        f"{'at':<30} {'status':<14} {'http':<5} {'ms':>8}  {'subscription':<21} destination / error"
    )
    for r in rows:
        extra = r["error"] or r["reference"]
        print(
            printable(
                f"{r['at']:<30} {r['status']:<14} {r['http_status'] or '-':<5} "
                f"{r['latency_ms']:>8.1f}  {r['subscription_id']:<21} {r['destination']}"
                + (f"  {extra[:120]}" if extra else "")
            )
        )


def register(sub: Any) -> None:
    s = sub.add_parser("subscriptions", help="who gets which notifications: add, list, remove")
    ssub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = ssub.add_parser("add", help="subscribe a destination; prints its id (and signing key)")
    add.add_argument("--cluster", required=True, help="a cluster id, or '*' (all, and reports)")
    add.add_argument("--channel", required=True, choices=CHANNELS)
    add.add_argument("--to", required=True, help="webhook/Slack URL, or an email address")
    add.add_argument("--min-severity", default="info", choices=SEVERITIES)
    add.add_argument(
        "--types",
        nargs="+",
        action="extend",
        default=[],
        metavar="T",
        help="notification types (fnmatch, e.g. 'notify.*' 'report.ready'); default all",
    )
    add.add_argument("--secret", help="webhook signing key (whsec_...); default: a new one")
    lst = ssub.add_parser("list", help="list subscriptions (secrets never shown)")
    lst.add_argument("--cluster", help="only this cluster's ('*' for the all-cluster ones)")
    lst.add_argument("--json", action="store_true")
    rm = ssub.add_parser("remove", help="remove a subscription")
    rm.add_argument("id")
    s.set_defaults(func=_cmd_subscriptions)

    n = sub.add_parser("notifications", help="the delivery log: one notification, or the latest")
    nsub = n.add_subparsers(dest="action", required=True, metavar="ACTION")
    lg = nsub.add_parser("log", help="every delivery attempt of one notification")
    lg.add_argument("id", help="the notification id (webhook-id)")
    lg.add_argument("--json", action="store_true")
    rc = nsub.add_parser("recent", help="the latest delivery attempts of all notifications")
    rc.add_argument("--count", type=int, default=20)
    rc.add_argument("--json", action="store_true")
    n.set_defaults(func=_cmd_notifications)
