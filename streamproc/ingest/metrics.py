"""Prometheus metrics of the ingest service (the task metrics are ``streamproc.tasks.metrics``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

__all__ = (
    "EVENTS",
    "REJECTIONS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "answered",
    "events",
)

REQUESTS = Counter(
    "streamproc_ingest_requests", "HTTP requests answered", ["route", "method", "status"]
)
EVENTS = Counter("streamproc_ingest_events", "Events accepted (202) by type", ["type"])
REJECTIONS = Counter(
    "streamproc_ingest_rejections", "Requests refused, by reason (the error code)", ["reason"]
)
REQUEST_SECONDS = Histogram(
    "streamproc_ingest_request_duration_seconds",
    "Time from request start to response, by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
#: Labelled children, looked up once: ``labels()`` costs microseconds on every request.
_children: dict[tuple[Any, ...], Any] = {}


def answered(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its duration."""
    key = (route, method, status)
    pair = _children.get(key)
    if pair is None:
        pair = _children[key] = (
            REQUESTS.labels(route, method, str(status)),
            REQUEST_SECONDS.labels(route),
        )
    pair[0].inc()
    pair[1].observe(seconds)


def events(type_name: str) -> Any:
    """The accepted-events counter of one type."""
    key = ("events", type_name)
    child = _children.get(key)
    if child is None:
        child = _children[key] = EVENTS.labels(type_name)
    return child
