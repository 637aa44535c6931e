"""Subscriptions: who gets which notifications, by which channel.

A subscription belongs to one cluster (tenant), or to ``*`` (every cluster, and the reports,
which are about none). It names a channel (``webhook``, ``slack``, ``email``), a destination
(a URL, a Slack incoming-webhook URL, an email address), the lowest severity it wants and the
notification types it wants (fnmatch patterns: ``notify.*``, ``report.ready``).

Stored in Redis: ``<p>:state:notify:subs:<cluster>`` (hash id → JSON) per cluster, and
``<p>:state:notify:sub-index`` (id → cluster), changed together in one script. Secrets (a
webhook's signing key, a Slack URL, which is its own secret) are stored as given and never
printed back: ``public()`` is what the CLI and the API show. A webhook's signing key is
generated (``whsec_`` + 32 random bytes, the Standard Webhooks form) unless given, and shown
once when the subscription is added.
"""

from __future__ import annotations

import base64
import fnmatch
import re
import secrets
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis

from schemas.notify import Message
from streamproc._lua import Lua
from streamproc.errors import ConfigError
from streamproc.keys import Keys

__all__ = (
    "SEVERITIES",
    "Subscription",
    "SubscriptionStore",
    "breaker_name",
    "mask_url",
    "new_subscription",
)

Channel = Literal["webhook", "slack", "email"]
Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
CHANNELS: tuple[str, ...] = ("webhook", "slack", "email")
#: Notification types a subscription can name (patterns must match at least one).
TYPES: tuple[str, ...] = (
    "notify.notification",
    "notify.rightsizing",
    "notify.pod_pending",
    "report.ready",
)
CLUSTER_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9_.\-]{0,62})$")
_EMAIL_RE = re.compile(r"^[^@\s<>\"',;]{1,64}@[A-Za-z0-9.\-]{1,190}\.[A-Za-z]{2,63}$")
_MAX_SUBSCRIPTIONS_PER_CLUSTER = 1000


