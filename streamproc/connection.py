"""Redis clients and the start-up server check.

redis-py 8 retries every command on connection errors by default, XADD included, which can
add an entry twice; streamproc's clients never retry by themselves: the producer, consumer and
ticker retry where it is safe, with their own capped backoff.
"""

from __future__ import annotations

from typing import Any, cast

import hiredis
import msgspec
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, ClusterError, ResponseError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamproc.errors import (
    ConfigError,
    RedisUnavailable,
    RedisUrlError,
    ServerTooOld,
    UnsafeServerConfig,
)
from streamproc.settings import RedisSettings

__all__ = (
    "REDIS_DOWN",
    "ServerInfo",
    "check_eviction",
    "check_server",
    "connect",
    "connect_cluster",
    "is_cluster",
    "server_info",
)

log = structlog.get_logger("streamproc.connection")

#: Exceptions that mean "Redis is not reachable right now". On a Redis Cluster also: the
#: cluster is down or a slot has no master for the moment (a failover under way), and a command
#: redirected more times than redis-py allows (``ClusterError``: TTL exhausted); none of them
#: ran the command, so it is safe to send again.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    ClusterError,
    SlotNotCoveredError,
)

MIN_VERSION = (7, 0, 0)


class ServerInfo(msgspec.Struct, frozen=True):
    version: tuple[int, int, int]
    #: XADD/XTRIM ... ACKED and XACKDEL (8.2).
    has_acked_trim: bool
    #: XREADGROUP ... CLAIM (8.4).
    has_readgroup_claim: bool
    #: XINFO CONSUMERS reports ``inactive`` (7.2).
    has_consumer_inactive: bool
    #: XADD ... IDMP idempotent producer (8.6).
    has_idempotent_xadd: bool
    #: ``maxmemory_policy`` from ``INFO memory``; None when the server did not say.
    maxmemory_policy: str | None = None

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


class _HiredisPack:
    """Packs commands with hiredis (C) instead of redis-py's pure-Python asyncio packer.

    redis-py's asyncio ``pack_command`` re-joins its output buffer once per argument: for a
    100-event EVALSHA (about 1,400 arguments) that was a third of the ingest's CPU. Arguments
    hiredis does not take (and non-UTF-8 client encodings) go to redis-py's packer, so errors
    read the same.
    """

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        if self.encoder.encoding.lower().replace("-", "") != "utf8" or not args:
            return AbstractConnection.pack_command(self, *args)
        first = args[0]
        if isinstance(first, str):
            if " " in first:
                args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return AbstractConnection.pack_command(self, *args)


class _Connection(_HiredisPack, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPack, aioredis.SSLConnection):
    pass


class _UnixConnection(_HiredisPack, aioredis.UnixDomainSocketConnection):
    pass


_FAST_PACK: dict[type[Any], type[Any]] = {
    aioredis.Connection: _Connection,
    aioredis.SSLConnection: _SSLConnection,
    aioredis.UnixDomainSocketConnection: _UnixConnection,
}


def connect(settings: RedisSettings, *, for_reading: bool = False) -> aioredis.Redis:
    """A client with a bounded pool that waits for a free connection instead of failing.

    ``for_reading`` clients hold a connection per blocked XREADGROUP; give each reader its own.

    A ``redis+cluster://host:port`` URL gives redis-py's asyncio ``RedisCluster`` instead
    (see ``connect_cluster``), typed as ``Redis``: it has the same command methods, routes
    each command by the slot of its first key, and its pipelines split by node. Code that
    needs what only a single Redis has (its connection pool) asks ``is_cluster`` first.
    """
    if settings.cluster:
        return cast(aioredis.Redis, connect_cluster(settings))
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    pool.connection_class = _FAST_PACK.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def connect_cluster(settings: RedisSettings) -> RedisCluster:
    """A ``RedisCluster`` client for a ``redis+cluster://`` (or ``rediss+cluster://``) URL.

    Like ``connect``'s clients it never sends a command again by itself (``retry`` off): an
    XADD that timed out may have been applied. MOVED and ASK redirects are still followed
    (the command was not run where it was refused), and after a connection error the next
    command first reloads the slot map, so callers that retry (the producer, the consumer)
    reach the promoted replica after a failover. Each node's pool holds up to
    ``max_connections``; a full pool raises instead of waiting (redis-py's cluster nodes
    have no blocking pool), so size it for the readers' blocked XREADGROUPs.
    """
    scheme, sep, rest = settings.url.partition("+cluster://")
    if not sep:
        raise ConfigError(f"not a cluster URL: {settings.url!r}")
    client = RedisCluster.from_url(
        f"{scheme}://{rest}",
        max_connections=settings.max_connections,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    # Nodes found later are built from these kwargs (the same dict the nodes manager holds);
    # the startup node was built already.
    kwargs = client.get_connection_kwargs()
    cls: type[Any] = kwargs.get("connection_class") or aioredis.Connection
    kwargs["connection_class"] = _FAST_PACK.get(cls, cls)
    for node in client.startup_nodes:
        node.connection_class = _FAST_PACK.get(node.connection_class, node.connection_class)
    return client


def is_cluster(client: Any) -> bool:
    """The client is a ``RedisCluster`` (``connect`` with a ``redis+cluster://`` URL)."""
    return isinstance(client, RedisCluster)


def parse_version(text: str) -> tuple[int, int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:3]]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


