"""Dashboard sessions: an operator token exchanged once for an HttpOnly cookie.

A browser cannot send ``Authorization: Bearer`` on page load, so ``POST /dashboard/login``
takes the operator's token from a form, checks it like the API does (``AgentStore``), and
answers with a cookie holding a random session id (``secrets.token_urlsafe(32)``).

- Redis keeps only the id's SHA-256: ``<prefix>:dashboard:session:<sha256>`` → hash
  ``{agent, token_sha256, csrf}`` with a TTL (``ttl_s``, fixed from login; no sliding).
- A valid token of an agent without operator rights is told so (``NotOperator``): its holder
  already knows the token is good (the API takes it), so saying it lacks ``--operator`` tells
  nothing a guesser could use; an unknown or revoked token gets the one generic refusal.
- Every request re-reads the agent: a revoked agent, or one re-issued with a new token, or one
  no longer an operator, ends its sessions at once (not after the API's 5 s cache).
- The cookie is ``HttpOnly; SameSite=Strict; Path=/dashboard``, and ``Secure`` unless the
  request reached a loopback address over plain HTTP (``DashboardSettings.secure_cookie``):
  no script can read it and no other site's page can make the browser send it.
- State-changing requests (replay, logout) also need the ``X-CSRF-Token`` header equal to the
  session's own random ``csrf`` value (given to the page in a ``<meta>`` tag) and, when the
  browser sends ``Origin``, an Origin equal to the request's own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import msgspec
import redis.asyncio as aioredis

from streamproc.errors import StreamprocError
from streamproc.ingest.auth import Agent, AgentStore
from streamproc.keys import Keys

__all__ = ("COOKIE", "NotOperator", "Session", "SessionStore", "csrf_ok", "session_key")

#: Name of the session cookie.
COOKIE = "sp_dashboard"


def session_key(keys: Keys, sid_sha256: str) -> str:
    """``<prefix>:dashboard:session:<sha256 of the session id>`` (hash, with a TTL).

    Built from ``keys.prefix`` here because ``streamproc/keys.py`` is not this package's
    file; it belongs there as ``Keys.dashboard_session``.
    """
    return f"{keys.prefix}:dashboard:session:{sid_sha256}"


def _sha256(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()


class Session(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    csrf: str


class NotOperator(StreamprocError):
    """A valid agent token without operator rights (``streamproc agents add NAME --operator``)."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        super().__init__(f"agent {agent!r} is not an operator")


class SessionStore:
    """Creates, checks and ends dashboard sessions in Redis."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, agents: AgentStore, *, ttl_s: int = 8 * 3600
    ) -> None:
        self.client, self.keys, self.agents, self.ttl_s = client, keys, agents, ttl_s
        self._agent_decoder = msgspec.json.Decoder(Agent)

    async def login(self, token: str) -> tuple[str, Session] | None:
        """A new session for an operator's token: (session id for the cookie, session).

        None when the token is unknown or revoked; NotOperator when it is an agent's without
        operator rights.
        """
        agent = await self.agents.authenticate(token)
        if agent is None:
            return None
        if not agent.operator:
            raise NotOperator(agent.name)
        sid = secrets.token_urlsafe(32)
        session = Session(agent=agent.name, csrf=secrets.token_urlsafe(24))
        key = session_key(self.keys, _sha256(sid))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "agent": agent.name,
                    "token_sha256": agent.token_sha256,
                    "csrf": session.csrf,
                },
            )
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        return sid, session

    async def check(self, sid: str | None) -> Session | None:
        """The live session of a cookie value, or None (unknown, expired, agent revoked)."""
        if not sid or len(sid) > 100:
            return None
        raw: dict[Any, Any] = await self.client.hgetall(session_key(self.keys, _sha256(sid)))
        if not raw:
            return None
        fields = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        record: Any = await self.client.hget(self.keys.agents(), fields.get("agent", ""))
        if record is None:
            return None
        agent = self._agent_decoder.decode(record)
        if not agent.operator or not hmac.compare_digest(
            agent.token_sha256, fields.get("token_sha256", "")
        ):
            return None
        return Session(agent=agent.name, csrf=fields.get("csrf", ""))

    async def logout(self, sid: str | None) -> None:
        if sid and len(sid) <= 100:
            await self.client.delete(session_key(self.keys, _sha256(sid)))


def csrf_ok(session: Session, header: str | None) -> bool:
    """The request's ``X-CSRF-Token`` matches the session's (constant time).

    Compared as bytes: ``hmac.compare_digest`` refuses a ``str`` with non-ASCII characters
    (TypeError), and a header is whatever bytes the client sent (aiohttp decodes them as
    UTF-8 with surrogate escapes). ``surrogatepass`` encodes any ``str``, so a header that
    is not the session's value is False, never an error.
    """
    if not header or not session.csrf:
        return False
    given = header.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(session.csrf.encode("utf-8", "surrogatepass"), given)
