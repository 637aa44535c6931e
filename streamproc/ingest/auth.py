"""Agents and their bearer tokens.

A token is ``spk_`` + 32 random bytes (``secrets.token_urlsafe``), printed once by
``streamproc agents add``. Redis keeps only its SHA-256: a fast hash is enough for a 256-bit
random secret (no dictionary to guess from; a slow KDF protects low-entropy passwords only).

One hash, ``Keys.agents()``, holds both directions so adding and revoking are one atomic step
on one key: ``<name>`` → JSON ``{name, token_sha256, types, operator, created_at}`` and
``sha256:<hex>`` → ``<name>``. Agent names cannot contain ``:``, so the two never collide.

Lookups are cached in memory for ``cache_s`` seconds: a revoked token is refused at most
``cache_s`` later by every ingest process. Known tokens and unknown ones are cached apart,
each in its own bounded LRU (``max_cached`` and ``max_cached_misses`` entries): a flood of
garbage tokens pushes out only other garbage, never an agent's cached token.

``authenticate(token, client=...)`` also counts failures per client address
(``FailureThrottle``, ``failures``): once a client is over it, its tokens that are not in the
cache are refused with ``AuthThrottled`` (429) without a Redis lookup, while a cached agent
from the same address (behind the same proxy) is still served.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from streamproc._lua import Lua
from streamproc.errors import ConfigError, StreamprocError
from streamproc.ingest.ratelimit import FailureThrottle
from streamproc.keys import Keys, check_name

__all__ = ("Agent", "AgentStore", "AuthThrottled", "hash_token", "new_token", "parse_types")

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
# KEYS[1] agents hash. ARGV: name, the record read, the new record. 0 if it changed since.
_REPLACE_LUA = Lua("""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
""")
# KEYS[1] agents hash. ARGV: token sha256. The agent's record, or nil.
_LOOKUP_LUA = Lua("""
local name = redis.call('HGET', KEYS[1], 'sha256:' .. ARGV[1])
if not name then return false end
return redis.call('HGET', KEYS[1], name)
""")


class AuthThrottled(StreamprocError):
    """The client failed to authenticate too often: refused before any lookup (429)."""

    def __init__(self, client: str, retry_after_s: int) -> None:
        self.client, self.retry_after_s = client, retry_after_s
        super().__init__(
            f"too many failed authentications from {client}; retry in {retry_after_s}s"
        )


class Agent(msgspec.Struct, frozen=True, kw_only=True):
    """An agent (or operator) allowed to call the ingest service."""

    name: str
    token_sha256: str
    #: fnmatch patterns of the event types it may post (``cluster.*``); empty = none.
    types: tuple[str, ...] = ()
    #: May use the task API (and later the dashboard).
    operator: bool = False
    #: fnmatch patterns of the clusters it speaks for: it reads their feeds and posts events
    #: whose ``cluster_id`` they match (``may_speak_for``); empty = none, so an agent without
    #: clusters posts no cluster event. A token with clusters and no types is a viewer: it
    #: reads feeds and posts nothing.
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

    def may_speak_for(self, cluster_id: str) -> bool:
        """May it post events about this cluster (its ``clusters`` patterns; operators may
        for every cluster). Which types it posts is ``may_post``'s question."""
        return self.operator or any(fnmatch.fnmatchcase(cluster_id, p) for p in self.clusters)


