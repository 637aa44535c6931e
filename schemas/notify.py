"""What the cluster-event processor emits: notifications and recommendations.

Pass them through ``fit`` before publishing: their text comes from agents (a pod name, a
node's reason), and a notification over its own schema's limits is published fine but
refused by every consumer of ``notify`` (dead-lettered, never delivered).
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec

from streamproc.event import Event
from streamproc.printable import NO_CONTROL_PATTERN, printable

__all__ = (
    "DeliveryRequested",
    "Message",
    "Notification",
    "PodPendingClassified",
    "RightSizingRecommendation",
    "clip",
    "fit",
)

_S = TypeVar("_S", bound=msgspec.Struct)


def clip(text: str, max_length: int) -> str:
    """``text`` cut to ``max_length`` characters, the cut marked with "…"."""
    return text if len(text) <= max_length else text[: max_length - 1] + "…"


@functools.cache
def _text_limits(cls: type[msgspec.Struct]) -> tuple[tuple[str, int | None, bool], ...]:
    """(field, max_length, printable only) of each string field of ``cls`` with a limit."""
    info = msgspec.inspect.type_info(cls)
    if not isinstance(info, msgspec.inspect.StructType):
        raise TypeError(f"{cls.__name__} is not a msgspec Struct")
    return tuple(
        (f.name, f.type.max_length, f.type.pattern == NO_CONTROL_PATTERN)
        for f in info.fields
        if isinstance(f.type, msgspec.inspect.StrType)
        and (f.type.max_length is not None or f.type.pattern == NO_CONTROL_PATTERN)
    )


def fit(obj: _S) -> _S:
    """``obj`` with its string fields made to fit its own schema, whatever text they were built
    from: each cut to its ``max_length`` (``clip``), control characters escaped where the
    schema refuses them (``key``, ``source``). What it returns decodes wherever it is read.

    Constructing a Struct checks no constraint (decoding does), so build it as usual and pass
    it through this before publishing: ``fit(Notification(title=f"... {agent_text}"))``.
    """
    changes: dict[str, Any] = {}
    for name, max_length, no_control in _text_limits(type(obj)):
        value = getattr(obj, name)
        if not isinstance(value, str):
            continue
        fitted = printable(value) if no_control else value
        if max_length is not None:
            fitted = clip(fitted, max_length)
        if fitted is not value:
            changes[name] = fitted
    return msgspec.structs.replace(obj, **changes) if changes else obj


class Notification(Event, frozen=True, kw_only=True, tag="notify.notification"):
    """Something subscribers of a cluster should hear about."""

    topic: ClassVar[str] = "notify"
    #: Notifications are the application's conclusions (``cluster-events``, the optimizer,
    #: discovery, the monitors); an agent posting one would speak to any cluster's
    #: subscribers in the application's name. The same for the two below.
    external: ClassVar[bool] = False
    cluster_id: str
    severity: Literal["info", "warning", "critical"] = "info"
    title: Annotated[str, msgspec.Meta(max_length=512)]
    body: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    #: Where to read more (optional; channels fall back to the dashboard).
    link: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    #: The event that caused it.
    cause_id: str = ""


class RightSizingRecommendation(Event, frozen=True, kw_only=True, tag="notify.rightsizing"):
    topic: ClassVar[str] = "notify"
    external: ClassVar[bool] = False
    cluster_id: str
    namespace: str
    workload: str
    container: str
    current_limit_bytes: int
    recommended_limit_bytes: int
    cause_id: str = ""


class PodPendingClassified(Event, frozen=True, kw_only=True, tag="notify.pod_pending"):
    topic: ClassVar[str] = "notify"
    external: ClassVar[bool] = False
    cluster_id: str
    namespace: str
    pod: str
    category: Literal[
        "insufficient_cpu",
        "insufficient_memory",
        "insufficient_gpu",
        "node_selector",
        "taints",
        "volume",
        "unknown",
    ]
    cause_id: str = ""


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """A notification as every channel renders it (built from any ``notify``/``reports``
    event by ``notifications.message_of``)."""

    notification_id: str
    #: The type of the event it came from (``notify.notification``, ``report.ready`` ...).
    type: str
    #: The cluster (tenant) it is about; empty for reports, which are not about one cluster.
    cluster_id: str = ""
    severity: Literal["info", "warning", "critical"] = "info"
    title: Annotated[str, msgspec.Meta(max_length=512)]
    body: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    #: Where to read more (the dashboard, the report).
    link: str = ""
    occurred_at: datetime
    #: ``report.ready``: the HTML summary and every stored file (charts).
    report_location: str = ""
    report_files: list[str] = msgspec.field(default_factory=list)


class DeliveryRequested(Event, frozen=True, kw_only=True, tag="notify.delivery"):
    """Send one notification to one subscription (the event id is the delivery id, derived
    from the notification's id and the subscription's, so a fan-out that runs twice asks
    once)."""

    topic: ClassVar[str] = "deliveries"
    #: Only the fan-out publishes deliveries: an agent could otherwise send anything to any
    #: subscriber's destination.
    external: ClassVar[bool] = False
    subscription_id: str
    message: Message
