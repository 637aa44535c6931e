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
from streamproc.printable import NO_CONTROL_PATTERN
from streamproc.scheduler import SCHEDULE_NAME_RE, ScheduleInfo
from streamproc.tasks.history import CURSOR_PATTERN
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
        429: "rate_limited: over the agent's rate; too_many_failures: too many unknown tokens "
        "from this address (see Retry-After)",
        503: "backpressure, Redis unavailable or too many bodies in flight (see Retry-After)",
    }
    return {str(c): _error(c, why[c]) for c in codes}


def _error(status: int, description: str) -> dict[str, Any]:
    """One refusal: an ``ErrorBody``, with the headers that status carries."""
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    header = _HEADERS.get(status)
    if header is not None:
        out["headers"] = {header[0]: {"description": header[1], "schema": {"type": "string"}}}
    return out


_HEADERS = {
    401: ("WWW-Authenticate", 'Bearer realm="streamproc"'),
    429: ("Retry-After", "seconds"),
    503: ("Retry-After", "seconds"),
}
#: Every route that takes a bearer token may answer these: no/bad token, too many unknown
#: tokens from the caller's address (``Ingest.authenticate``), Redis down during the lookup.
_AUTH = (401, 429, 503)


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _ok(status: int, ref: str | dict[str, Any], description: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"} if isinstance(ref, str) else ref
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: Sequence[str] = (), **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


# ---------------------------------------------------------------------- schema fixes


def _datetimes(types: Sequence[Any], components: dict[str, Any]) -> None:
    """``format: date-time`` on every datetime field of the structs' schemas.

    msgspec leaves it out where a naive datetime is accepted too (``datetime | None``); the
    server wants RFC 3339 there all the same, so a client must be told.
    """
    seen: set[type] = set()

    def walk(t: Any, schema: dict[str, Any] | None) -> None:
        mi = msgspec.inspect
        if isinstance(t, mi.DateTimeType):
            if schema is not None and schema.get("type") == "string":
                schema.setdefault("format", "date-time")
        elif isinstance(t, mi.UnionType):
            for member in t.types:
                for branch in (schema or {}).get("anyOf", [schema]):
                    if isinstance(member, mi.DateTimeType) and branch is not None:
                        walk(member, branch)
                    elif not isinstance(member, mi.DateTimeType):
                        walk(member, None)
        elif isinstance(t, mi.StructType) and t.cls not in seen:
            seen.add(t.cls)
            own = components.get(t.cls.__name__, {}).get("properties", {})
            for f in t.fields:
                walk(f.type, own.get(f.encode_name))
        elif isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            walk(t.item_type, None)
        elif isinstance(t, mi.DictType):
            walk(t.value_type, None)

    for info in msgspec.inspect.multi_type_info(list(types)):
        walk(info, None)


def _without_cluster_id(union: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """The event union for ``/clusters/{cluster_id}/events``: no ``cluster_id`` in the body,
    and ``key`` may be null.

    The path names the cluster; a body that repeats it must repeat it exactly (else 422
    ``cluster_mismatch``), which JSON Schema cannot say, so the document leaves it out. An
    empty or null ``key`` becomes the cluster id.
    """
    refs = union.get("anyOf", [union] if "$ref" in union else [])
    if not refs:  # no postable type: nothing is valid on either route
        return union
    out: list[dict[str, str]] = []
    mapping: dict[str, str] = {}
    for ref in refs:
        name = ref["$ref"].rsplit("/", 1)[1]
        schema = components[name]
        props = schema.get("properties", {})
        name += "AtCluster"
        components[name] = {
            **schema,
            "title": name,
            "properties": {
                **{k: v for k, v in props.items() if k != "cluster_id"},
                # Empty or null: the path's cluster id (per-cluster ordering).
                "key": {"anyOf": [props["key"], {"type": "null"}]},
            },
            "required": [r for r in schema.get("required", []) if r != "cluster_id"],
        }
        out.append(_ref(name))
        tag = props["type"]["enum"][0]
        mapping[tag] = f"#/components/schemas/{name}"
    return {"anyOf": out, "discriminator": {"propertyName": "type", "mapping": mapping}}


def _payload_schema(payload_type: Any, components: dict[str, Any]) -> tuple[Any, bool]:
    """A task type's payload schema, and whether a body must carry it (no usable default)."""
    if payload_type is dict:
        return {"type": "object"}, False
    try:
        msgspec.convert({}, payload_type)
    except msgspec.ValidationError:
        required = True
    else:
        required = False
    return _ref(payload_type.__name__), required


def _takes_function(payload_type: Any) -> bool:
    """Can ``payload.function`` name the type (seed 003's body)? A dict, or a struct with a
    ``function`` field or that allows unknown fields."""
    if payload_type is dict:
        return True
    fields = getattr(payload_type, "__struct_fields__", ())
    config = getattr(payload_type, "__struct_config__", None)
    return "function" in fields or not getattr(config, "forbid_unknown_fields", True)


def _task_bodies(
    task_types: Mapping[str, TaskType], components: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bodies of ``POST /v1/tasks`` and ``POST /task/submit``: one variant per task type
    (its name and its payload's schema), so a schema-valid body names a known type."""
    if not task_types:
        return _ref("TaskSubmit"), _ref("CompatSubmit")
    v1, compat = [], []
    base, seed = components["TaskSubmit"], components["CompatSubmit"]
    for name, tt in sorted(task_types.items()):
        payload, must = _payload_schema(tt.payload_type, components)
        v1.append(
            {
                **base,
                "title": f"TaskSubmit[{name}]",
                "properties": {**base["properties"], "type": {"const": name}, "payload": payload},
                "required": ["type", *(["payload"] if must else [])],
            }
        )
        compat.append(
            {
                **seed,
                "title": f"CompatSubmit[{name}]",
                "properties": {
                    **seed["properties"],
                    "task_type": {"const": name},
                    "payload": payload,
                },
                "required": ["payload", "task_type"],
            }
        )
        if _takes_function(tt.payload_type):
            named = {"allOf": [payload, _obj(["function"], function={"const": name})]}
            props = {k: v for k, v in seed["properties"].items() if k != "task_type"}
            compat.append(
                {
                    **seed,
                    "title": f"CompatSubmit[{name}] (payload.function)",
                    "properties": {**props, "task_type": {"type": "null"}, "payload": named},
                    "required": ["payload"],
                }
            )
    return {"oneOf": v1}, {"oneOf": compat}


# ---------------------------------------------------------------------- paths


def _compat_paths(
    op: list[dict[str, list[str]]],
    task_param: dict[str, Any],
    idem: list[dict[str, Any]],
    body: dict[str, Any],
) -> dict[str, Any]:
    """Seed 003's worker-node routes (``streamproc.ingest.compat``)."""
    submit_errors = _error_responses(400, *_AUTH, 403, 408, 409, 413, 415, 422)
    submit_errors["409"] = _error(409, "task_id belongs to another submitter's task")
    submit_errors["503"] = _error(
        503,
        "every runner of the queue sheds load, backpressure, Redis unavailable or too many "
        "bodies in flight (see Retry-After)",
    )
    get_task = {
        "summary": "A task in seed 003's fields (a cancelled task: status failed, "
        "state cancelled), then ours; another agent's task is a 404",
        "security": op,
        "parameters": [task_param],
        "responses": {
            **_ok(200, "CompatTask", "the task"),
            **_error_responses(*_AUTH, 403, 404),
        },
    }
    return {
        "/task/submit": {
            "post": {
                "summary": "Submit a task with seed 003's body (operator or submit token)",
                "description": "The type is `task_type`, else `payload.function` (only for a "
                "type whose payload can carry it: SeedCall or an object); the payload goes to "
                "the type as it is. A client-chosen `task_id` (or an Idempotency-Key) names the "
                "same task again: no second run. 422s give the JSON path of the bad value.",
                "security": op,
                "parameters": idem,
                "requestBody": _json_body(body, "the seed's task request"),
                "responses": {**_ok(200, "CompatAccepted", "queued"), **submit_errors},
            },
            # `/task/{task_id}` matches this path too: GET reads the task named "submit".
            "get": {
                **get_task,
                "summary": "The task whose id is `submit` (GET /task/{task_id})",
                "parameters": [],
            },
        },
        "/task/{task_id}": {"get": get_task},
        "/health": {
            "get": {
                "summary": "Seed 003's health over the live task runners and this ingest "
                "(degraded: no live runner, or all shed load)",
                "security": op,
                "responses": {
                    **_ok(200, "CompatHealth", "healthy or degraded"),
                    **_error_responses(*_AUTH, 403),
                },
            }
        },
    }


def build_spec(
    event_types: Sequence[type[Event]], task_types: Mapping[str, TaskType], *, max_batch: int
) -> dict[str, Any]:
    """The document: every route of the ingest service itself (``create_app``), not the
    application's (``App.routes``, e.g. subscriptions, feeds, media jobs) nor the dashboard's:
    see docs/ingest.md."""
    union: Any = None
    for t in event_types:
        union = t if union is None else union | t
    payloads = [t.payload_type for t in task_types.values() if t.payload_type is not dict]
    types = [
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
    ]
    (union_schema, *_), components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    _datetimes(types, components)
    v1_task_body, compat_body = _task_bodies(task_types, components)

    def events_body(items: dict[str, Any]) -> dict[str, Any]:
        return {
            "anyOf": [
                items,
                {"type": "array", "items": items, "minItems": 1, "maxItems": max_batch},
            ]
        }

    idem = [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "1-200 printable ASCII characters, no spaces",
            "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[!-~]+$"},
        }
    ]
    events_errors = _error_responses(400, *_AUTH, 403, 408, 413, 415, 422)
    events_errors["403"] = _error(
        403,
        "forbidden_type: a type outside the agent's --types; forbidden_cluster: a cluster_id "
        "outside its --clusters (path of the first, allowed)",
    )
    events_doc = (
        "Also accepts NDJSON (application/x-ndjson) and msgpack "
        "(application/msgpack). `source` and `received_at` are set by the server. An "
        "`Idempotency-Key` header (per item `KEY:index` in a batch) makes a retry return the "
        "same ids without a second entry. Over the agent's rate, or past the batch limit, "
        "a refused request costs its items too."
    )
    post_events = {
        "summary": "Post one event (object) or a batch (array); all-or-nothing",
        "description": events_doc,
        "security": [{"bearer": []}],
        "parameters": idem,
        "requestBody": _json_body(events_body(union_schema), "an event, or an array of events"),
        "responses": {**_ok(202, "EventsAccepted", "published"), **events_errors},
    }
    cluster_errors = dict(events_errors)
    cluster_errors["422"] = _error(
        422,
        "validation failed (JSON path and reason per item); cluster_mismatch: an item's "
        "cluster_id differs from the path's",
    )
    cluster_param = {
        "name": "cluster_id",
        "in": "path",
        "required": True,
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": 253,
            "pattern": NO_CONTROL_PATTERN,
        },
    }
    task_param = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "description": "a malformed id is a 404 like an unknown one",
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    }
    name_pattern = f"^(?:{SCHEDULE_NAME_RE.pattern})$"
    schedule_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": name_pattern},
    }
    op: list[dict[str, list[str]]] = [{"bearer": []}]
    task_types_doc = ", ".join(
        f"`{n}` (payload: {getattr(t.payload_type, '__name__', 'object')})"
        for n, t in sorted(task_types.items())
    )
    statuses = {
        "type": "array",
        "items": {"enum": ["queued", "running", "completed", "failed", "cancelled", ""]},
    }
    query_int = {"type": "integer"}
    schedule_info = _ref("ScheduleInfo")
    ready = _obj(
        ["ready", "redis"],
        ready={"type": "boolean"},
        redis={"type": "boolean"},
        missing_groups={"type": "array", "items": {"type": "string"}},
        detail={"type": "string"},
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streamproc ingest",
            "version": "1",
            "description": "The ingest service's own routes. An application's routes "
            "(`App.routes`) and the dashboard are mounted on the same server and are "
            "documented with them, not here.",
        },
        "paths": {
            "/v1/events": {"post": post_events},
            "/clusters/{cluster_id}/events": {
                "post": {
                    **post_events,
                    "summary": "The seed agents' route: the path's cluster id goes into each event",
                    "description": events_doc + " Each event's `cluster_id` "
                    "is the path's (a body that carries one must carry the same: 422 "
                    "`cluster_mismatch`); an empty `key` becomes the cluster id.",
                    "parameters": [*idem, cluster_param],
                    "requestBody": _json_body(
                        events_body(_without_cluster_id(union_schema, components)),
                        "an event, or an array of events, without cluster_id",
                    ),
                    "responses": {**_ok(202, "EventsAccepted", "published"), **cluster_errors},
                }
            },
            "/v1/tasks": {
                "post": {
                    "summary": "Submit a task (operator, or a submit token for the type)",
                    "description": f"Task types: {task_types_doc or 'none'}.",
                    "security": op,
                    "parameters": idem,
                    "requestBody": _json_body(v1_task_body, "task"),
                    "responses": {
                        **_ok(202, "TaskAccepted", "queued"),
                        **_error_responses(400, *_AUTH, 403, 408, 409, 413, 415, 422),
                    },
                },
                "get": {
                    "summary": "Tasks, newest first: queued and running ones first, then "
                    "finished ones (an operator: all; a submit token: its own), and the link "
                    "to the next page of finished ones",
                    "security": op,
                    "parameters": [
                        {"name": "status", "in": "query", "schema": statuses},
                        {
                            "name": "type",
                            "in": "query",
                            "schema": {"type": "array", "items": {"type": "string"}},
                        },
                        {"name": "submitted_by", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {**query_int, "minimum": 1, "maximum": 500},
                        },
                        {
                            "name": "before",
                            "in": "query",
                            "description": "the cursor of the previous page's `next` link "
                            "(opaque), or a time in epoch ms: tasks that ended before it",
                            "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                        },
                    ],
                    "responses": {
                        **_ok(
                            200,
                            _obj(
                                ["tasks", "next"],
                                tasks={"type": "array", "items": _ref("TaskView")},
                                next={"type": ["string", "null"]},
                            ),
                            "a page",
                        ),
                        **_error_responses(400, *_AUTH, 403),
                    },
                },
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "A task's status, progress, result or error (kept 24 h)",
                    "security": op,
                    "parameters": [task_param],
                    "responses": {
                        **_ok(200, "TaskView", "the task"),
                        **_error_responses(*_AUTH, 403, 404),
                    },
                },
                "delete": {
                    "summary": "Cancel: a queued task now (200), a running one cooperatively (202)",
                    "security": op,
                    "parameters": [task_param],
                    "responses": {
                        **_ok(200, "TaskView", "cancelled"),
                        **_ok(202, "TaskView", "cancelling"),
                        **_error_responses(*_AUTH, 403, 404, 409),
                    },
                },
            },
            "/v1/schedules": {
                "get": {
                    "summary": "Runtime schedules, a page (operator token); cursor 0 at the end",
                    "security": op,
                    "parameters": [
                        {
                            "name": "prefix",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "pattern": f"^(?:{SCHEDULE_NAME_RE.pattern})?$",
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {**query_int, "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "schema": {**query_int, "minimum": 0, "maximum": 2**64 - 1},
                        },
                    ],
                    "responses": {
                        **_ok(
                            200,
                            _obj(
                                ["schedules", "cursor", "total"],
                                schedules={"type": "array", "items": schedule_info},
                                cursor={"type": "integer"},
                                total={"type": "integer"},
                            ),
                            "a page",
                        ),
                        **_error_responses(400, *_AUTH, 403),
                    },
                }
            },
            "/v1/schedules/{name}": {
                "get": {
                    "summary": "One runtime schedule",
                    "security": op,
                    "parameters": [schedule_param],
                    "responses": {
                        **_ok(200, _obj(["schedule"], schedule=schedule_info), "the schedule"),
                        **_error_responses(400, *_AUTH, 403, 404),
                    },
                },
                "put": {
                    "summary": "Create (201) or change (200) a runtime schedule",
                    "description": "`event` is a tick type of the application; exactly one of "
                    "`every` and `cron` (400 naming the field otherwise).",
                    "security": op,
                    "parameters": [schedule_param],
                    "requestBody": _json_body(_ref("ScheduleIn"), "the schedule"),
                    "responses": {
                        **_ok(
                            200,
                            _obj(
                                ["schedule", "changed"],
                                schedule={"anyOf": [schedule_info, {"type": "null"}]},
                                changed={"type": "boolean"},
                            ),
                            "changed, or identical (changed false)",
                        ),
                        **_ok(
                            201,
                            _obj(
                                ["schedule", "changed"],
                                schedule={"anyOf": [schedule_info, {"type": "null"}]},
                                changed={"type": "boolean"},
                            ),
                            "created",
                        ),
                        **_error_responses(400, *_AUTH, 403, 408, 413, 415),
                    },
                },
                "delete": {
                    "summary": "Remove a runtime schedule (204)",
                    "security": op,
                    "parameters": [schedule_param],
                    "responses": {
                        "204": {"description": "removed"},
                        **_error_responses(400, *_AUTH, 403, 404),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "summary": "alive",
                    "responses": _ok(200, _obj(["status"], status={"const": "ok"}), "alive"),
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Redis reachable and the consumer groups exist",
                    "responses": {
                        **_ok(200, ready, "ready"),
                        "503": {
                            **_ok(503, ready, "")["503"],
                            "description": "not ready: Redis does not answer (Retry-After, "
                            "detail) or groups are missing (missing_groups)",
                            "headers": {"Retry-After": {"schema": {"type": "string"}}},
                        },
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
                                "application/json": {"schema": _ref("CompatMetrics")},
                            },
                        },
                        **_error_responses(*_AUTH, 403),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": _ok(200, {"type": "object"}, "OpenAPI 3.1"),
                }
            },
            **_compat_paths(op, task_param, idem, compat_body),
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
