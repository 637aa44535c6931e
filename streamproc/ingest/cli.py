"""``streamproc ingest`` (the HTTP service) and ``streamproc agents add|list|revoke``.

Ingest settings come from ``STREAMPROC_INGEST_<FIELD>`` (e.g. ``STREAMPROC_INGEST_MAX_BATCH``),
read here, at the entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec
import orjson
import structlog
from aiohttp import web_response

from streamproc import tracing
from streamproc._supervise import supervise
from streamproc.app import App
from streamproc.cli import child_argv, install_stop_handlers, open_redis, run_async
from streamproc.config import Config, settings_from_env
from streamproc.errors import ConfigError
from streamproc.event import postable_types
from streamproc.ingest._http import SERVER_NAME
from streamproc.ingest._serve import GuardedSite, make_runner
from streamproc.ingest.app import Ingest, create_app
from streamproc.ingest.auth import AgentStore, parse_types
from streamproc.ingest.settings import IngestSettings
from streamproc.inspect import limits_of
from streamproc.metrics import RedisMemoryMonitor
from streamproc.producer import Producer

if TYPE_CHECKING:
    from streamproc.dashboard.routes import DashboardSettings

__all__ = ("UP_ROLE", "ingest_settings_from_env", "register")

log = structlog.get_logger("streamproc.ingest")

#: ``streamproc up`` starts this role.
UP_ROLE = ["ingest"]

_FIRST_TOKEN_HINT = (
    "no ingest agents yet: create one with  {env}streamproc agents add NAME --types 'cluster.*'"
    " --clusters 'prod-*'"
    "  (and an operator for the task API:  {env}streamproc agents add admin --operator)"
)


def ingest_settings_from_env(env: Mapping[str, str] | None = None) -> IngestSettings:
    return settings_from_env(
        IngestSettings, "STREAMPROC_INGEST_", os.environ if env is None else env
    )


async def serve(cfg: Config, app: App, host: str, port: int, *, reuse_port: bool) -> int:
    settings = ingest_settings_from_env()
    client, _ = await open_redis(cfg, role=True)
    keys = cfg.keys()
    producer = Producer(
        client, app.codec, keys, cfg.producer, retry_timeout_s=settings.publish_timeout_s
    )
    ingest = Ingest(
        client=client,
        registry=app.registry,
        keys=keys,
        producer=producer,
        settings=settings,
        task_types=app.task_types,
        groups=app.declared_groups,
    )
    # aiohttp's own answers (a request it cannot parse) name no versions either.
    web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]
    if ingest.connections.max_connections < settings.max_connections:
        log.warning(
            "max_connections_lowered",
            wanted=settings.max_connections,
            cap=ingest.connections.max_connections,
            reason="the open-files limit (ulimit -n)",
        )
    runner = make_runner(
        create_app(
            ingest,
            schedules=app.schedules,
            routes=app.routes,
            panels=app.panels,
            dashboard=_dashboard_settings(),
            limits=limits_of(app.concerns),
            memory_alert_ratio=cfg.redis.memory_alert_ratio,
        ),
        settings,
    )
    await runner.setup()
    # Redis' memory against maxmemory: gauges on /metrics, the redis_memory_high warning.
    memory = RedisMemoryMonitor(
        client, alert_ratio=cfg.redis.memory_alert_ratio, interval_s=cfg.redis.memory_sample_s
    ).start()
    stop = asyncio.Event()
    install_stop_handlers(stop.set)  # before the hooks: a stop while they run still drains
    try:
        async with app.lifespan(role="ingest", redis=client, keys=keys, producer=producer):
            site = GuardedSite(
                runner, ingest.connections, host=host, port=port, reuse_port=reuse_port
            )
            await site.start()
            log.info("ingest_listening", host=host, port=port, pid=os.getpid())
            if not await ingest.agents.list():
                _hint_first_agent(cfg)
            await stop.wait()
            # Stop listening, let in-flight requests finish (shutdown_grace_s), then close.
            await site.stop()
            await ingest.drain(settings.shutdown_grace_s)
    finally:
        await memory.close()
        await runner.cleanup()
        await client.aclose()
        log.info("ingest_stopped", pid=os.getpid())
    return 0


def _hint_first_agent(cfg: Config) -> None:
    url = cfg.redis.url if "@" not in cfg.redis.url else "redis://…"
    env = f"REDIS_URL={url} " if cfg.redis_url_given else ""
    if cfg.redis.key_prefix != "sp":
        env += f"STREAMPROC_PREFIX={cfg.redis.key_prefix} "
    hint = _FIRST_TOKEN_HINT.format(env=env)
    log.warning("no_agents", hint=hint)
    print(f"streamproc ingest: {hint}", file=sys.stderr, flush=True)


def _supervise(args: argparse.Namespace) -> int:
    """``--workers N``: N processes sharing the port with SO_REUSEPORT (the same app)."""
    argv = child_argv(args, "ingest", "--host", args.host, "--port", str(args.port))
    return supervise([[*argv, "--workers", "1", "--reuse-port"]] * args.workers)


def _cmd_ingest(args: argparse.Namespace, cfg: Config, app: App) -> int:
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    if not 0 < args.port < 65536:
        raise ConfigError("--port must be 1-65535")
    if args.workers > 1:
        return _supervise(args)  # each worker process sets its tracing up itself
    tracing.setup_from_env(os.environ, role="ingest")
    return run_async(serve(cfg, app, args.host, args.port, reuse_port=args.reuse_port))


def _cmd_agents(args: argparse.Namespace, cfg: Config, app: App) -> int:
    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            store = AgentStore(client, cfg.keys())
            if args.action == "add":
                types = parse_types(args.types)
                # Patterns choose among the postable types only ('*' = all of those); the
                # ingest refuses the application's own types whatever a token says.
                postable = [t.type_name() for t in postable_types(app.registry.by_name.values())]
                unknown = [p for p in types if not fnmatch.filter(postable, p)]
                if unknown:
                    raise ConfigError(
                        f"--types {', '.join(unknown)} match no type agents may post (the others "
                        "are the application's own); postable: " + ", ".join(sorted(postable))
                    )
                covered = sorted(n for n in postable if any(fnmatch.fnmatch(n, p) for p in types))
                clusters = parse_types(args.clusters)
                submit = parse_types(args.submit)
                task_types = sorted(app.task_types)
                unknown = [p for p in submit if not fnmatch.filter(task_types, p)]
                if unknown:
                    raise ConfigError(
                        f"--submit {', '.join(unknown)} match no task type; known: "
                        + (", ".join(task_types) or "none")
                    )
                if not types and not clusters and not submit and not args.operator:
                    raise ConfigError(
                        "the agent could do nothing: give --types (events it posts), --clusters "
                        "(clusters it speaks for), --submit (tasks it submits) or --operator"
                    )
                # An event about a cluster is posted only for the agent's --clusters (issue 17
                # item 3): without them such types would be refused at every POST.
                about = [
                    n for n in covered if "cluster_id" in app.registry.by_name[n].__struct_fields__
                ]
                if about and not clusters and not args.operator:
                    raise ConfigError(
                        f"--types cover events about a cluster ({', '.join(about)}): give "
                        "--clusters, the clusters it speaks for (fnmatch patterns; '*' for "
                        "every cluster)"
                    )
                agent, token = await store.add(
                    args.name,
                    types=types,
                    operator=args.operator,
                    clusters=clusters,
                    submit=submit,
                )
                print(token)
                print(
                    f"agent {agent.name!r} added (types: {', '.join(agent.types) or 'none'}"
                    f"{' = ' + ', '.join(covered) if covered != list(agent.types) else ''}; "
                    f"clusters: {', '.join(agent.clusters) or 'none'}; "
                    f"tasks: {', '.join(agent.submit) or 'none'}"
                    f"{'; operator' if agent.operator else ''}). The token is shown only now; "
                    "Redis keeps its SHA-256.",
                    file=sys.stderr,
                )
                return 0
            if args.action == "set-clusters":
                changed = await store.set_clusters(args.name, parse_types(args.clusters))
                if changed is None:
                    print(f"streamproc: no agent {args.name!r}", file=sys.stderr)
                    return 1
                print(
                    f"agent {args.name!r} speaks for: {', '.join(changed.clusters) or 'no cluster'}"
                    " (ingest caches apply it within a few s; its token is unchanged)"
                )
                return 0
            if args.action == "revoke":
                if not await store.revoke(args.name):
                    print(f"streamproc: no agent {args.name!r}", file=sys.stderr)
                    return 1
                print(f"agent {args.name!r} revoked (ingest caches refuse it within a few s)")
                return 0
            agents = await store.list()
            if args.json:
                for a in agents:
                    rec = msgspec.structs.asdict(a)
                    del rec["token_sha256"]
                    print(orjson.dumps(rec).decode())
                return 0
            print(
                f"{'name':<24} {'operator':<9} {'created':<26} {'clusters':<20} {'tasks':<20} types"
            )
            for a in agents:
                print(
                    f"{a.name:<24} {'yes' if a.operator else 'no':<9} {a.created_at:<26} "
                    f"{', '.join(a.clusters) or '-':<20} {', '.join(a.submit) or '-':<20} "
                    f"{', '.join(a.types)}"
                )
            print(f"{len(agents)} agent(s)")
            return 0
        finally:
            await client.aclose()

    return run_async(go())


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ingest", help="run the HTTP ingest service (events and tasks)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    p.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT (other processes may share it)"
    )
    p.set_defaults(func=_cmd_ingest, role=True)

    a = sub.add_parser("agents", help="add, list or revoke ingest agents and their tokens")
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = asub.add_parser("add", help="create an agent; prints its token once")
    add.add_argument("name")
    add.add_argument(
        "--types",
        nargs="+",
        action="extend",
        default=[],
        metavar="T",
        help="event types it may post (fnmatch patterns, e.g. 'cluster.*')",
    )
    add.add_argument(
        "--clusters",
        nargs="+",
        action="extend",
        default=[],
        metavar="C",
        help="clusters it speaks for (fnmatch patterns, '*' = all): posts events about them and "
        "reads their feeds; needed with --types that cover cluster events; alone: a viewer token",
    )
    add.add_argument(
        "--submit",
        nargs="+",
        action="extend",
        default=[],
        metavar="T",
        help="task types it may submit, and read and cancel its own tasks of (fnmatch)",
    )
    add.add_argument(
        "--operator", action="store_true", help="may use the whole task API (every task)"
    )
    lst = asub.add_parser("list", help="list agents (never tokens)")
    lst.add_argument("--json", action="store_true")
    sc = asub.add_parser(
        "set-clusters", help="replace the clusters an agent speaks for (its token stays)"
    )
    sc.add_argument("name")
    sc.add_argument(
        "--clusters", nargs="*", action="extend", default=[], metavar="C", help="none = no cluster"
    )
    rev = asub.add_parser("revoke", help="delete an agent and its token")
    rev.add_argument("name")
    a.set_defaults(func=_cmd_agents)


def _dashboard_settings() -> DashboardSettings:
    """``STREAMPROC_DASHBOARD_*`` (cookie, trusted proxies, login throttle)."""
    # Imported here: the dashboard's modules import the ingest's.
    from streamproc.dashboard.routes import dashboard_settings_from_env

    return dashboard_settings_from_env(os.environ)
