"""The application as one object: what the engine runs, loaded by the CLI by name.

The engine knows no event, concern or schedule of its own; an application hands it an
``App``::

    app = App(
        registry=Registry([SpotInterruption, Notification, *task_events()]),
        concerns=[cluster_events.CONCERN, *task_concerns(TASK_TYPES)],
        schedules=SCHEDULES,                      # the ticker's table
        task_types=TASK_TYPES,                    # what POST /v1/tasks accepts
        extra_groups={"cluster": ("billing",)},   # groups an outside system reads with
        commands=["mypkg.cli"],                   # modules adding `streamproc` subcommands
        routes=[add_feed_routes],                 # add routes to the ingest service
        panels=[Panel("feeds", "Feeds", read)],   # tables on the dashboard
        on_startup=[open_pool],
        on_shutdown=[close_pool],
        configure=configure_from_env,
    )

and every role and command gets it from one loader, ``load_app("module:attr")``:
``streamproc --app mypkg.app:app consume --all`` (or ``STREAMPROC_APP=mypkg.app:app``), the way
``arq module.WorkerSettings`` and ``faststream run module:app`` load theirs.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import structlog

from streamproc.codec import Codec, Registry
from streamproc.concern import Concern
from streamproc.errors import ConfigError
from streamproc.groups import ensure_declared_groups
from streamproc.keys import Keys, check_name
from streamproc.schedule import Schedule
from streamproc.tasks.events import task_events
from streamproc.tasks.runner import TaskType

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from aiohttp import web

    from streamproc.dashboard.panels import Panel
    from streamproc.ingest.app import Ingest
    from streamproc.producer import Producer

__all__ = ("App", "AppContext", "Hook", "RoutesHook", "load_app")

log = structlog.get_logger("streamproc.app")


@dataclass(kw_only=True)
class AppContext:
    """What startup and shutdown hooks get: the role starting, its Redis and producer.

    ``state`` is the application's own: a startup hook puts what it opened there (a pool, a
    session) and the shutdown hook closes it, like arq's ``ctx`` dict.
    """

    app: App
    #: "consume", "ingest" or "ticker".
    role: str
    redis: aioredis.Redis
    keys: Keys
    producer: Producer
    state: dict[str, Any] = field(default_factory=dict)


#: A startup or shutdown hook.
Hook = Callable[[AppContext], Awaitable[None]]
#: Adds the application's routes to the ingest service's aiohttp app; it gets the ``Ingest``
#: for its Redis client, keys, producer and ``authenticate``. Called once per ingest process.
RoutesHook = Callable[["web.Application", "Ingest"], None]


class App:
    """An application: its events, concerns, schedules, task types, declared groups, hooks.

    Built once at import time and read-only afterwards; everything is checked here, so a
    mistake fails at start with a ConfigError naming it.
    """

    __slots__ = (
        "_configure",
        "codec",
        "commands",
        "concerns",
        "declared_groups",
        "on_shutdown",
        "on_startup",
        "panels",
        "registry",
        "routes",
        "schedules",
        "task_types",
    )

    def __init__(
        self,
        *,
        registry: Registry[Any],
        concerns: Iterable[Concern] = (),
        schedules: Iterable[Schedule] = (),
        task_types: Mapping[str, TaskType] | None = None,
        extra_groups: Mapping[str, Iterable[str]] | None = None,
        commands: Sequence[str] = (),
        routes: Sequence[RoutesHook] = (),
        panels: Sequence[Panel] = (),
        on_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
        configure: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        if not isinstance(registry, Registry):
            raise ConfigError(
                f"App(registry=...) must be a streamproc.codec.Registry, not {registry!r}"
            )
        self.registry: Registry[Any] = registry
        self.codec: Codec[Any] = Codec(registry)
        #: Concerns by group name.
        self.concerns: Mapping[str, Concern] = MappingProxyType(_by_group(concerns, registry))
        #: The ticker's table.
        self.schedules: tuple[Schedule, ...] = _checked_schedules(schedules, registry)
        #: Task types by name: what ``POST /v1/tasks`` accepts.
        self.task_types: Mapping[str, TaskType] = MappingProxyType(
            _checked_task_types(task_types or {}, registry)
        )
        #: topic → every group that must exist on it: each concern's group for each topic it
        #: reads, and the ``extra_groups`` of outside readers. Every role creates them at start,
        #: and trimming never passes one of them.
        self.declared_groups: Mapping[str, tuple[str, ...]] = MappingProxyType(
            _declared_groups(self.concerns.values(), extra_groups or {})
        )
        for hook in (*on_startup, *on_shutdown):
            if not callable(hook):
                raise ConfigError(f"App hooks must be async callables, not {hook!r}")
        if isinstance(commands, str) or not all(isinstance(m, str) for m in commands):
            raise ConfigError("App(commands=...) takes module names, each with register(sub)")
        #: Modules whose ``register(subparsers)`` adds subcommands to ``streamproc``.
        self.commands: tuple[str, ...] = tuple(commands)
        for r in routes:
            if not callable(r):
                raise ConfigError(f"App(routes=...) takes callables (app, ingest), not {r!r}")
        #: Hooks that add routes to the ingest service.
        self.routes: tuple[RoutesHook, ...] = tuple(routes)
        #: Tables the dashboard shows (``streamproc.dashboard.panels``).
        self.panels: tuple[Panel, ...] = _checked_panels(panels)
        self.on_startup: tuple[Hook, ...] = tuple(on_startup)
        self.on_shutdown: tuple[Hook, ...] = tuple(on_shutdown)
        self._configure = configure

    def __repr__(self) -> str:
        return (
            f"App(concerns={sorted(self.concerns)}, types={len(self.registry.by_name)}, "
            f"schedules={len(self.schedules)}, task_types={sorted(self.task_types)})"
        )

    def configure(self, env: Mapping[str, str]) -> None:
        """Read the application's own settings from ``env`` (the roles that consume call it)."""
        if self._configure is not None:
            self._configure(env)

    @contextlib.asynccontextmanager
    async def lifespan(
        self, *, role: str, redis: aioredis.Redis, keys: Keys, producer: Producer
    ) -> AsyncIterator[AppContext]:
        """A role's run: declared groups created, startup hooks, the body, shutdown hooks.

        Shutdown hooks run in their order once every startup hook ran, also when the body
        failed or was cancelled; an error in one is logged and the others still run.
        """
        await ensure_declared_groups(redis, keys, self.declared_groups)
        ctx = AppContext(app=self, role=role, redis=redis, keys=keys, producer=producer)
        for hook in self.on_startup:
            await hook(ctx)
        try:
            yield ctx
        finally:
            for hook in self.on_shutdown:
                try:
                    await hook(ctx)
                except Exception:
                    log.exception("app_shutdown_hook_failed", role=role, hook=_name(hook))


