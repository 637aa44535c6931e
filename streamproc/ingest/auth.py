"""Agents and their bearer tokens.

A token is ``spk_`` + 32 random bytes (``secrets.token_urlsafe``), printed once by
``streamproc agents add``. Redis keeps only its SHA-256: a fast hash is enough for a 256-bit
random secret (no dictionary to guess from; a slow KDF protects low-entropy passwords only).

One hash, ``Keys.agents()``, holds both directions so adding and revoking are one atomic step
on one key: ``<name>`` → JSON ``{name, token_sha256, types, operator, created_at}`` and
``sha256:<hex>`` → ``<name>``. Agent names cannot contain ``:``, so the two never collide.

Lookups are cached in memory for ``cache_s`` seconds (hits and misses): a revoked token is
refused at most ``cache_s`` later by every ingest process.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from streamproc._lua import Lua
from streamproc.errors import ConfigError
from streamproc.keys import Keys, check_name

__all__ = ("Agent", "AgentStore", "hash_token", "new_token", "parse_types")

_TOKEN_PREFIX = "spk_"
_FIELD = "sha256:"

# KEYS[1] agents hash. ARGV: name, record JSON, token sha256. 0 if the name exists.
_ADD_LUA = Lua("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'sha256:' .. ARGV[3], ARGV[1])
return 1
""")
# KEYS[1] agents hash. ARGV: name. 1 if it existed.
_REVOKE_LUA = Lua("""
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if not rec then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1], 'sha256:' .. cjson.decode(rec)['token_sha256'])
return 1
""")
# KEYS[1] agents hash. ARGV: token sha256. The agent's record, or nil.
_LOOKUP_LUA = Lua("""
local name = redis.call('HGET', KEYS[1], 'sha256:' .. ARGV[1])
if not name then return false end
return redis.call('HGET', KEYS[1], name)
""")


class Agent(msgspec.Struct, frozen=True, kw_only=True):
    """An agent (or operator) allowed to call the ingest service."""

    name: str
    token_sha256: str
    #: fnmatch patterns of the event types it may post (``cluster.*``); empty = none.
    types: tuple[str, ...] = ()
    #: May use the task API (and later the dashboard).
    operator: bool = False
    #: fnmatch patterns of the clusters whose feeds it may read; empty = none. A token with
    #: clusters and no types is a viewer: it reads feeds and posts nothing.
    clusters: tuple[str, ...] = ()
    #: fnmatch patterns of the task types it may submit (``crawl.*``), and read and cancel
    #: its own tasks of; empty = none. Operators submit any type and see every task.
    submit: tuple[str, ...] = ()
    created_at: str = ""

    def may_submit(self, task_type: str) -> bool:
        return self.operator or any(fnmatch.fnmatchcase(task_type, p) for p in self.submit)

    def may_post(self, type_name: str) -> bool:
        return any(fnmatch.fnmatchcase(type_name, p) for p in self.types)

    def may_read(self, cluster_id: str) -> bool:
        """May it read this cluster's feed (operators read every cluster's)."""
        return self.operator or any(fnmatch.fnmatchcase(cluster_id, p) for p in self.clusters)


def new_token() -> str:
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class AgentStore:
    """Adds, lists, revokes and authenticates agents; shares one client with its caller."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, cache_s: float = 5.0, max_cached: int = 10_000
    ) -> None:
        self.client, self.keys, self.cache_s, self.max_cached = client, keys, cache_s, max_cached
        self._cache: dict[str, tuple[float, Agent | None]] = {}
        self._decoder = msgspec.json.Decoder(Agent)

    async def add(
        self,
        name: str,
        *,
        types: Sequence[str] = (),
        operator: bool = False,
        clusters: Sequence[str] = (),
        submit: Sequence[str] = (),
    ) -> tuple[Agent, str]:
        """Create an agent; return it and its token (the only time the token exists)."""
        check_name("agent", name)
        token = new_token()
        agent = Agent(
            name=name,
            token_sha256=hash_token(token),
            types=tuple(types),
            operator=operator,
            clusters=tuple(clusters),
            submit=tuple(submit),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        added = await _ADD_LUA(
            self.client,
            [self.keys.agents()],
            [name, msgspec.json.encode(agent), agent.token_sha256],
        )
        if not added:
            raise ConfigError(f"agent {name!r} exists: revoke it first to issue a new token")
        return agent, token

    async def revoke(self, name: str) -> bool:
        return bool(await _REVOKE_LUA(self.client, [self.keys.agents()], [name]))

    async def list(self) -> list[Agent]:
        raw: Any = await self.client.hgetall(self.keys.agents())
        return sorted(
            (self._decoder.decode(v) for k, v in raw.items() if not k.startswith(b"sha256:")),
            key=lambda a: a.name,
        )

    async def authenticate(self, token: str) -> Agent | None:
        """The agent owning ``token``, or None. Redis errors propagate (the caller says 503)."""
        if not token.startswith(_TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await _LOOKUP_LUA(self.client, [self.keys.agents()], [digest])
        agent = self._decoder.decode(raw) if raw else None
        # The lookup was by digest; compare again in constant time before trusting it.
        if agent is not None and not hmac.compare_digest(agent.token_sha256, digest):
            agent = None
        if self.cache_s:
            if len(self._cache) >= self.max_cached:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_s, agent)
        return agent


def parse_types(values: Iterable[str]) -> list[str]:
    """``--types`` values, comma- or space-separated, deduplicated in order."""
    out: list[str] = []
    for v in values:
        for p in v.replace(",", " ").split():
            if p not in out:
                out.append(p)
    return out
