"""Worker monitoring (seed 001, docs/workers.md): a monitored worker is an EC2 instance.

Inputs (topic ``workers``, ``external``: agents and operators may post them through ingest):
``worker.created``, ``worker.imported`` (startup discovery) and ``worker.terminated``.
Outputs (topic ``worker-events``, published by the ``worker-monitor`` concern only):
``worker.metrics`` after every poll and ``worker.status_changed`` when the EC2 state moved.
``tick.worker_poll`` is the per-worker schedule's tick (``key`` = the worker id), on its own
topic ``worker-ticks`` so the shared ``ticks`` groups do not read one entry per worker poll.

Every field is checked when the event is decoded (ingest, ``streamproc publish``, the CLI), so
a bad worker id, instance id, threshold or a huge string is refused with the field's path.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, ClassVar, Literal

import msgspec

from streamproc.event import Event
from streamproc.printable import NO_CONTROL_PATTERN
from streamproc.schedule import Tick

__all__ = (
    "ACCOUNT_RE",
    "INSTANCE_RE",
    "REGION_RE",
    "STATUSES",
    "TYPES",
    "WORKER_ID_RE",
    "WorkerCreated",
    "WorkerImported",
    "WorkerMetrics",
    "WorkerPollTick",
    "WorkerStatus",
    "WorkerStatusChanged",
    "WorkerTerminated",
)

WORKER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
INSTANCE_RE = re.compile(r"i-[0-9a-f]{8,17}")
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
ACCOUNT_RE = re.compile(r"[0-9]{12}")

WorkerId = Annotated[str, msgspec.Meta(pattern=f"^{WORKER_ID_RE.pattern}$", max_length=64)]
InstanceId = Annotated[str, msgspec.Meta(pattern=f"^{INSTANCE_RE.pattern}$", max_length=19)]
Region = Annotated[str, msgspec.Meta(pattern=f"^{REGION_RE.pattern}$", max_length=32)]
#: Empty = the account of the base credentials (those that assume the registered roles).
AccountId = Annotated[str, msgspec.Meta(pattern=f"^({ACCOUNT_RE.pattern})?$", max_length=12)]
#: Printable, one line (``$`` alone let a final newline through).
Name = Annotated[str, msgspec.Meta(pattern=NO_CONTROL_PATTERN, max_length=200)]
Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]
IntervalS = Annotated[int, msgspec.Meta(ge=5, le=86_400)]

#: A worker's status: the EC2 instance state (``shutting-down`` is ``terminating``), or
#: ``unknown`` before the first successful poll.
WorkerStatus = Literal[
    "unknown", "pending", "running", "stopping", "stopped", "terminating", "terminated"
]
STATUSES: tuple[str, ...] = (
    "unknown",
    "pending",
    "running",
    "stopping",
    "stopped",
    "terminating",
    "terminated",
)


class _WorkerSpec(Event, frozen=True, kw_only=True, tag="worker.spec"):
    """What a worker is: shared by ``worker.created`` and ``worker.imported`` (not published)."""

    topic: ClassVar[str] = "workers"
    worker_id: WorkerId
    name: Name = ""
    instance_id: InstanceId
    region: Region
    account_id: AccountId = ""
    #: Per-worker thresholds (percent); None = the settings' default (90).
    cpu_threshold: Percent | None = None
    memory_threshold: Percent | None = None
    #: Seconds between polls; None = the settings' default (300).
    interval_s: IntervalS | None = None


class WorkerCreated(_WorkerSpec, frozen=True, kw_only=True, tag="worker.created"):
    """A worker to monitor. Sent again for the same worker (same instance), it updates the
    name, thresholds and interval; a terminated worker id is refused for 7 days."""


class WorkerImported(_WorkerSpec, frozen=True, kw_only=True, tag="worker.imported"):
    """A tagged instance found by discovery; never overwrites a worker that exists."""


class WorkerTerminated(Event, frozen=True, kw_only=True, tag="worker.terminated"):
    """Stop monitoring a worker and forget it (its id is refused for 7 days)."""

    topic: ClassVar[str] = "workers"
    worker_id: WorkerId
    reason: Annotated[str, msgspec.Meta(max_length=512)] = ""


class WorkerMetrics(Event, frozen=True, kw_only=True, tag="worker.metrics"):
    """One poll's outcome (published for every successful poll)."""

    topic: ClassVar[str] = "worker-events"
    external: ClassVar[bool] = False
    worker_id: str
    name: str = ""
    instance_id: str
    region: str
    account_id: str = ""
    status: WorkerStatus
    #: Averages over the last interval (CloudWatch); None without data or when not running.
    cpu: float | None = None
    memory: float | None = None
    polled_at: datetime
    #: The poll tick.
    cause_id: str = ""


class WorkerStatusChanged(Event, frozen=True, kw_only=True, tag="worker.status_changed"):
    topic: ClassVar[str] = "worker-events"
    external: ClassVar[bool] = False
    worker_id: str
    instance_id: str
    before: WorkerStatus
    after: WorkerStatus
    cause_id: str = ""


class WorkerPollTick(Tick, frozen=True, kw_only=True, tag="tick.worker_poll"):
    """Poll one worker (``key`` = worker id), fired by its runtime schedule ``worker.<id>``."""

    topic: ClassVar[str] = "worker-ticks"
    #: Only the ticker fires it: a posted one would make AWS calls on anyone's behalf.
    external: ClassVar[bool] = False


#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Event], ...] = (
    WorkerCreated,
    WorkerImported,
    WorkerTerminated,
    WorkerMetrics,
    WorkerStatusChanged,
    WorkerPollTick,
)