async def check_server(client: aioredis.Redis, *, allow_eviction: bool = False) -> ServerInfo:
    """Read the server's version and eviction policy; refuse what streamproc cannot run on.

    ServerTooOld below Redis 7.0; UnsafeServerConfig when ``maxmemory-policy`` is not
    ``noeviction`` unless ``allow_eviction`` (``RedisSettings.allow_eviction``). The policy
    comes from ``INFO memory``: managed services often forbid ``CONFIG GET``.
    """
    try:
        info: dict[str, Any] = await client.info("server")
        memory: dict[str, Any] = await client.info("memory")
    except REDIS_DOWN as e:
        raise RedisUnavailable(f"cannot reach Redis: {e}") from e
    except ResponseError as e:  # SELECT at connect: no such database on this server
        if "DB index" not in str(e):
            raise
        pool: Any = getattr(client, "connection_pool", None)  # a cluster client has none
        db = pool.connection_kwargs.get("db", 0) if pool is not None else 0
        raise RedisUrlError(
            f"REDIS_URL: database {db} does not exist on this server ({e}; redis.conf "
            "`databases` sets how many there are, 16 by default)"
        ) from None
    found = server_info({**info, **memory})
    check_eviction(found, allow_eviction=allow_eviction)
    return found


#: Why each family of eviction policies breaks streamproc, for the refusal message.
_EVICTS = {
    "volatile": (
        "it evicts keys that have a TTL, and those are exactly the keys that make dedup "
        "(publish and consume markers), the ticker's lease and task state work: under memory "
        "pressure events are applied twice, two tickers lead and tasks vanish"
    ),
    "allkeys": (
        "it evicts any key, streams and consumer groups included: events are lost outright, "
        "besides the dedup markers, leases and task state"
    ),
}


def check_eviction(info: ServerInfo, *, allow_eviction: bool = False) -> None:
    """UnsafeServerConfig unless ``maxmemory-policy`` is ``noeviction`` or eviction is allowed.

    Under ``noeviction`` a full Redis refuses writes (OOM), which streamproc treats as an
    outage; any other policy deletes keys silently. A policy the server did not report is
    refused too: streamproc cannot tell it is safe.
    """
    policy = info.maxmemory_policy
    if policy == "noeviction":
        return
    if allow_eviction:
        log.warning("eviction_allowed", maxmemory_policy=policy)
        return
    override = (
        "If this Redis can never reach maxmemory, start anyway with STREAMPROC_ALLOW_EVICTION=1 "
        "(RedisSettings(allow_eviction=True))."
    )
    if policy is None:
        raise UnsafeServerConfig(
            "Redis did not report its maxmemory-policy (INFO memory has no maxmemory_policy): "
            "streamproc needs noeviction and cannot tell whether Redis evicts keys. " + override
        )
    why = _EVICTS.get(policy.partition("-")[0], "it deletes keys under memory pressure")
    raise UnsafeServerConfig(
        f"Redis maxmemory-policy is {policy}: streamproc needs noeviction, because {why}. "
        "Set it with CONFIG SET maxmemory-policy noeviction (or maxmemory-policy in "
        "redis.conf / the service's parameter group); a full Redis then refuses writes and "
        f"streamproc waits it out. {override}"
    )


def server_info(info: dict[str, Any]) -> ServerInfo:
    """What ``INFO server`` (and ``INFO memory``) say about the stream features and eviction.

    ServerTooOld below Redis 7.0. Pure: ``check_server`` reads the INFO, ``check_eviction``
    judges the policy.
    """
    raw = info.get("valkey_version") or info.get("redis_version") or "0"
    version = parse_version(str(raw))
    if "valkey_version" in info:
        # Valkey reports redis_version 7.2.4 for compatibility; it behaves like Redis 7.2.
        version = parse_version(str(info.get("redis_version", "7.2.4")))
    policy = info.get("maxmemory_policy")
    if version < MIN_VERSION:
        raise ServerTooOld(
            f"Redis {'.'.join(map(str, version))} is too old: streamproc needs Redis >= 7.0 "
            "(XAUTOCLAIM's deleted-ids reply and XINFO GROUPS lag)"
        )
    return ServerInfo(
        version=version,
        has_acked_trim=version >= (8, 2, 0),
        has_readgroup_claim=version >= (8, 4, 0),
        has_consumer_inactive=version >= (7, 2, 0),
        has_idempotent_xadd=version >= (8, 6, 0),
        maxmemory_policy=None if policy is None else str(policy),
    )