def load_app(spec: str, *, origin: str = "--app") -> App:
    """The App named by ``module:attribute`` (``module`` alone means ``module:app``).

    Every mistake is a ConfigError that says which: the module does not exist, it has no
    such attribute, or the attribute is not an App. ``origin`` names where the spec came from
    (``--app``, ``STREAMPROC_APP``) in the message. An exception other than an import error
    raised while importing the module is the application's own bug and propagates.
    """
    where = f"{origin} {spec!r}"
    module_name, _, attr = spec.strip().partition(":")
    attr = attr or "app"
    parts = module_name.split(".")
    if not all(p.isidentifier() for p in (*parts, *attr.split("."))):
        raise ConfigError(f"{where}: expected MODULE:ATTRIBUTE, e.g. application:app")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise ConfigError(
                f"{where}: no module named {missing!r} (run from the directory that holds "
                "it, or add it to PYTHONPATH)"
            ) from None
        raise ConfigError(f"{where}: importing {module_name!r} failed: {e}") from e
    except ImportError as e:
        raise ConfigError(f"{where}: importing {module_name!r} failed: {e}") from e
    except ConfigError as e:  # the module built an App (or a Concern) that is not valid
        raise ConfigError(f"{where}: {e}") from None
    path = module_name
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise ConfigError(f"{where}: {path!r} has no attribute {name!r}")
        obj, path = getattr(obj, name), f"{path}.{name}"
    if not isinstance(obj, App):
        raise ConfigError(f"{where}: {path} is a {type(obj).__name__}, not a streamproc.app.App")
    return obj


# ---------------------------------------------------------------------- checks


def _by_group(concerns: Iterable[Concern], registry: Registry[Any]) -> dict[str, Concern]:
    out: dict[str, Concern] = {}
    for c in concerns:
        if not isinstance(c, Concern):
            raise ConfigError(f"App(concerns=...) takes Concern objects, not {c!r}")
        if c.group in out:
            raise ConfigError(f"two concerns use the group {c.group!r}")
        for event_type in c.handlers:
            _check_registered(registry, event_type, f"concern {c.group!r} handles")
        out[c.group] = c
    return out


def _checked_schedules(
    schedules: Iterable[Schedule], registry: Registry[Any]
) -> tuple[Schedule, ...]:
    table = tuple(schedules)
    names: set[str] = set()
    for s in table:
        if not isinstance(s, Schedule):
            raise ConfigError(f"App(schedules=...) takes Schedule objects, not {s!r}")
        if s.name in names:
            raise ConfigError(f"two schedules are named {s.name!r}")
        names.add(s.name)
        _check_registered(registry, s.event, f"schedule {s.name!r} fires")
    return table


def _checked_panels(panels: Sequence[Panel]) -> tuple[Panel, ...]:
    if not panels:
        return ()
    # Imported here: the dashboard pulls in aiohttp and the ingest modules, which a role
    # without panels (or a plain ``import streamproc``) does not need.
    from streamproc.dashboard.panels import check_panels

    return check_panels(panels)


def _checked_task_types(
    types: Mapping[str, TaskType], registry: Registry[Any]
) -> dict[str, TaskType]:
    for name, t in types.items():
        if not isinstance(t, TaskType) or t.name != name:
            raise ConfigError(
                f"App(task_types=...) maps each name to its TaskType; {name!r} does not"
            )
    for queue in sorted({t.queue for t in types.values()}):
        for event_type in task_events(queue):
            _check_registered(
                registry, event_type, f"task requests of queue {queue!r} (task_events) are"
            )
    return dict(types)


def _check_registered(registry: Registry[Any], event_type: type[Any], what: str) -> None:
    name = event_type.type_name()
    if registry.by_name.get(name) is not event_type:
        raise ConfigError(
            f"{what} {name!r} ({event_type.__name__}), which is not in the app's registry"
        )


def _declared_groups(
    concerns: Iterable[Concern], extra: Mapping[str, Iterable[str]]
) -> dict[str, tuple[str, ...]]:
    groups: dict[str, set[str]] = {}
    for c in concerns:
        for topic in c.topics:
            groups.setdefault(topic, set()).add(c.group)
    for topic, names in extra.items():
        if isinstance(names, str):
            raise ConfigError(f"extra_groups[{topic!r}] must be a sequence of group names")
        check_name("topic", topic)
        for g in names:
            groups.setdefault(topic, set()).add(check_name("group", g))
    return {topic: tuple(sorted(gs)) for topic, gs in sorted(groups.items())}


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)
