"""A tiny application for the cluster tests: its effects keep their state in the slot of the
event's topic (or partition) with ``ctx.keys.topic_state``, as every effect must on a cluster.

``streamproc --app tests.cluster_app:app consume counter`` runs it.
"""

from __future__ import annotations

from typing import ClassVar

from streamproc.app import App
from streamproc.codec import Registry
from streamproc.concern import Concern, Context
from streamproc.event import Event

__all__ = ("Count", "app")


class Count(Event, frozen=True, kw_only=True, tag="ctest.count"):
    topic: ClassVar[str] = "counts"
    n: int = 1


async def on_count(event: Count, ctx: Context) -> None:
    ctx.effect("HINCRBY", ctx.keys.topic_state(ctx.topic, "sums"), event.key, event.n)


app = App(
    registry=Registry([Count]),
    concerns=[Concern(group="counter", topics=("counts",), handlers={Count: on_count})],
)
