"""Every Redis key streamproc uses, built in one place.

An operator can find all of them with ``redis-cli --scan --pattern '<prefix>:*'``. Keys that
one atomic step touches together (a stream, its groups' retry schedules, dead letters and dedup
markers) share the hash tag ``{<topic>}`` so the same scripts run on Redis Cluster.

**Partitioned topics.** A topic declared with N partitions (``Keys(partitions={"cluster": 6})``)
is N topics on the wire: ``<topic>.p00`` … ``<topic>.p05`` (two digits at least), each with its
own stream, groups, retries, DLQs and markers under the tag ``{<topic>.pNN}``, so each lives on
one slot and the partitions spread over a cluster's masters. An event goes to partition
``crc32(key) mod N`` (zlib's CRC-32 of the key's UTF-8 bytes: stable across processes,
languages and restarts); one with an empty key to ``crc32(id) mod N`` (no order to keep: it is
spread). Every key of the table below is then built with the partition's name as ``<topic>``.

| key | type | what |
|---|---|---|
| ``<p>:{<topic>}:stream`` | stream | the events of a topic |
| ``<p>:topics`` | set | every topic with a stream (group created, or a producer wrote it) |
| ``<p>:{<topic>}:retry:<group>`` | stream | retries that came due, read by that group only |
| ``<p>:{<topic>}:delayed:<group>`` | zset | retries waiting for their time (score = due epoch ms) |
| ``<p>:{<topic>}:dlq:<group>`` | stream | dead letters of that group for that topic |
| ``<p>:{<topic>}:pub:<gen>:<shard>`` | hash, PXAT | producer dedup records of a generation: |
| | | 8-byte digest of event id / idem. key → first entry id (``producer._PUBLISH``) |
| ``<p>:{<topic>}:pub:meta`` | hash | the current generation ``g``, its shards, records, window |
| ``<p>:{<topic>}:pub:seq:<producer>`` | string, PX | ``<last>|<seq>=<entry id>,…`` (last call) |
| ``<p>:{<topic>}:failed:<group>:<s|r>:<id>`` | string, PX | this failure's retry/DLQ is written |
| ``<p>:{<topic>}:upkeep:<group>`` | hash | group clock: last renewal ``tick``, ``outage_end`` |
| ``<p>:{<topic>}:hold:<group>`` | hash | ordered groups: event key → origin entry id of its head |
| ``<p>:{<topic>}:parked:<group>:<event key>`` | list | retry records parked behind the head |
| ``<p>:{<topic>}:replays:<group>`` | hash | operator replays, resets, DLQ replays: counts |
| ``<p>:consumer:<group>:<name>`` | string, PX | a live consumer's claim on its name |
| ``<p>:{consumers}`` | hash, 1 h | consumer heartbeats: ``<host>/<pid>/<token>/<group>`` → JSON |
| ``<p>:{consumers}:seen`` | zset, 1 h | the same fields → last heartbeat (Redis' clock, ms) |
| ``<p>:{own:<group>}:members`` | zset | partitioned groups: live consumer → lease expiry ms |
| ``<p>:{own:<group>}:lease:<partition>`` | string, PX | the partition's owner (consumer name) |
| ``<p>:state:<name>…`` | any | state kept by handlers (e.g. risky spot pools) |
| ``<p>:{<topic>}:state:<name>…`` | any | state effects write (``ctx.effect``), topic slot |
| ``<p>:ticker:{ticker}:lease`` | string, PX | ticker leader: ``<node>/<fence>`` |
| ``<p>:ticker:{ticker}:fence`` | string | fencing counter (INCR per lease acquired) |
| ``<p>:ticker:{ticker}:last`` | hash | schedule → last fired scheduled time (epoch ms) |
| ``<p>:ticker:{ticker}:outbox`` | stream | cluster only: runtime ticks not yet published |
| ``<p>:{breakers}:<name>`` | hash | a circuit breaker: state, failures, opened/hold times |
| ``<p>:{breakers}`` | zset | every breaker used (member = name, score = last change ms) |
| ``<p>:agents`` | hash | ingest agents: name → JSON (sha256 of token, scopes); sha256 → name |
| ``<p>:{ratelimit}:<agent>`` | hash | ingest: the agent's token bucket (tokens, ms) |
| ``<p>:{task:<id>}:state`` | hash, 24 h | a task's status, progress, result, timestamps |
| ``<p>:{task:<id>}:cancel`` | list | a running task's cancel signal (BLPOP by its runner) |
| ``<p>:{tasks:<queue>}:slots`` | zset | a queue's running tasks (member → lease expiry, ms) |
| ``<p>:{tasks:<queue>}:waiting`` | zset | tasks waiting for a queue slot (score: priority, age) |
| ``<p>:{tasks:<queue>}:type:<type>:…`` | zset | the same three for one task type of the queue |
| ``<p>:tasks:runners`` | hash | live task runners: ``<consumer>@<queue>`` → JSON (load, shedding) |
| ``<p>:tasks:history`` | zset | finished task ids (score: finish time ms), kept for the task TTL |
| ``<p>:tasks:active`` | zset | queued and running task ids (score: created ms), until they end |
| ``<p>:tasks:stats`` | hash | ``<type>:<completed|failed|cancelled|runs|ms>`` → count |
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping

from streamproc.errors import ConfigError

__all__ = ("MAX_PARTITIONS", "NAME_RE", "Keys", "check_name", "partition_index")

#: The most partitions a topic may have.
MAX_PARTITIONS = 1024

#: Topic, group and consumer names: short, printable, no hash-tag or separator characters.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid topic/group/consumer name, else raise ConfigError."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ConfigError(
            f"invalid {kind} name {value!r}: expected 1-63 characters of letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    return value


def partition_index(event_key: str, event_id: str, partitions: int) -> int:
    """The partition of an event: CRC-32 of its key mod ``partitions``; of its id when the
    key is empty."""
    return zlib.crc32((event_key or event_id).encode()) % partitions


class Keys:
    """Builds key names under one prefix (tests use a unique prefix each).

    ``partitions``: topic -> number of partitions, for the topics that have them; every role
    (producers, consumers, operator tools) must be given the same mapping.
    """

    __slots__ = ("_names", "partitions", "prefix")

    def __init__(self, prefix: str = "sp", *, partitions: Mapping[str, int] | None = None) -> None:
        self.prefix = check_name("key prefix", prefix)
        self.partitions: dict[str, int] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        for topic, n in (partitions or {}).items():
            check_name("topic", topic)
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PARTITIONS:
                raise ConfigError(
                    f"topic {topic!r}: partitions must be an integer 1..{MAX_PARTITIONS}, got {n!r}"
                )
            width = max(2, len(str(n - 1)))
            names = tuple(f"{topic}.p{i:0{width}d}" for i in range(n))
            check_name("partition", names[-1])
            self.partitions[topic], self._names[topic] = n, names

    def partitions_of(self, topic: str) -> tuple[str, ...]:
        """The names the topic is stored under: its partitions', or ``(topic,)`` itself."""
        return self._names.get(topic) or (topic,)

    def all_partitions(self, topics: Iterable[str]) -> list[str]:
        """``partitions_of`` every topic, in order."""
        return [p for t in topics for p in self.partitions_of(t)]

    def partition(self, topic: str, event_key: str, event_id: str) -> str:
        """The name an event of ``topic`` is stored under (``partition_index``)."""
        names = self._names.get(topic)
        if names is None:
            return topic
        return names[partition_index(event_key, event_id, len(names))]

    def stream(self, topic: str) -> str:
        return f"{self.prefix}:{{{topic}}}:stream"

    def topics(self) -> str:
        """Set: every topic that has (had) a stream, so readers need no SCAN."""
        return f"{self.prefix}:topics"

    def retry_stream(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{{{topic}}}:retry:{group}"

    def delayed(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{{{topic}}}:delayed:{group}"

    def dlq(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{{{topic}}}:dlq:{group}"

    def failed(self, stream: str, group: str, entry_id: bytes) -> bytes:
        """Marker of a failed entry whose retry or dead letter is written (one per failure)."""
        kind = "r" if ":retry:" in stream else "s"
        topic = self.topic_of(stream)
        return f"{self.prefix}:{{{topic}}}:failed:{group}:{kind}:".encode() + entry_id

    def upkeep(self, topic: str, group: str) -> str:
        """Hash: the group's upkeep clock (``tick``, ``outage_end``: Redis' time, ms)."""
        return f"{self.prefix}:{{{topic}}}:upkeep:{group}"

    def replays(self, topic: str, group: str) -> str:
        """Hash: what ``streamproc replay`` / ``group reset`` did to the group on this topic
        (``replayed``, ``runs``, ``resets``, ``handled_again``, ``last_ms``, ``last``); and
        ``dlq_replayed``: its dead letters replayed (``dlq replay``, the dashboard)."""
        return f"{self.prefix}:{{{topic}}}:replays:{group}"

    def hold(self, topic: str, group: str) -> str:
        """Hash of an ordered group (``Concern(ordered=True)``): event key → the origin entry id
        of the entry that holds the key back (retrying, or released from the parked list)."""
        return f"{self.prefix}:{{{topic}}}:hold:{group}"

    def parked(self, topic: str, group: str, event_key: bytes) -> bytes:
        """List: retry records of one key's entries parked behind its head, in stream order.
        Bytes: an event key comes from the entry and need not be UTF-8."""
        return f"{self.prefix}:{{{topic}}}:parked:{group}:".encode() + event_key

    def consumer_lease(self, group: str, consumer: str) -> str:
        """A live consumer's claim on its name in a group: ``<host>/<pid>/<token>``, PX."""
        return f"{self.prefix}:consumer:{group}:{consumer}"

    def consumers(self) -> str:
        """Hash: one heartbeat record (JSON) per consumer process and group, field
        ``<host>/<pid>/<token>/<group>`` (``streamproc.presence``); dropped after an hour."""
        return f"{self.prefix}:{{consumers}}"

    def consumers_seen(self) -> str:
        """Sorted set beside ``consumers``: field → when it last beat (Redis' clock, ms).
        Tagged ``{consumers}`` with the hash: one script writes both (Redis Cluster)."""
        return f"{self.prefix}:{{consumers}}:seen"

    def owners(self, group: str) -> str:
        """Sorted set of a group with partitioned topics: its live consumers (member = name,
        score = when its membership lapses, Redis' clock in ms). Tagged ``{own:<group>}``
        with the partition leases: one script balances them (Redis Cluster)."""
        return f"{self.prefix}:{{own:{group}}}:members"

    def partition_lease(self, group: str, partition: str) -> str:
        """Which consumer of ``group`` owns ``partition`` (a name from ``partitions_of``):
        the consumer's name, PX; renewed with the consumer's heartbeat."""
        return f"{self.prefix}:{{own:{group}}}:lease:{partition}"

    def published_prefix(self, topic: str) -> str:
        """Producer dedup state: ``published_prefix`` + ``meta``, ``seq:<producer>`` and the
        generations' shard hashes ``<gen>:<shard>``."""
        return f"{self.prefix}:{{{topic}}}:pub:"

    def state(self, *parts: str) -> str:
        return ":".join((self.prefix, "state", *parts))

    def topic_state(self, topic: str, *parts: str) -> str:
        """State that the effects of ``topic``'s events write (``ctx.effect``): the settle
        script applies effects with the ack, so on Redis Cluster their keys must live in the
        slot of the topic's stream, which this tag gives them: in a handler,
        ``ctx.effect("HINCRBY", ctx.keys.topic_state(ctx.topic, "counts"), field, 1)``."""
        return ":".join((f"{self.prefix}:{{{topic}}}", "state", *parts))

    def ticker(self, *parts: str) -> str:
        return ":".join((self.prefix, "ticker", *parts))

    def ticker_lease(self) -> str:
        """The ticker leader's lease: ``<node>/<fence>``, PX = lease TTL."""
        return self.ticker("{ticker}", "lease")

    def ticker_fence(self) -> str:
        """Fencing counter: INCR on every lease acquisition."""
        return self.ticker("{ticker}", "fence")

    def ticker_last(self) -> str:
        """Hash: schedule name -> last fired scheduled time (epoch ms)."""
        return self.ticker("{ticker}", "last")

    def ticker_defs(self) -> str:
        """Hash: runtime schedule name -> its definition (``streamproc.scheduler``)."""
        return self.ticker("{ticker}", "defs")

    def ticker_due(self) -> str:
        """Sorted set: runtime schedule name, scored by its next scheduled time (epoch ms)."""
        return self.ticker("{ticker}", "due")

    def ticker_outbox(self) -> str:
        """Stream (Redis Cluster only): runtime ticks fired and not yet published to their
        topics (``streamproc.scheduler``)."""
        return self.ticker("{ticker}", "outbox")

    def render_artefact(self, *parts: str) -> str:
        """Object-store key (not a Redis key) of a render's artefact: ``renders/<parts>``."""
        return "/".join(("renders", *parts))

    def breaker(self, name: str) -> str:
        """Hash: the circuit breaker of one outside destination (``streamproc.breaker``).
        Tagged ``{breakers}`` with the index: one script updates both (Redis Cluster)."""
        return f"{self.prefix}:{{breakers}}:{name}"

    def breakers(self) -> str:
        """Sorted set: every breaker name, scored by its last change (Redis time, ms)."""
        return f"{self.prefix}:{{breakers}}"

    def agents(self) -> str:
        return f"{self.prefix}:agents"

    def rate_limit(self, agent: str) -> str:
        """Hash: an agent's token bucket. All agents' share the tag ``{ratelimit}``: the
        ingest takes the buckets of a batch of requests in one script (Redis Cluster)."""
        return f"{self.prefix}:{{ratelimit}}:{agent}"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:{{task:{task_id}}}:state"

    def task_cancel(self, task_id: str) -> str:
        return f"{self.prefix}:{{task:{task_id}}}:cancel"

    def latency(self, group: str) -> str:
        """Hash: consumer name → its ack-latency histogram (JSON), for the dashboard."""
        return f"{self.prefix}:latency:{group}"

    def task_slots(self, queue: str, task_type: str | None = None, part: str = "slots") -> str:
        """Sorted sets of a task queue (or of one of its types): ``slots`` (running tasks →
        lease expiry ms), ``waiting`` (order), ``deadline`` (a waiter's expiry ms). One hash tag
        per queue: the slot script touches them together."""
        of = f":type:{task_type}" if task_type else ""
        return f"{self.prefix}:{{tasks:{queue}}}{of}:{part}"

    def task_runners(self) -> str:
        return f"{self.prefix}:tasks:runners"

    def task_history(self) -> str:
        return f"{self.prefix}:tasks:history"

    def task_active(self) -> str:
        """Zset: tasks not ended yet (member → created ms). Written beside the task's hash,
        not atomically with it (another slot on a cluster): a listing drops what has ended."""
        return f"{self.prefix}:tasks:active"

    def task_stats(self) -> str:
        return f"{self.prefix}:tasks:stats"

    def topic_of(self, stream_key: str) -> str:
        """The topic of a key built here (the text inside the hash tag)."""
        start = stream_key.index("{") + 1
        return stream_key[start : stream_key.index("}", start)]
