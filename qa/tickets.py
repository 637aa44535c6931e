"""``ticket.create``: one issue per bug in the tracker, through Linear's GraphQL API.

**Exactly one issue per bug.** The issue's id is chosen here, not by the tracker: Linear's
``IssueCreateInput`` takes an ``id`` (a UUID v4), and this is a UUID v4-shaped hash of the bug
id (``issue_uuid``). So:

1. ``<p>:state:qa:ticket:<bug id>`` says ``filed`` → the task answers the stored issue: no call.
2. Otherwise the claim is written first (``state=claimed``, the issue id). A claim found at
   the start means an earlier attempt may have reached the tracker (its answer lost to a
   timeout, a crash): the issue is looked up by its id (``issue(id:)``) before anything is
   created.
3. ``issueCreate`` with that id; if it is refused (the id exists: an earlier create went
   through after all), the issue is looked up again and used.

A lost answer therefore costs a lookup, never a second issue; and even two runners racing on
one bug cannot make two issues, since the tracker refuses a second issue with the same id.

**Calls.** Connect/read timeouts (``tracker_*_timeout_s``), errors classed by
``streamproc.outbound``: network errors, timeouts and 5xx are retried (``CallTransient``);
HTTP 429 — or Linear's own ``RATELIMITED`` error — waits for ``Retry-After`` /
``X-RateLimit-Requests-Reset`` without using an attempt (``CallRateLimited``, and the breaker
holds every replica that long); authentication errors and other 4xx fail the task
(``CallPermanent``). Everything goes through the breaker ``linear``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import aiohttp
import msgspec
import structlog

from qa import _keys, _submit
from qa._submit import Submitter
from qa.settings import QaSettings, settings
from schemas.qa import BugFound, BugKind, SessionId
from streamproc.breaker import Breaker
from streamproc.concern import Concern
from streamproc.errors import Permanent
from streamproc.outbound import (
    MAX_RETRY_AFTER_S,
    CallPermanent,
    CallRateLimited,
    CallTransient,
    HttpResult,
    Timeouts,
    check_status,
    guarded,
    retry_after_s,
)
from streamproc.settings import RetryPolicy
from streamproc.tasks import TaskContext

__all__ = ("CONCERN", "TicketRequest", "create_ticket", "issue_uuid", "on_bug", "ticket_request")

log = structlog.get_logger("qa.tickets")

_DAY_S = 86_400
#: The most of a tracker's answer read (an issue is a few hundred bytes).
MAX_ANSWER_BYTES = 256 * 1024
#: Wait when the tracker says "rate limited" without saying until when.
DEFAULT_RATE_WAIT_S = 30.0

_CREATE = """mutation QaIssueCreate($input: IssueCreateInput!) {
  issueCreate(input: $input) { success issue { id identifier url } }
}"""
_LOOKUP = """query QaIssue($id: String!) { issue(id: $id) { id identifier url } }"""

_Url = Annotated[str, msgspec.Meta(max_length=2048)]


class TicketRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``ticket.create``: the bug (a ``qa.bug_found`` event's fields)."""

    bug_id: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9._:-]{1,128}$")]
    session_id: SessionId
    kind: BugKind
    url: _Url
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    status: Annotated[int, msgspec.Meta(ge=0, le=999)] = 0
    detail: Annotated[str, msgspec.Meta(max_length=8000)] = ""
    linked_from: Annotated[list[_Url], msgspec.Meta(max_length=20)] = msgspec.field(
        default_factory=list
    )
    screenshot_url: Annotated[str, msgspec.Meta(max_length=2048)] = ""


def ticket_request(bug: BugFound) -> TicketRequest:
    return TicketRequest(
        bug_id=bug.id,
        session_id=bug.session_id,
        kind=bug.kind,
        url=bug.url,
        title=bug.title or f"{bug.kind} on {bug.url}"[:300],
        status=bug.status,
        detail=bug.detail,
        linked_from=bug.linked_from,
        screenshot_url=bug.screenshot_url,
    )


