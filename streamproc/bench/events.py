"""The benchmark's own event and application: the bench measures the engine, no domain.

The bench does not borrow an application's event types. Its consumers (``sink``) and load
generator (``loadgen``) use ``BenchEvent`` with this module's registry, and its ingest process
runs this module's ``app`` (``streamproc --app streamproc.bench.events:app ingest``), so the
ingest accepts bench events there and nowhere else: the repository's application does not
register them, and its ingest refuses them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from streamproc.app import App
from streamproc.codec import Registry
from streamproc.event import Event

__all__ = ("APP_SPEC", "GROUP", "REGISTRY", "BenchEvent", "app")

#: The consumer group of the measuring consumers.
GROUP = "bench"
#: How the bench names its app on a child's command line.
APP_SPEC = "streamproc.bench.events:app"


class BenchEvent(Event, frozen=True, kw_only=True, tag="bench.event"):
    """Event ``seq`` of a run; ``occurred_at`` is its intended send time, ``pad`` its filler.

    ``sent_at`` (``time.time()``, 0 when unknown) is when the load generator handed it to the
    publish call: handler start minus ``sent_at`` is the engine's part of the latency alone,
    handler start minus ``occurred_at`` the whole (the generator's lateness included).
    """

    topic: ClassVar[str] = "bench"
    seq: int
    pad: str = ""
    sent_at: float = 0.0


REGISTRY: Registry[Any] = Registry([BenchEvent])

#: Ingest-only: the measuring consumers are built by the sink process itself, with a handler
#: of its own per run; their group is declared here so the ingest creates it and checks it.
app = App(registry=REGISTRY, extra_groups={BenchEvent.topic: (GROUP,)})
