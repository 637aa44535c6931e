"""Render jobs and their outcomes (WORKLOADS §1 weekly report, §3 render/preview queues).

``render.requested`` on ``renders`` asks the render concern for a job; progress goes to
``render-progress`` (a stream clients follow with XREAD); outcomes are ``render.done`` and,
for reports, ``report.ready`` on ``reports``.

None is ``external``: the render concern asks for jobs itself (from the weekly-report tick) and
operators with ``streamproc publish``; an agent's ``render.requested`` would take the GPU pool,
a forged ``report.ready`` would mail any link to every subscriber.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

import msgspec

from streamproc.event import Event

__all__ = ("RenderDone", "RenderKind", "RenderProgress", "RenderRequested", "ReportReady")

RenderKind = Literal["report", "render", "preview"]
Small = Annotated[int, msgspec.Meta(ge=1, le=4096)]


class RenderRequested(Event, frozen=True, kw_only=True, tag="render.requested"):
    """Run one render job. The event id is the job id."""

    topic: ClassVar[str] = "renders"
    external: ClassVar[bool] = False
    kind: RenderKind
    #: report: the end of the reported period (exclusive); default: when the request happened.
    period_end: datetime | None = None
    period_days: Annotated[int, msgspec.Meta(ge=1, le=92)] = 7
    #: frame renders (render / preview): image size, frame count and scene seed.
    width: Small = 256
    height: Small = 256
    frames: Annotated[int, msgspec.Meta(ge=1, le=600)] = 1
    seed: int = 0
    #: The event that asked for it (e.g. the weekly-report tick).
    cause_id: str = ""


class RenderProgress(Event, frozen=True, kw_only=True, tag="render.progress"):
    """A job's state, for clients following ``render-progress`` (advisory, not deduplicated)."""

    topic: ClassVar[str] = "render-progress"
    external: ClassVar[bool] = False
    job_id: str
    kind: str
    state: Literal["queued", "running", "progress", "done", "failed"]
    fraction: float = 0.0
    message: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class RenderDone(Event, frozen=True, kw_only=True, tag="render.done"):
    """A frame/preview render finished and was stored."""

    topic: ClassVar[str] = "renders-done"
    external: ClassVar[bool] = False
    job_id: str
    kind: str
    location: str
    device: str = "cpu"
    cause_id: str = ""


class ReportReady(Event, frozen=True, kw_only=True, tag="report.ready"):
    """A report was rendered and stored; ``location`` is its HTML summary."""

    topic: ClassVar[str] = "reports"
    external: ClassVar[bool] = False
    job_id: str
    location: str
    #: Every stored file (charts and the summary).
    files: list[str] = msgspec.field(default_factory=list)
    period_start: datetime | None = None
    period_end: datetime | None = None
    cause_id: str = ""