class Subscription(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    #: A cluster id, or ``*`` for every cluster and the reports.
    cluster: str
    channel: Channel
    destination: str
    #: Webhooks: the Standard Webhooks signing key (``whsec_...``).
    secret: str = ""
    min_severity: Severity = "info"
    #: fnmatch patterns of the notification types wanted.
    types: tuple[str, ...] = ("*",)
    created_at: str = ""

    def wants(self, message: Message) -> bool:
        if SEVERITIES.index(message.severity) < SEVERITIES.index(self.min_severity):
            return False
        return any(fnmatch.fnmatchcase(message.type, p) for p in self.types)

    def public(self) -> dict[str, Any]:
        """What may be shown: no signing key, a Slack URL masked, a URL's query masked."""
        out = msgspec.structs.asdict(self)
        del out["secret"]
        out["types"] = list(self.types)
        if self.channel != "email":
            out["destination"] = mask_url(self.destination, self.channel)
        out["signed"] = bool(self.secret)
        return out


def mask_url(url: str, channel: str = "webhook") -> str:
    """A URL fit to print: no user info or query; for Slack only the host (the path is the
    secret)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = u.hostname or ""
    netloc = host + (f":{u.port}" if u.port else "")
    if channel == "slack":
        return f"{u.scheme}://{netloc}/…{u.path[-4:] if len(u.path) > 12 else ''}"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "…" if u.query else "", ""))


def breaker_name(sub: Subscription, ses_region: str) -> str:
    """The destination's breaker: one per host for HTTP, one per SES region for email."""
    if sub.channel == "email":
        return f"ses:{ses_region}"
    u = urllib.parse.urlsplit(sub.destination)
    port = u.port or (443 if u.scheme == "https" else 80)
    return f"{sub.channel}:{u.scheme}://{u.hostname}:{port}"


def _check_destination(channel: str, destination: str) -> None:
    if len(destination) > 2048:
        raise ConfigError("destination: longer than 2048 characters")
    if channel == "email":
        if not _EMAIL_RE.fullmatch(destination):
            raise ConfigError(f"destination: {destination!r} is not an email address")
        return
    try:
        u = urllib.parse.urlsplit(destination)
        u.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ConfigError(f"destination: not a URL: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"destination: expected an http(s) URL, not {destination!r}")
    if any(c in destination for c in "\r\n\t "):
        raise ConfigError("destination: URLs may not contain whitespace")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _check_secret(secret: str) -> None:
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError:
        raise ConfigError("secret: expected whsec_ + base64 (Standard Webhooks)") from None
    if not 24 <= len(key) <= 64:
        raise ConfigError("secret: the key must be 24 to 64 bytes")


def new_subscription(
    *,
    cluster: str,
    channel: str,
    destination: str,
    min_severity: str = "info",
    types: Sequence[str] = ("*",),
    secret: str = "",
) -> Subscription:
    """A checked subscription with a new id (and a new signing key for a webhook)."""
    if not isinstance(cluster, str) or not CLUSTER_RE.fullmatch(cluster):
        raise ConfigError(f"cluster: {cluster!r} is not a cluster id or '*'")
    if channel not in CHANNELS:
        raise ConfigError(f"channel: {channel!r} is not one of {', '.join(CHANNELS)}")
    if min_severity not in SEVERITIES:
        raise ConfigError(f"min_severity: {min_severity!r} is not one of {', '.join(SEVERITIES)}")
    if not isinstance(destination, str) or not destination:
        raise ConfigError("destination: required")
    _check_destination(channel, destination)
    types = tuple(types) or ("*",)
    if len(types) > 20:
        raise ConfigError("types: at most 20 patterns")
    for p in types:
        if not isinstance(p, str) or not fnmatch.filter(TYPES, p):
            raise ConfigError(f"types: {p!r} matches no notification type ({', '.join(TYPES)})")
    if channel == "webhook":
        secret = secret or new_secret()
        _check_secret(secret)
    elif secret:
        raise ConfigError("secret: only webhooks are signed")
    return msgspec.convert(
        {
            "id": "sub_" + secrets.token_hex(8),
            "cluster": cluster,
            "channel": channel,
            "destination": destination,
            "secret": secret,
            "min_severity": min_severity,
            "types": types,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        Subscription,
    )


# KEYS[1] the cluster's hash, KEYS[2] the index. ARGV: id, cluster, JSON, max per cluster.
_ADD = Lua("""
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""")
# KEYS[1] the cluster's hash, KEYS[2] the index. ARGV: id, cluster. 1 if it was there.
_REMOVE = Lua("""
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
""")


class SubscriptionStore:
    """Adds, lists, removes and matches subscriptions; matching reads are cached ``cache_s``."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, cache_s: float = 1.0) -> None:
        self.client, self.keys, self.cache_s = client, keys, cache_s
        self._decoder = msgspec.json.Decoder(Subscription)
        self._cache: dict[str, tuple[float, list[Subscription]]] = {}

    def _hash(self, cluster: str) -> str:
        return self.keys.state("notify", "subs", cluster)

    async def add(self, sub: Subscription) -> Subscription:
        ok = await _ADD(
            self.client,
            [self._hash(sub.cluster), self.keys.state("notify", "sub-index")],
            [sub.id, sub.cluster, msgspec.json.encode(sub), _MAX_SUBSCRIPTIONS_PER_CLUSTER],
        )
        if not ok:
            raise ConfigError(
                f"cluster {sub.cluster!r} has {_MAX_SUBSCRIPTIONS_PER_CLUSTER} subscriptions "
                "already (the limit)"
            )
        self._cache.pop(sub.cluster, None)
        return sub

    async def remove(self, sub_id: str, *, cluster: str | None = None) -> bool:
        """Remove by id; with ``cluster``, only if it belongs to that cluster."""
        index = self.keys.state("notify", "sub-index")
        have: Any = await self.client.hget(index, sub_id)
        if have is None or (cluster is not None and have.decode() != cluster):
            return False
        removed = bool(
            await _REMOVE(self.client, [self._hash(have.decode()), index], [sub_id, have])
        )
        self._cache.clear()
        return removed

    async def get(self, sub_id: str) -> Subscription | None:
        cluster: Any = await self.client.hget(self.keys.state("notify", "sub-index"), sub_id)
        if cluster is None:
            return None
        raw = await self.client.hget(self._hash(cluster.decode()), sub_id)
        return self._decoder.decode(raw) if raw else None

    async def all(self, cluster: str | None = None) -> list[Subscription]:
        if cluster is not None:
            return sorted(await self._read(cluster), key=lambda s: (s.cluster, s.id))
        index: dict[bytes, bytes] = await self.client.hgetall(  # type: ignore[assignment]
            self.keys.state("notify", "sub-index")
        )
        out: list[Subscription] = []
        for c in sorted({v.decode() for v in index.values()}):
            out += await self._read(c)
        return sorted(out, key=lambda s: (s.cluster, s.id))

    async def _read(self, cluster: str) -> list[Subscription]:
        raw: dict[bytes, bytes] = await self.client.hgetall(self._hash(cluster))  # type: ignore[assignment]
        return [self._decoder.decode(v) for v in raw.values()]

    async def matching(self, message: Message) -> list[Subscription]:
        """The subscriptions that want ``message``: its cluster's and the ``*`` ones."""
        clusters: Iterable[str] = ("*", message.cluster_id) if message.cluster_id else ("*",)
        out: list[Subscription] = []
        now = time.monotonic()
        for c in clusters:
            cached = self._cache.get(c)
            if cached is None or cached[0] <= now:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                cached = (now + self.cache_s, await self._read(c))
                self._cache[c] = cached
            out += (s for s in cached[1] if s.wants(message))
        return sorted(out, key=lambda s: s.id)
