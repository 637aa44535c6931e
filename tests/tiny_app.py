"""A tiny application of the engine's tests: no schemas, consumers or producers of this repo.

``streamproc --app tests.tiny_app:app ...`` runs it. Its hooks write the role that started and
stopped into Redis, so tests see that every role ran them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from streamproc.app import App, AppContext
from streamproc.codec import Registry
from streamproc.concern import Concern, Context
from streamproc.event import Event
from streamproc.schedule import Schedule, Tick, every

__all__ = ("GROUPS", "Ping", "TinyTick", "app")


class Ping(Event, frozen=True, kw_only=True, tag="tiny.ping"):
    topic: ClassVar[str] = "tiny"
    n: int = 0


class TinyTick(Tick, frozen=True, kw_only=True, tag="tiny.tick"):
    """Fires hourly: the ticker role has a table, the tests do not wait for it."""


async def on_ping(event: Ping, ctx: Context) -> None:
    ctx.effect("INCRBY", ctx.keys.state("tiny", "pings"), event.n)


async def started(ctx: AppContext) -> None:
    ctx.state["role"] = ctx.role
    await ctx.redis.rpush(ctx.keys.state("tiny", "hooks"), f"start:{ctx.role}")


async def stopped(ctx: AppContext) -> None:
    await ctx.redis.rpush(ctx.keys.state("tiny", "hooks"), f"stop:{ctx.state['role']}")


CONCERN = Concern(group="tiny-counter", topics=("tiny",), handlers={Ping: on_ping})

app = App(
    registry=Registry([Ping, TinyTick]),
    concerns=[CONCERN],
    schedules=[Schedule(name="tiny", trigger=every("1 h"), event=TinyTick)],
    # An outside system reads "tiny" with the group "audit": every role creates it too.
    extra_groups={"tiny": ("audit",)},
    on_startup=[started],
    on_shutdown=[stopped],
)

#: What every role creates at start: topic -> groups.
GROUPS: dict[str, tuple[str, ...]] = {"tiny": ("audit", "tiny-counter")}

#: The same app with a subcommand of its own (``tiny-hello``, from tests/tiny_commands.py).
with_commands = App(
    registry=app.registry,
    concerns=[CONCERN],
    schedules=app.schedules,
    commands=["tests.tiny_commands"],
)
#: Names a module without ``register``: the CLI refuses it (exit 2).
with_bad_commands = App(registry=app.registry, commands=["tests.tiny_app"])

#: Not an App: ``--app tests.tiny_app:not_an_app`` is refused.
not_an_app: Any = {"registry": None}
