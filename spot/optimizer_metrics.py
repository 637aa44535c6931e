"""Agent metrics: ``POST /clusters/{id}/metrics`` and the ``metrics`` concern that folds the
samples into daily figures.

The body: ``{"samples": [MetricSample, ...], "id"?: str}`` (at most ``MAX_SAMPLES``), each
sample's ``at`` within the last ``MAX_AGE_S`` and at most ``MAX_AHEAD_S`` ahead. The caller's
token must may post ``cluster.metrics`` (its types) for this cluster (its ``clusters``
patterns; operators may post for any). Accepted → one ``cluster.metrics`` event on the
``metrics`` topic, 202 with its id; a repeat with the same ``Idempotency-Key`` (or ``id``) is
the same event, published once.

Daily figures (``schemas.metrics``), per sample on its UTC day: ``agent_samples``,
``node_hours``, ``spot_node_hours``, ``cpu_core_hours_requested``, ``cpu_core_hours_used``
(a sample counts for its ``interval_s``); the cluster's hash also gets ``nodes_sum``,
``pods_sum`` and ``pending_pods_sum`` (averages = sum / ``agent_samples``). Effects: applied
once per event, with its ack.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from schemas.metrics import (
    MAX_SAMPLES,
    ClusterMetrics,
    MetricSample,
    add_figures,
    day_of,
)
from spot.policy import CLUSTER_RE
from streamproc.concern import Concern, Context
from streamproc.connection import REDIS_DOWN
from streamproc.ingest._http import Problem, idempotency_key, json_response, redis_unavailable
from streamproc.ingest.app import Ingest
from streamproc.ingest.auth import Agent
from streamproc.settings import RetryPolicy

__all__ = ("CONCERN", "MAX_AGE_S", "MAX_AHEAD_S", "MetricsIn", "add_routes", "daily_figures")

#: Samples older than this are refused (the report looks 7 days back).
MAX_AGE_S = 7 * 86_400
#: Clocks drift: a sample may be this far ahead of the server.
MAX_AHEAD_S = 300
_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
_NS = uuid.UUID("5a0c3e51-7b2d-4f61-9c8e-2d4b6a1f0e93")
_ID = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class MetricsIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /clusters/{id}/metrics``."""

    samples: Annotated[list[MetricSample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    #: The agent's own id for this batch (a retry sends it again).
    id: _ID | None = None


def may_act(agent: Agent, cluster_id: str, event_type: str | None) -> bool:
    """Operators act on any cluster. An agent acts on the clusters its ``clusters`` patterns
    match: posting an event type its ``types`` patterns allow (``event_type``), or, with
    ``None``, as that cluster's agent at all (any types: a viewer token acts on nothing)."""
    if agent.operator:
        return True
    if not agent.may_read(cluster_id):
        return False
    return bool(agent.types) if event_type is None else agent.may_post(event_type)


def cluster_path(request: web.Request) -> str:
    cluster_id = request.match_info["cluster_id"]
    if not CLUSTER_RE.fullmatch(cluster_id):
        raise Problem(404, "not_found", "not a cluster id", path="cluster_id")
    return cluster_id


def forbidden(agent: Agent, cluster_id: str, what: str, needs: str) -> Problem:
    return Problem(
        403,
        "forbidden",
        f"agent {agent.name!r} may not {what} for cluster {cluster_id!r}: its token needs the "
        f"cluster in --clusters and {needs}",
    )


class _MetricsRoute:
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.decoder = msgspec.json.Decoder(MetricsIn)

    def _decode(self, body: bytes) -> MetricsIn:
        if not body.strip():
            raise Problem(400, "empty_body", "the request body is empty")
        try:
            return self.decoder.decode(body)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `")
            raise Problem(422, "invalid", text, path=path.rstrip("`") or "$") from None
        except msgspec.DecodeError as e:
            raise Problem(400, "malformed", f"the body is not JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise Problem(400, "invalid_utf8", f"text is not valid UTF-8: {e.reason}") from None
        except RecursionError:
            raise Problem(400, "too_deep", "the body is nested too deeply") from None

    async def post(self, request: web.Request) -> web.Response:
        ing = self.ingest
        agent = await ing.authenticate(request)
        cluster_id = cluster_path(request)
        if not may_act(agent, cluster_id, "cluster.metrics"):
            raise forbidden(agent, cluster_id, "post metrics", "cluster.metrics in --types")
        ing.body_format(request, allowed=("json",))
        idem = idempotency_key(request)
        batch = self._decode(await ing.read_body(request))
        now = datetime.now(UTC)
        for i, s in enumerate(batch.samples):
            if (
                not now - timedelta(seconds=MAX_AGE_S)
                <= s.at
                <= now + timedelta(seconds=MAX_AHEAD_S)
            ):
                raise Problem(
                    422,
                    "out_of_range",
                    f"sample time {s.at.isoformat()} is not within the last "
                    f"{MAX_AGE_S // 86_400} days (or {MAX_AHEAD_S} s ahead)",
                    path=f"$.samples[{i}].at",
                )
            if s.spot_nodes > s.nodes:
                raise Problem(
                    422,
                    "invalid",
                    f"spot_nodes {s.spot_nodes} is more than nodes {s.nodes}",
                    path=f"$.samples[{i}].spot_nodes",
                )
        try:
            wait_s = await ing.limiter.take(agent.name, 1)
        except _REDIS_FAILED as e:
            raise redis_unavailable(ing.settings.retry_after_s, e) from e
        if wait_s:
            raise Problem(
                429,
                "rate_limited",
                f"agent {agent.name!r} is over its rate; retry in {wait_s}s",
                headers={"Retry-After": str(wait_s)},
            )
        given = batch.id or idem
        fields: dict[str, Any] = {}
        if given:  # the same batch again is the same event: published once
            fields["id"] = str(uuid.uuid5(_NS, f"{agent.name}:{cluster_id}:{given}"))
        event = ClusterMetrics(
            **fields,
            key=cluster_id,
            source=agent.name,
            received_at=now,
            cluster_id=cluster_id,
            samples=batch.samples,
        )
        [entry_id] = await ing.publish([event], None, [given is not None])
        return json_response(
            {"accepted": len(batch.samples), "id": event.id, "entry_id": entry_id}, status=202
        )


def daily_figures(samples: list[MetricSample]) -> dict[str, dict[str, float]]:
    """Per UTC day, what the samples add to the day's figures."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        hours = s.interval_s / 3600
        day = out[day_of(s.at)]
        day["agent_samples"] += 1
        day["node_hours"] += s.nodes * hours
        day["spot_node_hours"] += s.spot_nodes * hours
        day["cpu_core_hours_requested"] += s.cpu_requested_cores * hours
        day["cpu_core_hours_used"] += s.cpu_used_cores * hours
        day["nodes_sum"] += s.nodes
        day["pods_sum"] += s.pods
        day["pending_pods_sum"] += s.pending_pods
    return {d: dict(v) for d, v in out.items()}


#: Figures only the cluster's hash keeps (sums for its averages).
_CLUSTER_ONLY = frozenset({"nodes_sum", "pods_sum", "pending_pods_sum"})


async def on_cluster_metrics(event: ClusterMetrics, ctx: Context) -> None:
    # Not effects: the day's figures are in their own slot (schemas.metrics), added once per
    # event id and day.
    for day, figures in sorted(daily_figures(event.samples).items()):
        rounded = {f: float(round(v, 6)) for f, v in figures.items()}
        await add_figures(
            ctx.redis,
            ctx.keys,
            day=day,
            mark=event.id,
            everyone={f: v for f, v in rounded.items() if f not in _CLUSTER_ONLY},
            cluster=(event.cluster_id, rounded),
        )


CONCERN = Concern(
    group="metrics",
    topics=("metrics",),
    handlers={ClusterMetrics: on_cluster_metrics},
    concurrency=4,
    retry=RetryPolicy(max_retries=3, base_s=0.5, cap_s=30.0),
)


def add_routes(app: web.Application, ingest: Ingest) -> None:
    app.router.add_post("/clusters/{cluster_id}/metrics", _MetricsRoute(ingest).post)
