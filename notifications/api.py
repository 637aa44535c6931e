"""The operator API of the delivery side, on the ingest service (operator tokens only).

| route | what |
|---|---|
| ``GET /v1/subscriptions[?cluster=C]`` | subscriptions, secrets never shown |
| ``POST /v1/subscriptions`` | add one (body below); 201 with it (and a new signing key) |
| ``DELETE /v1/subscriptions/{id}`` | remove one: 204, or 404 |
| ``GET /v1/notifications/{id}/deliveries`` | every delivery attempt of a notification |
| ``GET /v1/breakers`` | every circuit breaker's state |

The body of ``POST /v1/subscriptions``: ``{cluster, channel, destination, min_severity?,
types?, secret?}``; a webhook's generated signing key is in the answer this once.

Refusals are the ingest's JSON problems: ``{"error", "detail", "path"}`` with 400 for a bad
body (the field's path), 401/403 for the token, 413 past the body limit.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from aiohttp import web

from notifications.delivery_log import DeliveryLog
from notifications.settings import NotifySettings
from notifications.subscriptions import CLUSTER_RE as _CLUSTER_RE
from notifications.subscriptions import SubscriptionStore, new_subscription
from streamproc.breaker import breaker_states
from streamproc.errors import ConfigError
from streamproc.ingest._http import Problem, json_response
from streamproc.ingest.app import Ingest

__all__ = ("add_routes",)

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_Text = Annotated[str, msgspec.Meta(max_length=2048)]


class SubscriptionIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    cluster: Annotated[str, msgspec.Meta(max_length=63)]
    channel: Annotated[str, msgspec.Meta(max_length=16)]
    destination: _Text
    min_severity: Annotated[str, msgspec.Meta(max_length=16)] = "info"
    types: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=20)
    ] = msgspec.field(default_factory=lambda: ["*"])
    secret: Annotated[str, msgspec.Meta(max_length=200)] = ""


class _Api:
    def __init__(self, ingest: Ingest, settings: NotifySettings) -> None:
        self.ingest = ingest
        self.store = SubscriptionStore(ingest.client, ingest.keys, cache_s=0)
        self.log = DeliveryLog(
            ingest.client, ingest.keys, maxlen=settings.log_maxlen, ttl_s=settings.log_ttl_s
        )
        self.decoder = msgspec.json.Decoder(SubscriptionIn)

    async def list(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        cluster = request.query.get("cluster")
        if cluster is not None and not _CLUSTER_RE.fullmatch(cluster):
            raise Problem(400, "invalid", "not a cluster id or '*'", path="cluster")
        subs = await self.store.all(cluster)
        return json_response({"subscriptions": [s.public() for s in subs]})

    async def add(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        self.ingest.body_format(request, allowed=("json",))
        body = await self.ingest.read_body(request)
        try:
            req = self.decoder.decode(body)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `")
            raise Problem(400, "invalid", text, path=path.rstrip("`") or "$") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise Problem(400, "malformed", f"the body is not a JSON object: {e}") from None
        try:
            sub = new_subscription(
                cluster=req.cluster,
                channel=req.channel,
                destination=req.destination,
                min_severity=req.min_severity,
                types=req.types,
                secret=req.secret,
            )
        except ConfigError as e:
            field, _, reason = str(e).partition(": ")
            raise Problem(400, "invalid", reason or str(e), path=f"$.{field}") from None
        try:
            await self.store.add(sub)
        except ConfigError as e:
            raise Problem(409, "limit_reached", str(e)) from None
        out: dict[str, Any] = {"subscription": sub.public()}
        if sub.channel == "webhook" and not req.secret:
            out["secret"] = sub.secret  # generated here: shown this once
        return json_response(out, status=201)

    async def remove(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        sub_id = request.match_info["sub_id"]
        if not _ID_RE.fullmatch(sub_id) or not await self.store.remove(sub_id):
            raise Problem(404, "not_found", f"no subscription {sub_id[:80]!r}")
        return web.Response(status=204)

    async def deliveries(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        nid = request.match_info["notification_id"]
        if not _ID_RE.fullmatch(nid):
            raise Problem(400, "invalid", "not a notification id", path="notification_id")
        attempts = await self.log.for_notification(nid)
        return json_response(
            {
                "notification_id": nid,
                "attempts": [msgspec.structs.asdict(a) for a in attempts],
            }
        )

    async def breakers(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        states = await breaker_states(self.ingest.client, self.ingest.keys)
        return json_response({"breakers": [msgspec.structs.asdict(b) for b in states]})


def add_routes(
    app: web.Application, ingest: Ingest, settings: NotifySettings | None = None
) -> None:
    api = _Api(ingest, settings or NotifySettings())
    app.router.add_get("/v1/subscriptions", api.list)
    app.router.add_post("/v1/subscriptions", api.add)
    app.router.add_delete("/v1/subscriptions/{sub_id}", api.remove)
    app.router.add_get("/v1/notifications/{notification_id}/deliveries", api.deliveries)
    app.router.add_get("/v1/breakers", api.breakers)
