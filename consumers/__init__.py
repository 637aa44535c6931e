"""One module per concern (= one consumer group); ``CONCERNS`` lists them by group name."""

from __future__ import annotations

from consumers import cluster_events, renders, tasks
from streamproc.concern import Concern

__all__ = ("CONCERNS",)

CONCERNS: dict[str, Concern] = {
    c.group: c for c in (cluster_events.CONCERN, tasks.CONCERN, renders.CONCERN)
}
