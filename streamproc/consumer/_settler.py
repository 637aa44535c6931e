"""Settling: applying outcomes to Redis in one pipeline, and acting on what each script did.

One SUCCEED script per stream for everything that is acked (handled, trimmed, skipped), one
FAIL script per retry or dead letter. Every reply is checked: an entry counts
as acked only if XACK removed it, a failure as retried only if this settle wrote the retry,
and an event whose effects Redis refused turns into a retry or dead letter of its own, settled
in the same call. A batch is safe to send again after a lost reply.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot

from streamproc._lua import with_scripts
from streamproc.concern import DeadLetterInfo, OnDeadLetter
from streamproc.connection import is_cluster
from streamproc.consumer._handle import failure
from streamproc.consumer._records import dead_letter_fields, retry_record
from streamproc.consumer._scripts import FAIL, SUCCEED
from streamproc.consumer.outcomes import (
    Acked,
    DeadLettered,
    Empty,
    Outcome,
    RetryLater,
    Settled,
    Skipped,
)
from streamproc.consumer.stats import LATENCY_BOUNDS_MS, ConsumerStats
from streamproc.keys import Keys
from streamproc.settings import ConsumerSettings, RetryPolicy

__all__ = ("AfterSettle", "Settler")

log = structlog.get_logger("streamproc.consumer")

#: Called with every settled batch (outcomes carry ``status``); must not block.
AfterSettle = Callable[[Sequence[Outcome]], None]

_SCRIPTS = (SUCCEED, FAIL)
_OK_KINDS = (Acked, Empty, Skipped)


def _in_slot(o: Outcome, policy: RetryPolicy) -> Outcome:
    """On a Redis Cluster: an Acked whose effects touch a key outside its stream's slot
    becomes a dead letter (``effect_failed``), since the settle script, which runs on the
    stream's node, cannot write it; the script would fail the whole batch instead."""
    if type(o) is not Acked or not o.effects:
        return o
    slot = key_slot(o.entry.stream.encode())
    for cmd in o.effects:
        key = cmd[1] if len(cmd) > 1 else b""
        key = key if isinstance(key, bytes) else str(key).encode()
        if key_slot(key) != slot:
            detail = (
                f"effect {str(cmd[0]).upper()} on {key.decode(errors='replace')!r}: on Redis "
                f"Cluster an effect's key must share the hash tag of its topic "
                f"{{{o.entry.topic}}}; build it with keys.topic_state(topic, ...)"
            )
            return failure(
                o.entry, policy, "EffectError", detail, permanent=True, reason="effect_failed"
            )
    return o


