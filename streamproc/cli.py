"""The ``streamproc`` command: every role and operator tool is a subcommand.

The application comes from ``--app module:attr`` (before the command; also
``STREAMPROC_APP``), default ``application:app``: every role and command loads it through
``streamproc.app.load_app``. The current directory is importable, as with ``python -m``.

Roles (``up``, ``consume``, ``ingest``, ``ticker``) log at ``STREAMPROC_LOG_LEVEL``; one-shot
commands write for people and print warnings and errors only, each as one plain line
(``streamproc: warning: ...``), never JSON; ``--verbose`` logs at debug, as roles do.

Exit codes: 0 done, 1 failure at run time, 2 bad arguments / configuration, 3 Redis
unreachable or too old, or ``REDIS_URL`` unusable (malformed, or a database the server
lacks), 4 Redis configured unsafely (an eviction policy other than ``noeviction``;
``STREAMPROC_ALLOW_EVICTION=1`` overrides).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson
import redis.asyncio as aioredis
import structlog

from streamproc import tracing
from streamproc._backoff import Backoff
from streamproc._supervise import SAME_STOP_S, supervise
from streamproc.app import App, load_app
from streamproc.config import Config, load_config
from streamproc.connection import REDIS_DOWN, ServerInfo, check_server, connect
from streamproc.consumer import Consumer
from streamproc.embedded import EmbeddedRedis
from streamproc.errors import (
    ConfigError,
    RedisUnavailable,
    RedisUrlError,
    ServerTooOld,
    StreamprocError,
    UnsafeServerConfig,
)
from streamproc.logs import configure_logging
from streamproc.producer import Producer

__all__ = (
    "DEFAULT_APP",
    "StoppedWhileWaiting",
    "child_argv",
    "install_stop_handlers",
    "main",
    "open_redis",
    "run_async",
)

log = structlog.get_logger("streamproc.cli")

T = TypeVar("T")

#: The application ``streamproc`` runs when neither ``--app`` nor ``STREAMPROC_APP`` names one.
DEFAULT_APP = "application:app"

#: Modules that add subcommands: each has ``register(subparsers)``, and may have ``UP_ROLE``
#: (so may the App's own ``commands`` modules),
#: the argument list of the child process ``streamproc up`` starts for that role.
COMMAND_MODULES: tuple[str, ...] = (
    "streamproc.dlq_cli",
    "streamproc.ops_cli",
    "streamproc.ticker_cli",
    "streamproc.ingest.cli",
    "streamproc.bench.cli",
    "streamproc.tasks.cli",
    "streamproc.schema_cli",
    "streamproc.replay_cli",
)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run the role's coroutine on uvloop (chosen here, at the entry point, only)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


class StoppedWhileWaiting(Exception):
    """SIGTERM or SIGINT arrived while ``open_redis`` was still waiting for Redis to come up.

    ``main`` exits 0 for it, as a role stopped by a signal does: nothing had started, there is
    nothing to drain, and a supervisor (compose's ``restart: on-failure``) must not restart it.
    """

    def __init__(self, signame: str) -> None:
        super().__init__(f"stopped by {signame} while waiting for Redis")
        self.signame = signame


class _StopOnSignal:
    """While installed, SIGTERM/SIGINT cancel the task that waits (and say which signal).

    Installed only once the first attempt failed, so a Redis that answers at once leaves the
    signal handlers alone; removed before ``open_redis`` returns, so a role installs its own
    (``install_stop_handlers``) as before. A handler on the loop also makes PID 1 in a
    container stoppable: PID 1 ignores a signal with the default action (``podman stop``
    then waited its 10 s and killed it).
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.signame = ""
        self.installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.loop.add_signal_handler(sig, self._on_signal, sig.name)
            except (RuntimeError, ValueError):  # not the main thread: leave signals alone
                continue
            self.installed.append(sig)

    def _on_signal(self, signame: str) -> None:
        if not self.signame and self.task is not None:
            self.signame = signame
            self.task.cancel()

    def remove(self) -> None:
        for sig in self.installed:
            self.loop.remove_signal_handler(sig)


async def open_redis(
    cfg: Config, *, wait_s: float = 30.0, role: bool = False
) -> tuple[aioredis.Redis, ServerInfo]:
    """Connect and check the server, waiting up to ``wait_s`` for Redis to come up.

    The server's version and features are logged at info by a long-running ``role``, at
    debug by a one-shot command (whose output is for people). SIGTERM/SIGINT while waiting
    raise ``StoppedWhileWaiting`` at once (``main``: exit 0).
    """
    client = connect(cfg.redis)
    backoff = Backoff(cap_s=2.0)
    deadline = time.monotonic() + wait_s
    stop: _StopOnSignal | None = None
    try:
        while True:
            try:
                info = await check_server(client, allow_eviction=cfg.redis.allow_eviction)
                break
            except RedisUnavailable as e:
                if time.monotonic() >= deadline:
                    raise
                if stop is None:  # the handlers first: the warning says a stop now works
                    stop = _StopOnSignal()
                    log.warning("waiting_for_redis", url=_safe_url(cfg.redis.url), error=str(e))
                await backoff.sleep()
    except asyncio.CancelledError:
        await client.aclose()
        if stop is None or not stop.signame:
            raise
        if stop.task is not None:
            stop.task.uncancel()  # the cancel was ours, turned into this exception
        log.info("stopped_while_waiting_for_redis", signal=stop.signame)
        raise StoppedWhileWaiting(stop.signame) from None
    except BaseException:  # RedisUrlError (waiting will not help), or out of time
        await client.aclose()
        raise
    finally:
        if stop is not None:
            stop.remove()
    (log.info if role else log.debug)(
        "redis_server",
        version=info.version_text,
        acked_trim=info.has_acked_trim,
        readgroup_claim=info.has_readgroup_claim,
        idempotent_xadd=info.has_idempotent_xadd,
    )
    return client, info


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def install_stop_handlers(stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: ``stop()`` (graceful). Second: exit at once; but one within
    ``SAME_STOP_S`` of the first is the same stop sent twice (under ``streamproc up`` started
    by ``make``, or a systemd unit, a role gets the signal from both) and is logged only."""
    loop = asyncio.get_running_loop()
    first_at: float | None = None

    def on_signal(signame: str) -> None:
        nonlocal first_at
        now = time.monotonic()
        if first_at is None:
            first_at = now
            log.info("stopping", signal=signame)
            stop()
        elif now - first_at < SAME_STOP_S:
            log.info("stop_signal_repeated", signal=signame)
        else:
            log.warning("stopping_now", signal=signame)
            os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


# ---------------------------------------------------------------------- consume


async def consume(
    cfg: Config, app: App, groups: Sequence[str], *, http_port: int = -1, http_host: str = ""
) -> int:
    client, _ = await open_redis(cfg, role=True)
    keys = cfg.keys()
    producer = Producer(client, app.codec, keys, cfg.producer)
    consumers = [
        Consumer(
            app.concerns[g],
            client=client,
            codec=app.codec,
            keys=keys,
            producer=producer,
            settings=cfg.consumer,
            declared_groups=app.declared_groups,
        )
        for g in groups
    ]

    def stop_all() -> None:
        for c in consumers:
            c.stop()

    install_stop_handlers(stop_all)
    http = None
    if http_port >= 0:  # /metrics, /healthz, /readyz (streamproc.health)
        from streamproc.health import start_consumer_http

        http = await start_consumer_http(
            consumers, client, keys, port=http_port, host=http_host or "127.0.0.1"
        )
    try:
        async with app.lifespan(role="consume", redis=client, keys=keys, producer=producer):
            await asyncio.gather(*(c.run() for c in consumers))
    finally:
        if http is not None:
            await http.close()
        await client.aclose()
    return 0


def _cmd_consume(args: argparse.Namespace, cfg: Config, app: App) -> int:
    groups = sorted(app.concerns) if args.all else args.groups
    unknown = [g for g in groups if g not in app.concerns]
    if unknown or not groups:
        raise ConfigError(
            f"unknown group(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(sorted(app.concerns))}"
        )
    app.configure(os.environ)
    tracing.setup_from_env(os.environ, role="consume")
    return run_async(consume(cfg, app, groups, http_port=args.http_port, http_host=args.http_host))


# ---------------------------------------------------------------------- publish


def parse_event(app: App, type_name: str, body: bytes) -> Any:
    """Decode a JSON body as the event type ``type_name``; errors name the field path."""
    cls = app.registry.get(type_name) if type_name in app.registry else None
    if cls is None:
        raise ConfigError(
            f"unknown event type {type_name!r}; known: {', '.join(app.registry.names())}"
        )
    try:
        event = msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid {type_name}: {e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"malformed JSON: {e}") from None
    return event


def _cmd_publish(args: argparse.Namespace, cfg: Config, app: App) -> int:
    event = parse_event(app, args.type, args.json.encode())
    if not event.source:
        event = msgspec.structs.replace(event, source="cli")

    async def go() -> int:
        client, _ = await open_redis(cfg, wait_s=5)
        try:
            producer = Producer(client, app.codec, cfg.keys(), cfg.producer)
            [(entry_id, duplicate)] = await producer.append([event])
        finally:
            await client.aclose()
        print(
            orjson.dumps(
                {
                    "topic": event.topic,
                    "entry_id": entry_id,
                    "id": event.id,
                    "duplicate": duplicate,
                }
            ).decode()
        )
        return 0

    return run_async(go())


# ---------------------------------------------------------------------- up


def child_argv(args: argparse.Namespace, *command: str) -> list[str]:
    """The command line of a child ``streamproc`` process that runs the same application."""
    return [sys.executable, "-m", "streamproc", "--app", args.app, *command]


def _up_roles(args: argparse.Namespace, app: App) -> list[list[str]]:
    roles = [["consume", "--all"]] if app.concerns else []
    for name in (*COMMAND_MODULES, *app.commands):
        role = getattr(importlib.import_module(name), "UP_ROLE", None)
        if not role or role[0] in args.without:
            continue
        if role[0] == "ticker" and not _has_ticks(app):
            continue  # an application without any tick type has nothing to tick
        roles.append(list(role))
    return roles


def _has_ticks(app: App) -> bool:
    """A schedule table, or tick types that runtime schedules may fire."""
    from streamproc.schedule import Tick

    return bool(app.schedules) or any(
        isinstance(t, type) and issubclass(t, Tick) for t in app.registry.by_name.values()
    )


def _cmd_up(args: argparse.Namespace, cfg: Config, app: App) -> int:
    """Run every role as a child process; an embedded Redis when REDIS_URL is unset."""
    server: EmbeddedRedis | None = None
    env = dict(os.environ)
    if not cfg.redis_url_given:
        # A new random password each start, for the children only (REDIS_URL) and the
        # 0600 file beside the data; never printed.
        server = EmbeddedRedis(
            Path(args.data_dir),
            port=args.redis_port,
            password=secrets.token_urlsafe(24),
            maxmemory=args.redis_maxmemory,
        ).start()
        env["REDIS_URL"] = server.url
        cli = f"REDISCLI_AUTH=$(cat {server.password_file}) redis-cli -p {server.port}"
        print(
            f"embedded Redis on 127.0.0.1:{server.port} (data in {args.data_dir}/, password in "
            f"{server.password_file}, maxmemory {args.redis_maxmemory} noeviction)\n"
            f"inspect it with:  {cli}   e.g. {cli} --scan --pattern '{cfg.redis.key_prefix}:*'\n"
            f"operator commands: REDIS_URL=redis://default:$(cat {server.password_file})"
            f"@127.0.0.1:{server.port}/0 streamproc inspect",
            flush=True,
        )
    try:
        return supervise([child_argv(args, *role) for role in _up_roles(args, app)], env)
    finally:
        if server is not None:
            server.stop()


# ---------------------------------------------------------------------- main


def build_parser(app: App | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``app``'s own ``commands`` modules add theirs."""
    p = argparse.ArgumentParser(prog="streamproc", description=__doc__.split("\n")[0])
    p.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help=f"the application to run (default: $STREAMPROC_APP, else {DEFAULT_APP})",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at debug (one-shot commands print warnings and errors only, as plain lines)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run everything (embedded Redis unless REDIS_URL is set)")
    up.add_argument("--data-dir", default=".redis", help="embedded Redis data folder")
    up.add_argument("--redis-port", type=int, default=0, help="embedded Redis port (0 = free)")
    up.add_argument(
        "--redis-maxmemory",
        default="1gb",
        help="embedded Redis maxmemory, policy noeviction (e.g. 512mb, 4gb; default 1gb)",
    )
    up.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="ROLE",
        help="leave a role out (ingest, ticker)",
    )
    up.set_defaults(func=_cmd_up, role=True)

    c = sub.add_parser("consume", help="run consumer groups")
    c.add_argument("groups", nargs="*", metavar="GROUP")
    c.add_argument("--all", action="store_true", help="every group the application defines")
    c.add_argument(
        "--http-port", type=int, default=-1, help="serve /metrics /healthz /readyz (0: any port)"
    )
    c.add_argument("--http-host", default="127.0.0.1", help="address for --http-port")
    c.set_defaults(func=_cmd_consume, role=True)

    pub = sub.add_parser("publish", help="publish one event, for trying things out")
    pub.add_argument("type", help="event type, e.g. cluster.spot_interruption")
    pub.add_argument("json", help="the event's fields as a JSON object")
    pub.set_defaults(func=_cmd_publish)

    for name in (*COMMAND_MODULES, *(app.commands if app is not None else ())):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"App(commands=...): importing {name!r} failed: {e}") from e
        register = getattr(module, "register", None)
        if not callable(register):
            raise ConfigError(f"App(commands=...): {name!r} has no register(subparsers)")
        register(sub)
    return p


