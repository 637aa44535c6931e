"""``/openapi.json``: OpenAPI 3.1 built from the msgspec types the handlers decode and answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from streamproc.event import Event
from streamproc.ingest.compat import (
    CompatAccepted,
    CompatHealth,
    CompatMetrics,
    CompatSubmit,
    CompatTask,
    SeedCall,
)
from streamproc.ingest.schedules import ScheduleIn
from streamproc.ingest.tasks import TaskAccepted, TaskSubmit
from streamproc.scheduler import SCHEDULE_NAME_RE, ScheduleInfo
from streamproc.tasks.store import TaskView

if TYPE_CHECKING:
    from streamproc.tasks.runner import TaskType

__all__ = ("ErrorBody", "EventsAccepted", "build_spec")


class ItemErrorBody(msgspec.Struct, kw_only=True):
    index: int
    path: str
    error: str
    reason: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every refusal: a code, a reason for a person, and where it applies."""

    error: str
    detail: Any
    #: JSON path of the bad value, e.g. ``$[3].cluster_id``.
    path: str | None = None
    #: Every invalid item of a batch (422).
    errors: list[ItemErrorBody] | None = None
    known_types: list[str] | None = None
    #: Byte offset of a malformed body (400).
    position: int | None = None
    #: NDJSON line of a malformed body (400).
    line: int | None = None
    limit: int | None = None
    accepted: list[str] | None = None
    allowed: list[str] | None = None
    #: The task's end status (409).
    task_status: str | None = None
    #: The lagging topic and group (503 backpressure).
    topic: str | None = None
    group: str | None = None


class AcceptedEvent(msgspec.Struct, kw_only=True):
    id: str
    #: The Redis stream entry id (the broker's position).
    entry_id: str


class EventsAccepted(msgspec.Struct, kw_only=True):
    """202: every event is in Redis."""

    accepted: int
    received_at: str
    events: list[AcceptedEvent]


def _error_responses(*codes: int) -> dict[str, Any]:
    why = {
        400: "malformed body (position given)",
        401: "missing or bad bearer token",
        403: "outside the agent's scopes / not an operator",
        404: "no such task",
        408: "the body did not arrive in time (the connection is closed)",
        409: "the task already finished",
        413: "body or batch too large",
        415: "unsupported Content-Type",
        422: "validation failed (JSON path and reason per item)",
        429: "rate limited (see Retry-After)",
        503: "backpressure, Redis unavailable or too many bodies in flight (see Retry-After)",
    }
    return {
        str(c): {
            "description": why[c],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for c in codes
    }


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _ok(status: int, ref: str, description: str) -> dict[str, Any]:
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }
    }


def _compat_paths(op: list[dict[str, list[str]]], task_param: dict[str, Any]) -> dict[str, Any]:
    """Seed 003's worker-node routes (``streamproc.ingest.compat``)."""
    submit_errors = _error_responses(400, 401, 403, 408, 409, 413, 415, 422, 503)
    submit_errors["409"] = {
        **submit_errors["409"],
        "description": "task_id belongs to another submitter's task",
    }
    submit_errors["503"] = {
        **submit_errors["503"],
        "description": "every runner of the queue sheds load, backpressure, Redis "
        "unavailable or too many bodies in flight (see Retry-After)",
    }
    return {
        "/task/submit": {
            "post": {
                "summary": "Submit a task with seed 003's body (operator or submit token)",
                "description": "The type is `task_type`, else `payload.function`; the payload "
                "goes to the type as it is (a type taking `{function, args, kwargs}` declares "
                "SeedCall). A client-chosen `task_id` (or an Idempotency-Key) names the same "
                "task again: no second run. 422s give the JSON path of the bad value.",
                "security": op,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    }
                ],
                "requestBody": _json_body(
                    {"$ref": "#/components/schemas/CompatSubmit"}, "the seed's task request"
                ),
                "responses": {**_ok(200, "CompatAccepted", "queued"), **submit_errors},
            }
        },
        "/task/{task_id}": {
            "get": {
                "summary": "A task in seed 003's fields (a cancelled task: status failed, "
                "state cancelled), then ours; another agent's task is a 404",
                "security": op,
                "parameters": [task_param],
                "responses": {
                    **_ok(200, "CompatTask", "the task"),
                    **_error_responses(401, 403, 404, 503),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "Seed 003's health over the live task runners and this ingest "
                "(degraded: no live runner, or all shed load)",
                "security": op,
                "responses": {
                    **_ok(200, "CompatHealth", "healthy or degraded"),
                    **_error_responses(401, 403, 503),
                },
            }
        },
    }


