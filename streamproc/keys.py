"""Every Redis key streamproc uses, built in one place.

An operator can find all of them with ``redis-cli --scan --pattern '<prefix>:*'``. Keys that
one atomic step touches together (a stream, its groups' retry schedules, dead letters and dedup
markers) share the hash tag ``{<topic>}`` so the same scripts run on Redis Cluster.

| key | type | what |
|---|---|---|
| ``<p>:{<topic>}:stream`` | stream | the events of a topic |
| ``<p>:{<topic>}:retry:<group>`` | stream | retries that came due, read by that group only |
| ``<p>:{<topic>}:delayed:<group>`` | zset | retries waiting for their time (score = due epoch ms) |
| ``<p>:{<topic>}:dlq:<group>`` | stream | dead letters of that group for that topic |
| ``<p>:{<topic>}:seen:<group>:<event id>`` | string, PX | consumer-side dedup marker |
| ``<p>:{<topic>}:pub:<event id or idem. key>`` | string, PX | producer dedup: first entry id |
| ``<p>:state:<name>…`` | any | state kept by handlers (e.g. risky spot pools) |
| ``<p>:ticker:*`` | string/hash | ticker lease, fencing counter, last fire times |
| ``<p>:agents`` | hash | ingest agents: name → token hash and scopes |
"""

from __future__ import annotations

import re

from streamproc.errors import ConfigError

__all__ = ("NAME_RE", "Keys", "check_name")

#: Topic, group and consumer names: short, printable, no hash-tag or separator characters.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid topic/group/consumer name, else raise ConfigError."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(
            f"invalid {kind} name {value!r}: expected 1-63 characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    return value


class Keys:
    """Builds key names under one prefix (tests use a unique prefix each)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "sp") -> None:
        self.prefix = check_name("key prefix", prefix)

    def stream(self, topic: str) -> str:
        return f"{self.prefix}:{{{topic}}}:stream"

    def retry_stream(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{{{topic}}}:retry:{group}"

    def delayed(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{{{topic}}}:delayed:{group}"

    def dlq(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{{{topic}}}:dlq:{group}"

    def seen_prefix(self, topic: str, group: str) -> str:
        """Dedup markers are ``seen_prefix + event_id``."""
        return f"{self.prefix}:{{{topic}}}:seen:{group}:"

    def published_prefix(self, topic: str) -> str:
        """Producer dedup markers are ``published_prefix + event id or idempotency key``."""
        return f"{self.prefix}:{{{topic}}}:pub:"

    def state(self, *parts: str) -> str:
        return ":".join((self.prefix, "state", *parts))

    def ticker(self, *parts: str) -> str:
        return ":".join((self.prefix, "ticker", *parts))

    def agents(self) -> str:
        return f"{self.prefix}:agents"

    def topic_of(self, stream_key: str) -> str:
        """The topic of a key built here (the text inside the hash tag)."""
        start = stream_key.index("{") + 1
        return stream_key[start : stream_key.index("}", start)]
