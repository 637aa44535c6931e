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

**One issue per bug across sessions.** A bug id names a problem within one crawl session; a
daily crawl finds the same broken link every day under a new session id. ``fingerprint``
names the problem itself (kind, page URL — its origin included — and, for console errors, the
first message with numbers and hashes blanked out; SHA-256, 32 hex digits), and
``<p>:state:qa:bug:<fingerprint>`` (``_keys.bug``) keeps its issue for ``ticket_dedup_days``
(30) after the last sighting:

- the first bug of a fingerprint names the issue id (``issue_uuid`` of its bug id, written
  with HSETNX, so racing sessions agree on one id and the tracker refuses a second issue);
- a later bug of a fingerprint whose issue is filed makes no call: the sighting is counted
  (``sightings``, ``last_seen``, ``last_session``, ``last_bug_id``), the record's expiry is
  pushed back, the bug's own record points at the issue, the task answers it with
  ``seen_again: true`` and ``qa_ticket_seen_again`` is logged. Nothing is posted to the
  tracker (no comment): the count is in Redis;
- after ``ticket_dedup_days`` without a sighting the record is gone and the next sighting
  files a new issue.

The bug record and a bug's ticket record are written one after the other (each alone: Redis
Cluster); a sighting counted twice by a retry is avoided by ``last_bug_id``.

**Calls.** Connect/read timeouts (``tracker_*_timeout_s``), errors classed by
``streamproc.outbound``: network errors, timeouts and 5xx are retried (``CallTransient``);
HTTP 429 — or Linear's own ``RATELIMITED`` error — waits for ``Retry-After`` /
``X-RateLimit-Requests-Reset`` without using an attempt (``CallRateLimited``, and the breaker
holds every replica that long); authentication errors and other 4xx fail the task
(``CallPermanent``). Everything goes through the breaker ``linear``.
"""

from __future__ import annotations

import hashlib
import re
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
from streamproc._lua import Lua
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

__all__ = (
    "CONCERN",
    "TicketRequest",
    "create_ticket",
    "fingerprint",
    "issue_uuid",
    "on_bug",
    "ticket_request",
)

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


#: Runs of hex digits holding a digit (line numbers, ids, build hashes): blanked in a message.
_VARYING = re.compile(r"[0-9a-f]*[0-9][0-9a-f]*", re.IGNORECASE)


def fingerprint(p: TicketRequest) -> str:
    """The bug itself, whichever session found it: 32 hex digits of a SHA-256 over the kind,
    the page URL (without its fragment) and, for a console error, the first message with
    whitespace collapsed and numbers and hashes blanked."""
    url = p.url.split("#", 1)[0]
    message = ""
    if p.kind == "console_error":
        first = (p.detail or p.title).strip().split("\n", 1)[0]
        message = _VARYING.sub("#", " ".join(first.split()))[:500]
    raw = "\n".join(("streamproc-qa-bug/1", p.kind, url, message))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


# KEYS: the bug record. ARGV: bug id, ttl s, now (ISO), session id, then field/value pairs.
# Counts the sighting unless this bug was the last one counted (a retry), notes it, pushes the
# expiry back; answers the sightings.
_SIGHTING = Lua("""
if redis.call('HGET', KEYS[1], 'last_bug_id') ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[1], 'sightings', 1)
end
redis.call('HSET', KEYS[1], 'last_bug_id', ARGV[1], 'last_seen', ARGV[3],
           'last_session', ARGV[4], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('HGET', KEYS[1], 'sightings')
""")


def _decoded(raw: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
    record = _decoded(raw)
    if record.get("state") == "filed":
        return {**record, "created": False}
    fp = fingerprint(p)
    bug_key = _keys.bug(ctx.keys, fp)
    dedup_s = int(s.ticket_dedup_days * _DAY_S)
    async with ctx.redis.pipeline(transaction=True) as pipe:
        # The first bug of this fingerprint names its issue; later ones read that name.
        pipe.hsetnx(bug_key, "issue_id", issue_uuid(p.bug_id))
        pipe.hsetnx(bug_key, "first_bug_id", p.bug_id)
        pipe.hsetnx(bug_key, "first_seen", _now())
        pipe.expire(bug_key, dedup_s)
        pipe.hgetall(bug_key)
        *_, raw = await pipe.execute()
    known = _decoded(raw)
    issue_id = known["issue_id"]
    if known.get("state") == "filed":
        return await _seen_again(p, ctx, key, fp, known, dedup_s)
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
                        "fingerprint": fp,
                        "claimed_at": _now(),
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
        "filed_at": _now(),
        "fingerprint": fp,
    }
    issue_fields = ["state", "filed", "identifier", filed["identifier"], "url", filed["url"]]
    issue_fields += ["filed_at", filed["filed_at"]]
    sightings = await _SIGHTING(
        ctx.redis, [bug_key], [p.bug_id, dedup_s, _now(), p.session_id, *issue_fields]
    )
    await ctx.redis.hset(key, mapping=dict(filed))  # type: ignore[arg-type]  # redis-py's Mapping is invariant
    return {**filed, "created": created, "sightings": int(sightings)}


async def _seen_again(
    p: TicketRequest,
    ctx: TaskContext,
    key: str,
    fp: str,
    known: dict[str, str],
    dedup_s: int,
) -> dict[str, Any]:
    """A bug whose issue another session filed: counted on the bug record, no tracker call."""
    s = settings()
    bug_key = _keys.bug(ctx.keys, fp)
    sightings = await _SIGHTING(ctx.redis, [bug_key], [p.bug_id, dedup_s, _now(), p.session_id])
    filed: dict[str, str] = {
        "state": "filed",
        "bug_id": p.bug_id,
        "issue_id": known["issue_id"],
        "identifier": known.get("identifier", ""),
        "url": known.get("url", ""),
        "filed_at": known.get("filed_at", ""),
        "fingerprint": fp,
        "first_bug_id": known.get("first_bug_id", ""),
    }
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=dict(filed))  # type: ignore[arg-type]  # redis-py's Mapping is invariant
        pipe.expire(key, int(s.retention_days * _DAY_S) + _DAY_S)
        await pipe.execute()
    log.info(
        "qa_ticket_seen_again",
        bug_id=p.bug_id,
        session_id=p.session_id,
        issue=filed["identifier"] or filed["issue_id"],
        sightings=int(sightings),
    )
    return {**filed, "created": False, "seen_again": True, "sightings": int(sightings)}


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