def build_spec(
    event_types: Sequence[type[Event]], task_types: Mapping[str, TaskType], *, max_batch: int
) -> dict[str, Any]:
    union: Any = None
    for t in event_types:
        union = t if union is None else union | t
    payloads = [t.payload_type for t in task_types.values() if t.payload_type is not dict]
    (union_schema, *_), components = msgspec.json.schema_components(
        [
            union,
            ErrorBody,
            EventsAccepted,
            TaskSubmit,
            TaskAccepted,
            TaskView,
            ScheduleIn,
            ScheduleInfo,
            CompatSubmit,
            CompatAccepted,
            CompatTask,
            CompatHealth,
            CompatMetrics,
            SeedCall,
            *payloads,
        ],
        ref_template="#/components/schemas/{name}",
    )
    events_body = {
        "anyOf": [
            union_schema,
            {"type": "array", "items": union_schema, "minItems": 1, "maxItems": max_batch},
        ]
    }
    events_errors = _error_responses(400, 401, 403, 408, 413, 415, 422, 429, 503)
    post_events = {
        "summary": "Post one event (object) or a batch (array); all-or-nothing",
        "description": "Also accepts NDJSON (application/x-ndjson) and msgpack "
        "(application/msgpack). `source` and `received_at` are set by the server. An "
        "`Idempotency-Key` header (per item `KEY:index` in a batch) makes a retry return the "
        "same ids without a second entry.",
        "security": [{"bearer": []}],
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
            }
        ],
        "requestBody": _json_body(events_body, "an event, or an array of events"),
        "responses": {**_ok(202, "EventsAccepted", "published"), **events_errors},
    }
    cluster_param = {
        "name": "cluster_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 253},
    }
    task_param = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }
    schedule_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": SCHEDULE_NAME_RE.pattern},
    }
    op: list[dict[str, list[str]]] = [{"bearer": []}]
    task_types_doc = ", ".join(
        f"`{n}` (payload: {getattr(t.payload_type, '__name__', 'object')})"
        for n, t in sorted(task_types.items())
    )
    plain = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "streamproc ingest", "version": "1"},
        "paths": {
            "/v1/events": {"post": post_events},
            "/clusters/{cluster_id}/events": {
                "post": {
                    **post_events,
                    "summary": "The seed agents' route: the path's cluster id goes into each event",
                    "parameters": [*post_events["parameters"], cluster_param],
                }
            },
            "/v1/tasks": {
                "post": {
                    "summary": "Submit a task (operator token)",
                    "description": f"Task types: {task_types_doc or 'none'}.",
                    "security": op,
                    "parameters": post_events["parameters"],
                    "requestBody": _json_body({"$ref": "#/components/schemas/TaskSubmit"}, "task"),
                    "responses": {
                        **_ok(202, "TaskAccepted", "queued"),
                        **_error_responses(400, 401, 403, 408, 413, 415, 422, 503),
                    },
                }
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "A task's status, progress, result or error (kept 24 h)",
                    "security": op,
                    "parameters": [task_param],
                    "responses": {
                        **_ok(200, "TaskView", "the task"),
                        **_error_responses(401, 403, 404, 503),
                    },
                },
                "delete": {
                    "summary": "Cancel: a queued task now (200), a running one cooperatively (202)",
                    "security": op,
                    "parameters": [task_param],
                    "responses": {
                        **_ok(200, "TaskView", "cancelled"),
                        **_ok(202, "TaskView", "cancelling"),
                        **_error_responses(401, 403, 404, 409, 503),
                    },
                },
            },
            "/v1/schedules": {
                "get": {
                    "summary": "Runtime schedules, a page: {schedules: [ScheduleInfo], cursor, "
                    "total} (operator token; query: prefix, limit 1..1000, cursor)",
                    "security": op,
                    "responses": {
                        "200": {**plain, "description": "a page; cursor 0 at the end"},
                        **_error_responses(400, 401, 403, 503),
                    },
                }
            },
            "/v1/schedules/{name}": {
                "get": {
                    "summary": "One runtime schedule: {schedule: ScheduleInfo}",
                    "security": op,
                    "parameters": [schedule_param],
                    "responses": {
                        "200": {**plain, "description": "the schedule"},
                        **_error_responses(400, 401, 403, 404, 503),
                    },
                },
                "put": {
                    "summary": "Create (201) or change (200) a runtime schedule: "
                    "{schedule: ScheduleInfo, changed}",
                    "security": op,
                    "parameters": [schedule_param],
                    "requestBody": _json_body(
                        {"$ref": "#/components/schemas/ScheduleIn"}, "the schedule"
                    ),
                    "responses": {
                        "200": {**plain, "description": "changed, or identical"},
                        "201": {**plain, "description": "created"},
                        **_error_responses(400, 401, 403, 408, 413, 415, 503),
                    },
                },
                "delete": {
                    "summary": "Remove a runtime schedule (204)",
                    "security": op,
                    "parameters": [schedule_param],
                    "responses": {
                        "204": {"description": "removed"},
                        **_error_responses(400, 401, 403, 404, 503),
                    },
                },
            },
            "/healthz": {
                "get": {"summary": "alive", "responses": {"200": {**plain, "description": "alive"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Redis reachable and the consumer groups exist",
                    "responses": {
                        "200": {**plain, "description": "ready"},
                        "503": {**plain, "description": "not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics; JSON task counts (seed 003's /metrics, "
                    "bearer token) when Accept prefers application/json",
                    "responses": {
                        "200": {
                            "description": "exposition format, or CompatMetrics",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/CompatMetrics"}
                                },
                            },
                        },
                        **_error_responses(401, 403, 503),
                    },
                }
            },
            **_compat_paths(op, task_param),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
