"""``streamproc tasks``: run task runners for some queues, list finished tasks and runners.

- ``streamproc tasks --queues crawl,tickets`` runs the consumer groups of those queues only (a
  dedicated runner: it loads every task type of the application, and reads only those queues'
  streams). Without ``--queues``: every queue. ``--http-port`` serves /metrics /healthz /readyz.
- ``streamproc tasks history [--status S] [--type T] [--submitted-by A] [--limit N] [--json]``:
  finished tasks, newest first (kept for the task TTL).
- ``streamproc tasks runners [--json]``: the live runners, their queues, load and shedding.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import msgspec
import orjson

from streamproc.app import App
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.tasks.events import task_group
from streamproc.tasks.history import TaskHistory
from streamproc.tasks.runners import RunnerRegistry
from streamproc.tasks.store import TaskStore

__all__ = ("register",)


def queues_of(app: App) -> list[str]:
    return sorted({t.queue for t in app.task_types.values()})


def parse_queues(raw: list[str], app: App) -> list[str]:
    known = queues_of(app)
    if not known:
        raise ConfigError("the application has no task types")
    wanted: list[str] = []
    for value in raw:
        for q in value.replace(",", " ").split():
            if q not in wanted:
                wanted.append(q)
    unknown = [q for q in wanted if q not in known]
    if unknown:
        raise ConfigError(
            f"--queues: unknown queue(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return wanted or known


def _cmd_tasks(args: argparse.Namespace, cfg: Config, app: App) -> int:
    from streamproc.cli import consume, run_async

    if args.action == "history":
        return _history(args, cfg, app)
    if args.action == "runners":
        return _runners(args, cfg)
    queues = parse_queues(args.queues, app)
    groups = [task_group(q) for q in queues]
    missing = [g for g in groups if g not in app.concerns]
    if missing:
        raise ConfigError(
            f"the application has task types in queue(s) whose group is not among its "
            f"concerns: {', '.join(missing)} (add task_concerns(...) to App(concerns=...))"
        )
    app.configure(os.environ)
    return run_async(consume(cfg, app, groups, http_port=args.http_port, http_host=args.http_host))


def _history(args: argparse.Namespace, cfg: Config, app: App) -> int:
    from streamproc.cli import open_redis, run_async

    if not 1 <= args.limit <= 10_000:
        raise ConfigError("--limit must be 1..10000")

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            keys = cfg.keys()
            views, _ = await TaskHistory(client, keys).list(
                TaskStore(client, keys),
                limit=args.limit,
                statuses=args.status or (),
                types=args.type or (),
                submitted_by=args.submitted_by,
                scan_max=max(5000, args.limit * 10),
            )
        finally:
            await client.aclose()
        if args.json:
            for v in views:
                print(orjson.dumps(msgspec.to_builtins(v)).decode())
            return 0
        print(f"{'finished':<25} {'task':<38} {'type':<20} {'status':<10} {'took s':>8}  submitter")
        for v in views:
            print(
                f"{v.finished_at or '-':<25} {v.id[:38]:<38} {v.type[:20]:<20} {v.status:<10} "
                f"{_took(v.started_at, v.finished_at):>8}  {v.submitted_by}"
            )
        print(f"{len(views)} task(s)")
        return 0

    return run_async(go())


def _took(start: str | None, end: str | None) -> str:
    from datetime import datetime

    if not start or not end:
        return "-"
    try:
        s = datetime.fromisoformat(start.replace("Z", "+00:00"))
        e = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    return f"{(e - s).total_seconds():.2f}"


def _runners(args: argparse.Namespace, cfg: Config) -> int:
    from streamproc.cli import open_redis, run_async

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            runners = await RunnerRegistry(client, cfg.keys()).list()
        finally:
            await client.aclose()
        if args.json:
            for r in runners:
                print(orjson.dumps(msgspec.to_builtins(r)).decode())
            return 0
        print(f"{'runner':<48} {'active':>6} {'cpu %':>6} {'mem %':>6}  state")
        for r in runners:
            state = "shedding" if r.shedding else "taking tasks"
            print(
                f"{r.id[:48]:<48} {r.active:>6} {r.cpu_percent:>6.1f} {r.memory_percent:>6.1f}"
                f"  {state}"
            )
        print(f"{len(runners)} runner(s)")
        return 0

    return run_async(go())


class _Action(argparse.Action):
    """The positional action; only ``run`` is a role (logs at info), the others are one-shot
    commands whose output is for people (and JSON lines)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.role = values == "run"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tasks",
        help="run task runners (--queues), or list finished tasks (history) and runners",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("run", "history", "runners"),
        default="run",
        action=_Action,
        help="run (default): a runner for --queues; history; runners",
    )
    p.add_argument(
        "--queues",
        action="append",
        default=[],
        metavar="Q[,Q]",
        help="the queues this runner runs (default: all)",
    )
    p.add_argument(
        "--http-port", type=int, default=-1, help="serve /metrics /healthz /readyz (0: any port)"
    )
    p.add_argument("--http-host", default="127.0.0.1", help="address for --http-port")
    p.add_argument(
        "--status",
        action="append",
        choices=("completed", "failed", "cancelled"),
        help="history: only this end status (repeatable)",
    )
    p.add_argument("--type", action="append", help="history: only this task type (repeatable)")
    p.add_argument("--submitted-by", help="history: only this submitter's tasks")
    p.add_argument("--limit", type=int, default=50, help="history: at most this many")
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.set_defaults(func=_cmd_tasks)
