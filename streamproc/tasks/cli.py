"""``streamproc tasks``: run task runners for some queues, list finished tasks and runners.

- ``streamproc tasks --queues crawl,tickets`` runs the consumer groups of those queues only (a
  dedicated runner: it loads every task type of the application, and reads only those queues'
  streams). Without ``--queues``: every queue. ``--http-port`` serves /metrics /healthz /readyz.
- ``streamproc tasks history [--status S] [--type T] [--submitted-by A] [--limit N] [--json]``:
  finished tasks, newest first (kept for the task TTL).
- ``streamproc tasks list [--status S] [--type T] [--submitted-by A] [--limit N] [--json]``:
  queued and running tasks first, then finished ones, newest first (``GET /v1/tasks``).
- ``streamproc tasks show ID [--json]``: one task, every field (its result and error in full).
- ``streamproc tasks cancel ID``: cancel a queued task, or ask a running one to stop (recorded
  as cancelled by ``cli``; an operator's command: whoever reaches Redis may run it).
- ``streamproc tasks runners [--json]``: the live runners, their queues, load and shedding.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from streamproc import _human, tracing
from streamproc.app import App
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.printable import printable
from streamproc.tasks.events import task_group
from streamproc.tasks.history import ACTIVE, TaskHistory
from streamproc.tasks.runners import RunnerRegistry
from streamproc.tasks.store import TaskStore, TaskView

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

    if args.action in ("history", "list"):
        return _history(args, cfg, app)
    if args.action in ("show", "cancel"):
        return _one(args, cfg)
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
    tracing.setup_from_env(os.environ, role="tasks")
    return run_async(consume(cfg, app, groups, http_port=args.http_port, http_host=args.http_host))


def _history(args: argparse.Namespace, cfg: Config, app: App) -> int:
    from streamproc.cli import open_redis, run_async

    if not 1 <= args.limit <= 10_000:
        raise ConfigError("--limit must be 1..10000")

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            keys = cfg.keys()
            history, store = TaskHistory(client, keys), TaskStore(client, keys)
            statuses: list[str] = args.status or []
            views: list[TaskView] = []
            if args.action == "list":
                active = [s for s in statuses if s in ACTIVE] if statuses else list(ACTIVE)
                if active:
                    views = await history.active(
                        store,
                        limit=args.limit,
                        statuses=active,
                        types=args.type or (),
                        submitted_by=args.submitted_by,
                    )
                statuses = [s for s in statuses if s not in ACTIVE]
            if len(views) < args.limit and (statuses or not args.status):
                done, _ = await history.list(
                    store,
                    limit=args.limit - len(views),
                    statuses=statuses,
                    types=args.type or (),
                    submitted_by=args.submitted_by,
                    scan_max=max(5000, args.limit * 10),
                )
                views += done
        finally:
            await client.aclose()
        if args.json:
            for v in views:
                print(orjson.dumps(msgspec.to_builtins(v)).decode())
            return 0
        print(
            f"{'updated':<34} {'task':<38} {'type':<20} {'status':<10} {'progress':>8} "
            f"{'took s':>8}  submitter"
        )
        now = datetime.now(UTC)
        for v in views:
            updated = _human.when(v.finished_at or v.updated_at, now)
            print(
                f"{updated:<34} {v.id[:38]:<38} {v.type[:20]:<20} "
                f"{v.status:<10} {v.progress:>8.0%} {_took(v.started_at, v.finished_at):>8}  "
                f"{v.submitted_by}"
            )
        print(f"{len(views)} task(s)")
        return 0

    return run_async(go())


def _one(args: argparse.Namespace, cfg: Config) -> int:
    """``tasks show ID`` / ``tasks cancel ID``; exit 1 when the task is unknown (or expired)."""
    from streamproc.cli import open_redis, run_async

    if not args.task_id:
        raise ConfigError(f"tasks {args.action}: which task? (tasks {args.action} ID)")

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            store = TaskStore(client, cfg.keys())
            verdict = ""
            if args.action == "cancel":
                verdict = await store.cancel(args.task_id, by="cli")
            view = await store.get(args.task_id)
        finally:
            await client.aclose()
        if view is None:
            print(f"not found: task {printable(args.task_id)}", file=sys.stderr)
            return 1
        if args.action == "cancel":
            said = {
                "cancelled": "cancelled (it was queued)",
                "cancelling": "asked to stop (it is running; its status follows)",
            }
            print(f"task {view.id}: {said.get(verdict, f'already {verdict}: nothing to do')}")
            return 0 if verdict in said else 1
        if args.json:
            print(orjson.dumps(msgspec.to_builtins(view)).decode())
            return 0
        for name, value in msgspec.structs.asdict(view).items():
            if value not in (None, "", {}, []):
                text = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
                print(f"{name:<14} {printable(value) if isinstance(value, str) else text}")
        return 0

    return run_async(go())


def _took(start: str | None, end: str | None) -> str:
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
        choices=("run", "list", "show", "cancel", "history", "runners"),
        default="run",
        action=_Action,
        help="run (default): a runner for --queues; list (active, then finished); show ID; "
        "cancel ID; history (finished only); runners",
    )
    p.add_argument("task_id", nargs="?", metavar="ID", help="show, cancel: the task")
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
        choices=("queued", "running", "completed", "failed", "cancelled"),
        help="list, history: only this status (repeatable)",
    )
    p.add_argument("--type", action="append", help="history: only this task type (repeatable)")
    p.add_argument("--submitted-by", help="history: only this submitter's tasks")
    p.add_argument("--limit", type=int, default=50, help="history: at most this many")
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.set_defaults(func=_cmd_tasks)
