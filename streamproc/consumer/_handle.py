"""Running a handler on one entry, and turning how it ended into an outcome.

Cancellation is never a failure: a handler cut off at shutdown raises CancelledError out of
here, and its entry stays pending for a later delivery (not retried, not dead-lettered).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import structlog

from streamproc import tracing
from streamproc._backoff import backoff_delay_s
from streamproc.codec import Codec
from streamproc.concern import Concern, Context, Handler, Scope
from streamproc.consumer.outcomes import Acked, DeadLettered, Entry, Outcome, RetryLater
from streamproc.errors import DecodeError, Permanent, Retry
from streamproc.keys import Keys
from streamproc.logs import EVENT_CONTEXT
from streamproc.producer import Producer
from streamproc.settings import RetryPolicy

__all__ = ("Handlers", "failure")

log = structlog.get_logger("streamproc.consumer")


def failure(
    entry: Entry,
    policy: RetryPolicy,
    error_type: str,
    detail: str,
    *,
    permanent: bool = False,
    delay_s: float | None = None,
    reason: str = "permanent",
    counts: bool = True,
) -> RetryLater | DeadLettered:
    """A retry after backoff (or ``delay_s``), or a dead letter when permanent or when the
    retries are used up. ``counts=False``: a deferral, which uses no attempt and never
    dead-letters."""
    detail = detail[:2000]
    attempt = entry.attempt + 1
    if permanent or (counts and attempt > policy.max_retries):
        why = reason if permanent else "retries_exhausted"
        log.error("dead_lettered", reason=why, error_type=error_type, error=detail[:500])
        return DeadLettered(entry, reason=why, error_type=error_type, detail=detail)
    if delay_s is None:
        delay_s = backoff_delay_s(attempt, policy.base_s, policy.cap_s)
    (log.warning if counts else log.info)(
        "retry_scheduled" if counts else "deferred",
        attempt=attempt if counts else entry.attempt,
        delay_s=round(delay_s, 3),
        error_type=error_type,
        error=detail[:500],
    )
    return RetryLater(
        entry,
        delay_ms=int(max(delay_s, 0.0) * 1000),
        error_type=error_type,
        detail=detail,
        counts=counts,
    )


class Handlers:
    """The concern's handlers by event type, run with a Context each."""

    def __init__(
        self,
        concern: Concern,
        *,
        codec: Codec[Any],
        consumer: str,
        client: aioredis.Redis,
        producer: Producer,
        keys: Keys,
    ) -> None:
        self.concern, self.codec, self.consumer = concern, codec, consumer
        self.client, self.producer, self.keys = client, producer, keys
        self.by_type: dict[bytes, Handler] = {
            t.type_name().encode(): h for t, h in concern.handlers.items()
        }
        self._scopes: dict[str, Scope] = {}
        self.unhandled = frozenset(
            n.encode() for n in codec.registry.names() if n.encode() not in self.by_type
        )

    async def run(self, entry: Entry) -> Outcome:
        try:
            event = self.codec.decode(entry.fields)
        except DecodeError as e:
            log.error(
                "undecodable_entry",
                topic=entry.topic,
                entry_id=entry.entry_id.decode(),
                reason=e.reason,
                detail=e.detail[:500],
            )
            return DeadLettered(
                entry, reason=e.reason, error_type="DecodeError", detail=e.detail[:2000]
            )
        handler = self.by_type.get(entry.fields[b"type"])
        if handler is None:  # registered but not handled here: triage skips these
            return DeadLettered(
                entry, reason="unknown_type", error_type="DecodeError", detail="no handler"
            )
        scope = self._scopes.get(entry.topic)
        if scope is None or scope.consumer != self.consumer:  # the name may change at start
            scope = self._scopes[entry.topic] = Scope(
                entry.topic,
                self.concern.group,
                self.consumer,
                self.client,
                self.producer,
                self.keys,
            )
        ctx = Context.for_event(
            scope, entry.entry_id.decode(), entry.attempt, entry.deliveries, event.id
        )
        # The Context itself is the log context: streamproc.logs reads its topic, group,
        # entry id, event id, deliveries and attempt into every line written meanwhile.
        token = EVENT_CONTEXT.set(ctx)
        try:
            if not tracing.active():
                return await self._call(handler, event, ctx, entry)
            # A CONSUMER span continuing the entry's trace; the handler's own spans and the
            # events it publishes are its children.
            with tracing.process_span(
                entry.topic,
                self.concern.group,
                ctx.entry_id,
                entry.fields,
                event_type=event.type_name(),
                event_id=event.id,
                deliveries=entry.deliveries,
                attempt=entry.attempt,
            ):
                return await self._call(handler, event, ctx, entry)
        finally:
            EVENT_CONTEXT.reset(token)

    async def _call(self, handler: Handler, event: Any, ctx: Context, entry: Entry) -> Outcome:
        policy = self.concern.retry
        try:
            await handler(event, ctx)
        except Permanent as e:
            tracing.failed(e)
            return failure(entry, policy, type(e).__name__, str(e), permanent=True)
        except Retry as e:
            if e.counts:  # a deferral is no failure
                tracing.failed(e)
            return failure(
                entry, policy, type(e).__name__, str(e), delay_s=e.delay_s, counts=e.counts
            )
        except Exception as e:
            tracing.failed(e)
            permanent = isinstance(e, self.concern.permanent_errors)
            return failure(entry, policy, type(e).__name__, str(e), permanent=permanent)
        return Acked(entry, event_id=event.id.encode(), effects=ctx._effects)
