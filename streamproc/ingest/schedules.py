"""Runtime schedules on the ingest service (operator tokens only; see ``streamproc.scheduler``).

| route | what |
|---|---|
| ``GET /v1/schedules?prefix=&limit=&cursor=`` | a page: ``{schedules, cursor, total}`` |
| ``GET /v1/schedules/{name}`` | one schedule, its next time |
| ``PUT /v1/schedules/{name}`` | create (201) or change (200; ``changed`` false when identical) |
| ``DELETE /v1/schedules/{name}`` | 204; 404 when there is none |

The body of ``PUT``: ``{"event": "<tick type>", "every": "5 min" | 300, "cron": "0 9 * * 1",
"tz": "UTC", "key": "", "missed": "latest", "grace_s": 30, "catch_up_max": 10, "spread":
true}`` with exactly one of ``every`` and ``cron``; ``event`` is a tick type of the
application's registry. Refusals are the ingest's JSON problems, 400 naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import web

from streamproc.errors import ConfigError
from streamproc.ingest._http import Problem, check_query, json_response
from streamproc.schedule import Tick
from streamproc.scheduler import SCHEDULE_NAME_RE, ScheduleInfo, Scheduler

if TYPE_CHECKING:
    from streamproc.codec import Registry
    from streamproc.ingest.app import Ingest

__all__ = ("ScheduleApi", "ScheduleIn")

log = structlog.get_logger("streamproc.ingest.schedules")


class ScheduleIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PUT /v1/schedules/{name}``."""

    event: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    every: Annotated[str, msgspec.Meta(max_length=32)] | float | None = None
    cron: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    tz: Annotated[str, msgspec.Meta(max_length=64)] = "UTC"
    key: Annotated[str, msgspec.Meta(max_length=256)] = ""
    missed: Literal["skip", "latest", "catch_up"] = "latest"
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 30.0
    catch_up_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    spread: bool = True


def public(info: ScheduleInfo) -> dict[str, Any]:
    out = msgspec.structs.asdict(info)
    out["next_at"] = info.next_at.isoformat() if info.next_at else None
    return out


class ScheduleApi:
    def __init__(self, ingest: Ingest, registry: Registry[Any]) -> None:
        self.ingest = ingest
        self.scheduler = Scheduler(ingest.client, ingest.keys)
        #: The tick types a schedule may fire.
        self.ticks = {
            name: t
            for name, t in registry.by_name.items()
            if isinstance(t, type) and issubclass(t, Tick)
        }
        self._decoder = msgspec.json.Decoder(ScheduleIn)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/schedules", self.list)
        router.add_get("/v1/schedules/{name}", self.get)
        router.add_put("/v1/schedules/{name}", self.put)
        router.add_delete("/v1/schedules/{name}", self.delete)

    @staticmethod
    def _name(request: web.Request) -> str:
        name = request.match_info["name"]
        if not SCHEDULE_NAME_RE.fullmatch(name):
            raise Problem(
                400,
                "invalid",
                "1-128 characters of letters, digits, '_', '.', ':', '-'",
                path="name",
            )
        return name

    async def list(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        check_query(request, frozenset({"prefix", "limit", "cursor"}))
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            cursor = int(q.get("cursor", "0"))
        except ValueError:
            raise Problem(400, "invalid", "limit and cursor are integers", path="query") from None
        if not 0 <= cursor < 2**64:  # Redis' cursors are 64-bit: a larger one was a 500
            raise Problem(400, "invalid", "cursor: 0 to 2**64-1", path="cursor")
        try:
            page, nxt = await self.scheduler.list(
                prefix=q.get("prefix", ""), limit=limit, cursor=cursor
            )
        except ConfigError as e:
            field, _, reason = str(e).partition(": ")
            raise Problem(400, "invalid", reason, path=field) from None
        return json_response(
            {
                "schedules": [public(i) for i in page],
                "cursor": nxt,
                "total": await self.scheduler.count(),
            }
        )

    async def get(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        name = self._name(request)
        info = await self.scheduler.get(name)
        if info is None:
            raise Problem(404, "not_found", f"no runtime schedule {name!r}")
        return json_response({"schedule": public(info)})

    async def put(self, request: web.Request) -> web.Response:
        agent = await self.ingest.authenticate(request, operator=True)
        name = self._name(request)
        self.ingest.body_format(request, allowed=("json",))
        body = await self.ingest.read_body(request)
        try:
            req = self._decoder.decode(body)
        except msgspec.ValidationError as e:
            text, _, path = str(e).partition(" - at `")
            raise Problem(400, "invalid", text, path=path.rstrip("`") or "$") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise Problem(400, "malformed", f"the body is not a JSON object: {e}") from None
        event = self.ticks.get(req.event)
        if event is None:
            raise Problem(
                400,
                "invalid",
                f"{req.event[:128]!r} is not a tick type of this application "
                f"(known: {', '.join(sorted(self.ticks))})",
                path="$.event",
            )
        existed = await self.scheduler.get(name) is not None
        try:
            changed = await self.scheduler.add(
                name,
                event=event,
                every=req.every,
                cron=req.cron,
                tz=req.tz,
                key=req.key,
                missed=req.missed,
                grace_s=req.grace_s,
                catch_up_max=req.catch_up_max,
                spread=req.spread,
            )
        except ConfigError as e:
            field, _, reason = str(e).partition(": ")
            path = f"$.{field.split(' ')[0]}" if reason and " " not in field.strip() else "$"
            raise Problem(400, "invalid", reason or str(e), path=path) from None
        info = await self.scheduler.get(name)
        log.info("schedule_put", schedule=name, agent=agent.name, changed=changed)
        return json_response(
            {"schedule": public(info) if info else None, "changed": changed},
            status=200 if existed else 201,
        )

    async def delete(self, request: web.Request) -> web.Response:
        agent = await self.ingest.authenticate(request, operator=True)
        name = self._name(request)
        if not await self.scheduler.remove(name):
            raise Problem(404, "not_found", f"no runtime schedule {name!r}")
        log.info("schedule_removed", schedule=name, agent=agent.name)
        return web.Response(status=204)