class Settler:
    def __init__(
        self,
        *,
        client: aioredis.Redis,
        keys: Keys,
        group: str,
        name: str,
        settings: ConsumerSettings,
        policy: RetryPolicy,
        stats: ConsumerStats,
        on_dead_letter: OnDeadLetter | None,
        after_settle: AfterSettle | None,
        release: Callable[[list[Any]], None],
        holds: bool = False,
    ) -> None:
        self.client, self.keys, self.group, self.name = client, keys, group, name
        self.settings, self.policy, self.stats = settings, policy, stats
        self.on_dead_letter, self.after_settle = on_dead_letter, after_settle
        self._release = release
        #: Per-key order across retries (``Concern(ordered=True)``): a keyed entry's retry
        #: takes its key's hold, and the head's ack or dead letter releases it (_scripts.py).
        self._holds = holds
        #: On a Redis Cluster, effects on keys outside the stream's slot are refused here.
        self._cluster = is_cluster(client)

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Settle a batch (and the retries of effects Redis refused), then release it."""
        todo = [_in_slot(o, self.policy) for o in outcomes] if self._cluster else list(outcomes)
        done: list[Outcome] = []
        while todo:
            replies = await with_scripts(self.client, _SCRIPTS, lambda: self._send(todo))  # noqa: B023
            todo = self._apply(replies, done)
        self._release([o.entry for o in done])
        if self.after_settle is not None:
            self.after_settle(done)
        for o in done:
            if isinstance(o, DeadLettered) and o.status is Settled.SCHEDULED:
                await self._tell_dead_letter(o)

    async def _send(self, outcomes: list[Outcome]) -> list[Any]:
        ok: dict[str, tuple[list[Any], list[Any], list[Outcome]]] = {}
        order: list[Any] = []  # per pipeline command: the stream (SUCCEED) or the outcome
        s = self.settings
        async with self.client.pipeline(transaction=False) as pipe:
            for o in outcomes:
                e = o.entry
                if isinstance(o, _OK_KINDS):
                    batch = ok.get(e.stream)
                    if batch is None:
                        batch = ok[e.stream] = self._succeed_batch(e)
                    keys, args, members = batch
                    members.append(o)
                    rel: tuple[Any, ...] = (0,)
                    ek = e.fields.get(b"key") if args[2] else None
                    if ek:  # a retried entry of an ordered group may head its key
                        keys.append(self.keys.parked(e.topic, self.group, ek))
                        rel = (len(keys), ek, e.origin)
                    if type(o) is Acked:
                        effects = o.effects
                        args += (e.entry_id, rel[0], len(effects), *rel[1:])
                        for cmd in effects:
                            args += (len(cmd), *cmd)
                    else:
                        args += (e.entry_id, rel[0], 0, *rel[1:])
                elif isinstance(o, RetryLater):
                    hk, ha = self._fail_holds(o)
                    FAIL.queue(
                        pipe,
                        [
                            e.stream,
                            self.keys.failed(e.stream, self.group, e.entry_id),
                            self.keys.delayed(e.topic, self.group),
                            *hk,
                        ],
                        [
                            self.group,
                            e.entry_id,
                            s.fail_mark_ms,
                            "retry",
                            *ha,
                            o.delay_ms,
                            retry_record(o),
                        ],
                    )
                    order.append(o)
                else:
                    hk, ha = self._fail_holds(o)
                    FAIL.queue(
                        pipe,
                        [
                            e.stream,
                            self.keys.failed(e.stream, self.group, e.entry_id),
                            self.keys.dlq(e.topic, self.group),
                            *hk,
                        ],
                        [
                            self.group,
                            e.entry_id,
                            s.fail_mark_ms,
                            "dlq",
                            *ha,
                            *dead_letter_fields(o, self.name, self.group),
                        ],
                    )
                    order.append(o)
            for keys, args, members in ok.values():
                SUCCEED.queue(pipe, keys, args)
                order.append(members)
            replies: list[Any] = await pipe.execute()
        return list(zip(order, replies, strict=True))

    def _succeed_batch(self, e: Any) -> tuple[list[Any], list[Any], list[Outcome]]:
        """KEYS and ARGV heads of a SUCCEED batch: with the hold hash and the retry stream
        when its entries may head their keys (an ordered group's retry stream)."""
        args: list[Any] = [self.group, 0, 0, 0]
        if not self._holds or e.stream == self.keys.stream(e.topic):
            return [e.stream], args, []
        args[2:] = (2, 3)
        hold, retry = (
            self.keys.hold(e.topic, self.group),
            self.keys.retry_stream(e.topic, self.group),
        )
        return [e.stream, hold, retry], args, []

    def _fail_holds(self, o: Outcome) -> tuple[list[Any], list[Any]]:
        """FAIL's extra KEYS and ARGV for a keyed entry of an ordered group (else none)."""
        e = o.entry
        ek = e.fields.get(b"key") if self._holds else None
        if not ek:
            return [], []
        keys = [
            self.keys.hold(e.topic, self.group),
            self.keys.parked(e.topic, self.group, ek),
            self.keys.retry_stream(e.topic, self.group),
        ]
        return keys, [ek, e.origin]

    def _apply(self, replies: list[Any], done: list[Outcome]) -> list[Outcome]:
        """Record what each script did; returns the follow-ups (refused effects) to settle."""
        st = self.stats
        follow: list[Outcome] = []
        now_ms = time.time() * 1000
        counts, bounds, latency_s = st.latency_counts, LATENCY_BOUNDS_MS, 0.0
        # Entries of a batch mostly share their millisecond: its bucket is looked up once.
        last_ms, last_bucket, last_latency = b"", 0, 0.0
        for what, reply in replies:
            if isinstance(what, list):  # SUCCEED: one status per outcome
                for o, status in zip(what, reply, strict=True):
                    if isinstance(status, bytes):  # Redis refused an effect: nothing applied
                        st.effect_errors += 1
                        log.error(
                            "effect_failed", entry_id=o.entry.entry_id.decode(), error=status[:300]
                        )
                        follow.append(
                            failure(
                                o.entry,
                                self.policy,
                                "EffectError",
                                status.decode(errors="replace"),
                                reason="effect_failed",
                            )
                        )
                        continue
                    done.append(o)
                    if status == 1 or isinstance(o, Empty):  # a trimmed entry is gone anyway
                        o.status = Settled.ACKED
                        if type(o) is Acked:
                            st.acked += 1
                            # publish-to-ack latency from the entry id's time (Redis' clock)
                            eid = o.entry.entry_id
                            entry_ms = eid[: eid.index(b"-")]
                            if entry_ms != last_ms:
                                last_ms = entry_ms
                                last_latency = max(0.0, now_ms - int(entry_ms))
                                last_bucket = bisect_left(bounds, last_latency)
                            counts[last_bucket] += 1
                            latency_s += last_latency
                        elif isinstance(o, Empty):
                            st.empty += 1
                        else:
                            st.skipped += 1
                    elif status == 3:
                        # Not pending, and the group has not delivered it yet (recreated after
                        # NOGROUP, or moved back): its next delivery applies it, once.
                        o.status = Settled.REDELIVER
                        st.redeliver += 1
                    else:
                        o.status = Settled.REFUSED
                        st.refused += 1
            else:
                o = what
                done.append(o)
                if int(reply[1]):
                    o.status = Settled.SCHEDULED
                    if isinstance(o, RetryLater):
                        st.retried += 1
                    else:
                        st.dead_lettered += 1
                else:
                    o.status = Settled.ALREADY_SCHEDULED
                    st.already_scheduled += 1
        st.latency_sum_s += latency_s / 1000
        return follow

    async def _tell_dead_letter(self, o: DeadLettered) -> None:
        if self.on_dead_letter is None:
            return
        e = o.entry
        info = DeadLetterInfo(
            topic=e.topic,
            group=self.group,
            entry_id=e.entry_id.decode(),
            event_id=e.text(b"id"),
            event_type=e.text(b"type"),
            fields=dict(e.fields),
            reason=o.reason,
            error_type=o.error_type,
            detail=o.detail,
            redis=self.client,
            keys=self.keys,
        )
        try:
            await self.on_dead_letter(info)
        except Exception as exc:  # the dead letter is written; the hook is told best-effort
            log.error("on_dead_letter_failed", error=str(exc)[:300], entry_id=info.entry_id)
