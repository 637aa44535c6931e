"""Hibernation's operator routes on the ingest service (operator tokens only).

| route | what |
|---|---|
| ``GET /v1/clusters/{id}/hibernation`` | schedule, state (remembered sizes), next change |
| ``PUT /v1/clusters/{id}/hibernation`` | set it (body below): 201 new, 200 replaced |
| ``DELETE /v1/clusters/{id}/hibernation`` | 204 gone; 202 asleep: woken, then removed; 404 |
| ``DELETE …/hibernation?forget=1`` | asleep: 200, dropped without waking (groups deleted) |

The body of ``PUT``: ``{account, region, tz, sleep?: [rule], awake?: [rule], matrix?: [7
lines], asgs?: [name], prewarm_min?}`` with either ``sleep`` (and ``awake``) rules or a
``matrix``, as in ``streamproc hibernation set``. Refusals are the ingest's JSON problems
(``{"error", "detail", "path"}``), 400 naming the field.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec
from aiohttp import web

from spot._schedule import CLUSTER_RE, apply_rules, new_schedule, parse_matrix
from spot.hibernation_store import ScheduleStore
from spot.hibernation_view import public
from streamproc.errors import ConfigError
from streamproc.ingest._http import Problem, json_response
from streamproc.ingest.app import Ingest

__all__ = ("add_routes",)

_Rule = Annotated[str, msgspec.Meta(max_length=100)]
_Rules = Annotated[list[_Rule], msgspec.Meta(max_length=50)]


class HibernationIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    account: Annotated[str, msgspec.Meta(max_length=12)]
    region: Annotated[str, msgspec.Meta(max_length=32)]
    tz: Annotated[str, msgspec.Meta(max_length=64)]
    sleep: _Rules | None = None
    awake: _Rules = msgspec.field(default_factory=list)
    matrix: (
        Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=7)]
        | None
    ) = None
    asgs: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=255)]], msgspec.Meta(max_length=50)
    ] = msgspec.field(default_factory=list)
    prewarm_min: Annotated[int, msgspec.Meta(ge=0, le=180)] = 30


def _week(req: HibernationIn) -> str:
    if req.matrix is not None:
        if req.sleep is not None or req.awake:
            raise Problem(
                400, "invalid", "give matrix or sleep/awake rules, not both", path="$.matrix"
            )
        try:
            return parse_matrix(req.matrix)
        except ConfigError as e:
            raise Problem(400, "invalid", str(e), path="$.matrix") from None
    if not req.sleep:
        raise Problem(400, "invalid", "give sleep rules or a matrix", path="$.sleep")
    for name, rules in (("sleep", req.sleep), ("awake", req.awake)):
        for i, rule in enumerate(rules):
            try:
                apply_rules([rule])
            except ConfigError as e:
                raise Problem(400, "invalid", str(e), path=f"$.{name}[{i}]") from None
    return apply_rules(req.sleep, req.awake)


class _Api:
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.store = ScheduleStore(ingest.client, ingest.keys)
        self.decoder = msgspec.json.Decoder(HibernationIn)

    @staticmethod
    def _cluster(request: web.Request) -> str:
        cluster = request.match_info["cluster_id"]
        if not CLUSTER_RE.fullmatch(cluster):
            raise Problem(400, "invalid", "not a cluster name", path="cluster_id")
        return cluster

    async def get(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        cluster = self._cluster(request)
        s = await self.store.get(cluster)
        if s is None:
            raise Problem(404, "not_found", f"no hibernation schedule for {cluster!r}")
        rec = await self.store.record(cluster)
        return json_response({"hibernation": public(s, rec, datetime.now(UTC))})

    async def put(self, request: web.Request) -> web.Response:
        agent = await self.ingest.authenticate(request, operator=True)
        cluster = self._cluster(request)
        self.ingest.body_format(request, allowed=("json",))
        body = await self.ingest.read_body(request)
        try:
            req = self.decoder.decode(body)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `")
            raise Problem(400, "invalid", text, path=path.rstrip("`") or "$") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise Problem(400, "malformed", f"the body is not a JSON object: {e}") from None
        who = f"api:{agent.name}"
        try:
            schedule = new_schedule(
                cluster=cluster,
                account=req.account,
                region=req.region,
                tz=req.tz,
                week=_week(req),
                asgs=req.asgs,
                prewarm_min=req.prewarm_min,
                updated_by=who,
                now=datetime.now(UTC),
            )
        except ConfigError as e:
            field, _, reason = str(e).partition(": ")
            raise Problem(400, "invalid", reason or str(e), path=f"$.{field}") from None
        new = await self.store.put(schedule, who=who, detail=f"tz={schedule.tz}")
        rec = await self.store.record(cluster)
        return json_response(
            {"hibernation": public(schedule, rec, datetime.now(UTC))}, status=201 if new else 200
        )

    async def delete(self, request: web.Request) -> web.Response:
        agent = await self.ingest.authenticate(request, operator=True)
        cluster = self._cluster(request)
        forget = request.query.get("forget", "") in ("1", "true")
        outcome = await self.store.remove(cluster, who=f"api:{agent.name}", forget=forget)
        if outcome == "absent":
            raise Problem(404, "not_found", f"no hibernation schedule for {cluster!r}")
        if outcome == "forgotten":
            return json_response({"cluster": cluster, "removal": "forgotten"}, status=200)
        if outcome == "pending":
            return json_response({"cluster": cluster, "removal": "pending wake"}, status=202)
        return web.Response(status=204)


def add_routes(app: web.Application, ingest: Ingest) -> None:
    api = _Api(ingest)
    path = "/v1/clusters/{cluster_id}/hibernation"
    app.router.add_get(path, api.get)
    app.router.add_put(path, api.put)
    app.router.add_delete(path, api.delete)