def _log_level(args: argparse.Namespace, cfg: Config) -> str:
    """-v: debug. Roles: STREAMPROC_LOG_LEVEL. One-shot commands: warning or above."""
    if args.verbose:
        return "debug"
    if getattr(args, "role", False):
        return cfg.log_level
    levels = ("debug", "info", "warning", "error")
    return levels[max(levels.index(cfg.log_level), levels.index("warning"))]


def _load_app(args: argparse.Namespace) -> App:
    """The application named by --app, else STREAMPROC_APP, else DEFAULT_APP.

    ``args.app`` is set to the spec used, for child processes (``child_argv``).
    """
    if args.app:
        origin, spec = "--app", args.app
    elif env_spec := os.environ.get("STREAMPROC_APP", "").strip():
        origin, spec = "STREAMPROC_APP", env_spec
    else:
        origin, spec = "default app", DEFAULT_APP
    args.app = spec
    _importable_cwd()
    return load_app(spec, origin=origin)


def app_spec(given: str | None) -> str:
    """The spec of the application: ``--app``, else STREAMPROC_APP, else DEFAULT_APP."""
    return given or os.environ.get("STREAMPROC_APP", "").strip() or DEFAULT_APP


def _importable_cwd() -> None:
    # Importable from the current directory, as with `python -m` (the console script's
    # sys.path starts at its own bin folder).
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _preload_app(argv: Sequence[str] | None) -> tuple[App | None, ConfigError | None]:
    """The application, loaded before the full parser is built (it may add subcommands)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--app")
    known, _ = pre.parse_known_args(argv)
    try:
        return _load_app(known), None
    except ConfigError as e:
        return None, e


def main(argv: Sequence[str] | None = None) -> int:
    app, app_error = _preload_app(argv)
    try:
        args = build_parser(app).parse_args(argv)
    except ConfigError as e:
        print(f"streamproc: error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config()
        # One-shot commands write for people: a warning is one plain line, not JSON (-v: logs).
        plain = not args.verbose and not getattr(args, "role", False)
        configure_logging(_log_level(args, cfg), json=cfg.log_json, plain=plain)
        if app_error is not None:
            raise app_error
        assert app is not None
        args.app = app_spec(args.app)
        func: Callable[[argparse.Namespace, Config, App], int] = args.func
        code = func(args, cfg, app)
        sys.stdout.flush()  # here, where a reader gone (BrokenPipeError) is handled below
        return code
    except StoppedWhileWaiting as e:  # asked to stop before Redis came up: nothing to drain
        print(f"streamproc: {e}", file=sys.stderr)
        return 0
    except RedisUrlError as e:  # before ConfigError: no usable Redis, as when unreachable
        print(f"streamproc: error: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"streamproc: error: {e}", file=sys.stderr)
        return 2
    except (RedisUnavailable, ServerTooOld) as e:
        print(f"streamproc: error: {e}", file=sys.stderr)
        return 3
    except UnsafeServerConfig as e:
        print(f"streamproc: error: {e}", file=sys.stderr)
        return 4
    except StreamprocError as e:
        print(f"streamproc: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Our output's reader went away (`| head`): not an error, and not Redis (redis-py
        # raises its own ConnectionError for a socket). Point stdout at /dev/null so that
        # the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except REDIS_DOWN as e:
        print(f"streamproc: error: Redis connection lost: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