def new_token() -> str:
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class AgentStore:
    """Adds, lists, revokes and authenticates agents; shares one client with its caller."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        cache_s: float = 5.0,
        max_cached: int = 10_000,
        max_cached_misses: int = 10_000,
        failures: FailureThrottle | None = None,
    ) -> None:
        self.client, self.keys, self.cache_s = client, keys, cache_s
        self.max_cached, self.max_cached_misses = max_cached, max_cached_misses
        #: Known tokens: digest → (expiry, agent), least recently used first.
        self._cache: OrderedDict[str, tuple[float, Agent]] = OrderedDict()
        #: Unknown tokens: digest → expiry, apart so that garbage never evicts an agent.
        self._misses: OrderedDict[str, float] = OrderedDict()
        #: ``get`` by name: name → (expiry, agent or None).
        self._by_name: OrderedDict[str, tuple[float, Agent | None]] = OrderedDict()
        #: Failed authentications per client address (``authenticate(..., client=)``):
        #: 300 at once, then 10 a second.
        self.failures = failures or FailureThrottle(burst=300, refill_per_s=10.0)
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

    async def set_clusters(self, name: str, clusters: Sequence[str]) -> Agent | None:
        """Replace an agent's ``clusters`` (its token stays); None if there is no such agent.

        Ingest processes see the change within their ``cache_s``.
        """
        while True:
            raw: Any = await self.client.hget(self.keys.agents(), name)
            if raw is None:
                return None
            agent = msgspec.structs.replace(self._decoder.decode(raw), clusters=tuple(clusters))
            if await _REPLACE_LUA(
                self.client, [self.keys.agents()], [name, raw, msgspec.json.encode(agent)]
            ):
                return agent

    async def get(self, name: str) -> Agent | None:
        """The agent called ``name`` (no token needed), cached ``cache_s`` like tokens: what
        consumers use to check an event's ``source``. Redis errors propagate."""
        now = time.monotonic()
        hit = self._by_name.get(name)
        if hit is not None and hit[0] > now:
            self._by_name.move_to_end(name)
            return hit[1]
        raw: Any = None if ":" in name else await self.client.hget(self.keys.agents(), name)
        agent = self._decoder.decode(raw) if raw else None
        if self.cache_s:
            _remember(self._by_name, name, (now + self.cache_s, agent), self.max_cached)
        return agent

    async def revoke(self, name: str) -> bool:
        return bool(await _REVOKE_LUA(self.client, [self.keys.agents()], [name]))

    async def list(self) -> list[Agent]:
        raw: Any = await self.client.hgetall(self.keys.agents())
        return sorted(
            (self._decoder.decode(v) for k, v in raw.items() if not k.startswith(b"sha256:")),
            key=lambda a: a.name,
        )

    async def authenticate(self, token: str, *, client: str | None = None) -> Agent | None:
        """The agent owning ``token``, or None. Redis errors propagate (the caller says 503).

        ``client``: the caller's address. A failure counts against it, and once it is over
        its ``failures`` budget a token not in the cache raises ``AuthThrottled`` unlooked-up.
        """
        digest = hash_token(token) if _plausible(token) else None
        now = time.monotonic()
        if digest is not None:
            hit = self._cache.get(digest)
            if hit is not None:
                if hit[0] > now:
                    self._cache.move_to_end(digest)
                    return hit[1]
                del self._cache[digest]
        if client is not None:
            wait_s = self.failures.retry_after_s(client)
            if wait_s:
                raise AuthThrottled(client, wait_s)
        agent = None if digest is None else await self._lookup(digest, now)
        if agent is None and client is not None:
            self.failures.failed(client)
        return agent

    async def _lookup(self, digest: str, now: float) -> Agent | None:
        missed = self._misses.get(digest)
        if missed is not None:
            if missed > now:
                return None
            del self._misses[digest]
        raw = await _LOOKUP_LUA(self.client, [self.keys.agents()], [digest])
        agent = self._decoder.decode(raw) if raw else None
        # The lookup was by digest; compare again in constant time before trusting it.
        if agent is not None and not hmac.compare_digest(agent.token_sha256, digest):
            agent = None
        if self.cache_s:
            expiry = now + self.cache_s
            if agent is not None:
                _remember(self._cache, digest, (expiry, agent), self.max_cached)
            else:
                _remember(self._misses, digest, expiry, self.max_cached_misses)
        return agent


def _plausible(token: str) -> bool:
    return token.startswith(_TOKEN_PREFIX) and len(token) <= 200


def _remember(lru: OrderedDict[str, Any], key: str, value: Any, most: int) -> None:
    """Put ``key`` last in ``lru``; drop the least recently used beyond ``most``."""
    lru[key] = value
    lru.move_to_end(key)
    while len(lru) > most:
        lru.popitem(last=False)


def parse_types(values: Iterable[str]) -> list[str]:
    """``--types`` values, comma- or space-separated, deduplicated in order."""
    out: list[str] = []
    for v in values:
        for p in v.replace(",", " ").split():
            if p not in out:
                out.append(p)
    return out