def issue_uuid(bug_id: str) -> str:
    """The issue id of a bug: a UUID in version-4 form, derived from the bug id."""
    digest = hashlib.sha256(f"streamproc-qa-issue:{bug_id}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _description(p: TicketRequest) -> str:
    lines = [f"**{p.kind.replace('_', ' ')}** found by QA session `{p.session_id}` on <{p.url}>"]
    if p.status:
        lines.append(f"HTTP status: {p.status}")
    if p.detail:
        lines += ["", p.detail]
    if p.linked_from:
        lines += ["", "Linked from:", *(f"- <{u}>" for u in p.linked_from)]
    if p.screenshot_url:
        lines += ["", f"![screenshot]({p.screenshot_url})"]
    lines += ["", f"<!-- streamproc-qa bug {p.bug_id} -->"]
    return "\n".join(lines)


def _rate_wait_s(headers: Any) -> float:
    if (ra := headers.get("Retry-After")) is not None:
        return retry_after_s(ra, default=DEFAULT_RATE_WAIT_S)
    reset = headers.get("X-RateLimit-Requests-Reset")  # Linear: epoch ms
    if reset and reset.isdigit():
        return min(max(int(reset) / 1000 - time.time(), 0.0), MAX_RETRY_AFTER_S)
    return DEFAULT_RATE_WAIT_S


async def _graphql(
    http: aiohttp.ClientSession, s: QaSettings, query: str, variables: dict[str, Any]
) -> dict[str, Any]:
    """One GraphQL call: its JSON answer, or the exception its status means."""
    timeouts = Timeouts(
        connect_s=s.tracker_connect_timeout_s,
        read_s=s.tracker_read_timeout_s,
        total_s=s.tracker_connect_timeout_s + 2 * s.tracker_read_timeout_s,
    )
    body = msgspec.json.encode({"query": query, "variables": variables})
    headers = {"Authorization": s.linear_api_key, "Content-Type": "application/json"}
    started = time.perf_counter()
    try:
        async with http.post(
            s.linear_url, data=body, headers=headers, timeout=timeouts.aiohttp(),
            allow_redirects=False,
        ) as resp:  # fmt: skip
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    raise CallTransient(f"tracker answer over {MAX_ANSWER_BYTES} bytes")
            status, resp_headers = resp.status, resp.headers
    except (aiohttp.InvalidURL, ValueError) as e:
        raise CallPermanent(f"tracker URL {s.linear_url!r}: {e}") from e
    except TimeoutError as e:
        raise CallTransient(f"tracker timed out after {time.perf_counter() - started:.1f}s") from e
    except aiohttp.ClientError as e:
        raise CallTransient(f"tracker: {type(e).__name__}: {e}") from e
    text = raw.decode("utf-8", "replace")
    try:
        answer = msgspec.json.decode(raw) if raw else {}
    except msgspec.DecodeError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    codes = {
        str((e.get("extensions") or {}).get("code", "")).upper()
        for e in answer.get("errors") or []
        if isinstance(e, dict)
    }
    if status == 429 or "RATELIMITED" in codes:
        raise CallRateLimited(
            f"tracker rate limit: {text[:200]!r}", delay_s=_rate_wait_s(resp_headers), body=text
        )
    if codes & {"AUTHENTICATION_ERROR", "FORBIDDEN", "UNAUTHENTICATED"}:
        raise CallPermanent(f"tracker refused the API key: {text[:200]!r}", status=status)
    if "data" not in answer:
        # No GraphQL answer: the status decides (5xx → retry, 4xx → permanent).
        check_status(HttpResult(status, text, time.perf_counter() - started, None), "tracker")
        raise CallTransient(f"tracker answered {status} without JSON: {text[:200]!r}")
    if status >= 500:
        check_status(HttpResult(status, text, 0.0, None), "tracker")
    return answer


def _issue(answer: dict[str, Any], *path: str) -> dict[str, Any] | None:
    node: Any = answer.get("data")
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and node.get("id") else None


async def create_ticket(p: TicketRequest, ctx: TaskContext) -> dict[str, Any]:
    s = settings()
    if not s.tracker_configured:
        raise Permanent("no tracker: STREAMPROC_QA_LINEAR_API_KEY and _LINEAR_TEAM_ID are unset")
    key = _keys.ticket(ctx.keys, p.bug_id)
    raw: Any = await ctx.redis.hgetall(key)
    record = {k.decode(): v.decode() for k, v in raw.items()}
    if record.get("state") == "filed":
        return {**record, "created": False}
    issue_id = issue_uuid(p.bug_id)
    breaker = Breaker(
        ctx.redis,
        ctx.keys,
        "linear",
        threshold=s.breaker_threshold,
        cooldown_s=s.breaker_cooldown_s,
    )
    async with aiohttp.ClientSession() as http:

        async def lookup() -> dict[str, Any] | None:
            answer = await guarded(breaker, lambda: _graphql(http, s, _LOOKUP, {"id": issue_id}))
            return _issue(answer, "issue")

        issue = await lookup() if record.get("state") == "claimed" else None
        created = False
        if issue is None:
            ttl_s = int(s.retention_days * _DAY_S) + _DAY_S
            async with ctx.redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    key,
                    mapping={
                        "state": "claimed",
                        "bug_id": p.bug_id,
                        "issue_id": issue_id,
                        "task_id": ctx.task_id,
                        "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    },
                )
                pipe.expire(key, ttl_s)
                await pipe.execute()
            variables = {
                "input": {
                    "id": issue_id,
                    "teamId": s.linear_team_id,
                    "title": p.title,
                    "description": _description(p),
                }
            }
            answer = await guarded(breaker, lambda: _graphql(http, s, _CREATE, variables))
            issue = _issue(answer, "issueCreate", "issue")
            created = issue is not None
            if issue is None:
                # Refused: most likely the id exists (an earlier attempt got through).
                issue = await lookup()
                if issue is None:
                    errors = str(answer.get("errors") or answer.get("data"))[:300]
                    raise CallPermanent(f"tracker did not create the issue: {errors}")
    filed: dict[str, str] = {
        "state": "filed",
        "bug_id": p.bug_id,
        "issue_id": str(issue["id"]),
        "identifier": str(issue.get("identifier") or ""),
        "url": str(issue.get("url") or ""),
        "filed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    await ctx.redis.hset(key, mapping=dict(filed))  # type: ignore[arg-type]  # redis-py's Mapping is invariant
    return {**filed, "created": created}


async def on_bug(bug: BugFound, ctx: Submitter) -> None:
    """``qa.bug_found`` → one ``ticket.create`` task, whose id is derived from the bug's."""
    if not settings().tracker_configured:
        log.info("qa_ticket_skipped", bug_id=bug.id, reason="no tracker configured")
        return
    await _submit.submit(
        ctx, "ticket.create", ticket_request(bug), task_id=_submit.derived_task_id(bug.id, "ticket")
    )


#: Files a ticket per bug: the group ``qa-tickets`` on the topic ``qa``.
CONCERN = Concern(
    group="qa-tickets",
    topics=(BugFound.topic,),
    handlers={BugFound: on_bug},
    concurrency=4,
    retry=RetryPolicy(max_retries=5, base_s=5.0, cap_s=300.0),
)
