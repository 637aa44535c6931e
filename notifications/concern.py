"""The two delivery concerns: fan a notification out to its subscriptions, then deliver each.

``notify-fanout`` reads ``notify`` and ``reports``. For each notification it finds the
subscriptions that want it (its cluster's and the ``*`` ones, by severity and type), publishes
one ``notify.delivery`` per subscription to ``deliveries`` (ids derived from the notification's
and the subscription's, so a fan-out that runs twice asks once), and appends the notification
to its cluster's live feed (an effect: written once, with the ack).

``notify-deliver`` reads ``deliveries``, 64 at a time per process. Each delivery:

1. is skipped if its subscription was removed (subscriptions are re-read at most once a
   second per process), or if it was sent already (``<p>:state:notify:sent:<delivery id>``,
   kept ``sent_ttl_s``: a copy of the same delivery published twice sends once);
2. asks the destination's breaker (``streamproc.breaker``), in the same round trip as the
   sent check: while it is open, or a 429 holds the destination, the delivery waits as a
   deferred retry that uses no attempt;
3. sends (webhook, Slack or SES email) with connect/read timeouts;
4. on success, writes the sent mark and the delivery log entry as effects of the event:
   once, atomically with its ack, no extra round trip. Failed attempts are logged at once.

Transient failures (timeouts, connection errors, 5xx, SES throttling) are retried with backoff,
10 times up to 5 minutes apart, then dead-lettered; permanent ones (other 4xx, a bad
address) are dead-lettered at once with the status and the start of the response.

**At most one extra send.** The sent mark is written with the ack. A consumer killed after
the destination answered and before the ack leaves the delivery pending and unmarked: the
next owner sends once more, with the same ``webhook-id`` (the notification id), which webhook
receivers use to drop the copy. SES replaces an email's ``Message-ID`` with
its own, so a resent email is recognisable only by its ``X-Streamproc-Delivery-Id`` header.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import Histogram

from notifications.delivery_log import Attempt, DeliveryLog
from notifications.feed_keys import feed_effect, trim
from notifications.http_channels import HttpChannels
from notifications.messages import NOTIFICATION_TYPES, message_of
from notifications.settings import NotifySettings
from notifications.subscriptions import (
    Subscription,
    SubscriptionStore,
    breaker_name,
    mask_url,
)
from schemas.notify import DeliveryRequested, Message
from streamproc.breaker import Breaker, BreakerOpen
from streamproc.concern import Concern, Context, DeadLetterInfo
from streamproc.event import derived_id
from streamproc.outbound import (
    CallPermanent,
    CallRateLimited,
    CallTransient,
    check_status,
    guarded,
)
from streamproc.settings import RetryPolicy

__all__ = ("DELIVER", "FANOUT", "runtime", "use_settings")

log = structlog.get_logger("notifications")

_NS = uuid.UUID("6c1f3a52-9d0e-4b7a-8e21-5f4d3c2b1a90")
LATENCY = Histogram(
    "streamproc_notify_send_seconds",
    "Time a destination took to answer a delivery (sent or not)",
    ["channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
#: Feed entries (or sent deliveries) written by this process between two trims.
_TRIM_EVERY = 200
#: How long a subscription read by the delivery concern is reused.
_SUB_CACHE_S = 1.0


class _Runtime:
    """What this process's delivery concerns share (built on first use)."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self.http = HttpChannels(settings)
        self._email: Any = None
        self._stores: dict[int, SubscriptionStore] = {}
        self._logs: dict[int, DeliveryLog] = {}
        self._feed_writes: dict[str, int] = {}
        self._subs: dict[str, tuple[float, Subscription | None]] = {}
        self._sent = 0

    def subscriptions(self, ctx: Context) -> SubscriptionStore:
        store = self._stores.get(id(ctx.redis))
        if store is None:
            store = self._stores[id(ctx.redis)] = SubscriptionStore(ctx.redis, ctx.keys)
        return store

    async def subscription(self, ctx: Context, sub_id: str) -> Subscription | None:
        """The subscription, read at most once a second per process (a removal takes effect
        within ``_SUB_CACHE_S``)."""
        now = time.monotonic()
        cached = self._subs.get(sub_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        sub = await self.subscriptions(ctx).get(sub_id)
        if len(self._subs) > 10_000:
            self._subs.clear()
        self._subs[sub_id] = (now + _SUB_CACHE_S, sub)
        return sub

    def sent_one(self) -> bool:
        """Count a sent delivery; True every ``_TRIM_EVERY`` (time to trim the log)."""
        self._sent += 1
        return self._sent % _TRIM_EVERY == 0

    def log(self, redis: Any, keys: Any) -> DeliveryLog:
        dl = self._logs.get(id(redis))
        if dl is None:
            dl = self._logs[id(redis)] = DeliveryLog(
                redis, keys, maxlen=self.settings.log_maxlen, ttl_s=self.settings.log_ttl_s
            )
        return dl

    def email(self) -> Any:
        if self._email is None:
            from notifications.email import EmailSender

            self._email = EmailSender(self.settings)
        return self._email

    def sender(
        self, sub: Subscription, message: Message, delivery_id: str
    ) -> Callable[[], Awaitable[tuple[int, str]]]:
        """The call that sends ``message`` by ``sub``'s channel: (HTTP status, reference)."""

        async def webhook() -> tuple[int, str]:
            result = await self.http.webhook(sub, message)
            check_status(result, "webhook")
            return result.status, ""

        async def slack() -> tuple[int, str]:
            result = await self.http.slack(sub, message)
            check_status(result, "Slack")
            return result.status, ""

        async def email() -> tuple[int, str]:
            ref = await self.email().send(sub, message, delivery_id=delivery_id)
            return 200, str(ref)

        return {"webhook": webhook, "slack": slack, "email": email}[sub.channel]

    def feed_written(self, cluster_id: str) -> bool:
        """Count a feed write; True every ``_TRIM_EVERY`` (time to trim that feed)."""
        n = self._feed_writes.get(cluster_id, 0) + 1
        if len(self._feed_writes) > 10_000:
            self._feed_writes.clear()
        self._feed_writes[cluster_id] = n
        return n % _TRIM_EVERY == 0

    async def close(self) -> None:
        await self.http.close()
        if self._email is not None:
            self._email.close()


_runtime: _Runtime | None = None


def use_settings(settings: NotifySettings) -> None:
    """Use these settings from now on (``configure_from_env`` calls it at start)."""
    global _runtime
    _runtime = _Runtime(settings)


def runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        _runtime = _Runtime(NotifySettings())
    return _runtime


# ---------------------------------------------------------------------- fan-out


async def fan_out(event: Any, ctx: Context) -> None:
    rt = runtime()
    message = message_of(event, rt.settings.base_url)
    subs = await rt.subscriptions(ctx).matching(message)
    if subs:
        await ctx.producer.append(
            [
                DeliveryRequested(
                    id=derived_id(message.notification_id, s.id, namespace=_NS),
                    key=s.id,
                    source="notify-fanout",
                    subscription_id=s.id,
                    message=message,
                )
                for s in subs
            ]
        )
    if message.cluster_id:
        await feed_effect(
            ctx,
            message.cluster_id,
            message.type,
            {
                "notification_id": message.notification_id,
                "severity": message.severity,
                "title": message.title,
                "body": message.body,
                "link": message.link,
                "occurred_at": message.occurred_at.isoformat(),
                "deliveries": len(subs),
            },
        )
        if rt.feed_written(message.cluster_id):
            await trim(ctx.redis, ctx.keys, message.cluster_id, rt.settings.feed_maxlen)
    log.info("fanned_out", notification_id=message.notification_id, deliveries=len(subs))


FANOUT = Concern(
    group="notify-fanout",
    topics=("notify", "reports"),
    handlers=dict.fromkeys(NOTIFICATION_TYPES, fan_out),
    concurrency=8,
    retry=RetryPolicy(max_retries=5, base_s=0.5, cap_s=30.0),
)


# ---------------------------------------------------------------------- delivery


async def deliver(ev: DeliveryRequested, ctx: Context) -> None:
    rt = runtime()
    s = rt.settings
    dlog = rt.log(ctx.redis, ctx.keys)
    sent_key = ctx.keys.state("notify", "sent", ev.id)
    sub = await rt.subscription(ctx, ev.subscription_id)
    base: dict[str, Any] = {
        "notification_id": ev.message.notification_id,
        "delivery_id": ev.id,
        "subscription_id": ev.subscription_id,
        "attempt": ctx.attempt,
        "deliveries": ctx.deliveries,
    }
    if sub is None:
        await dlog.record(
            Attempt(**base, channel="", destination="", status="skipped", error="unsubscribed")
        )
        return
    base["channel"] = sub.channel
    base["destination"] = (
        sub.destination if sub.channel == "email" else mask_url(sub.destination, sub.channel)
    )
    breaker = Breaker(
        ctx.redis,
        ctx.keys,
        breaker_name(sub, s.ses_region),
        threshold=s.breaker_threshold,
        cooldown_s=s.breaker_cooldown_s,
        probe_s=s.total_timeout_s + 1.0,  # a probe never reported frees the slot after this
    )
    # One round trip: was it sent already, and may the destination be called now?
    (already,), reply = await breaker.ask_with(lambda pipe: pipe.exists(sent_key))
    if already:
        log.info("already_sent", delivery_id=ev.id)
        await dlog.record(Attempt(**base, status="skipped", error="already sent"))
        return
    started = time.perf_counter()

    def took() -> float:
        elapsed = time.perf_counter() - started
        LATENCY.labels(sub.channel).observe(elapsed)
        return round(elapsed * 1000, 2)

    try:
        admitted = breaker.verdict(reply)
        status, reference = await guarded(
            breaker, rt.sender(sub, ev.message, ev.id), admitted=admitted
        )
    except BreakerOpen as e:
        await dlog.record(Attempt(**base, status="held", error=str(e)))
        raise
    except CallRateLimited as e:
        await dlog.record(
            Attempt(
                **base, status="rate_limited", http_status=e.status, latency_ms=took(), error=str(e)
            )
        )
        raise
    except CallTransient as e:
        await dlog.record(
            Attempt(**base, status="retry", http_status=e.status, latency_ms=took(), error=str(e))
        )
        raise
    except CallPermanent as e:
        await dlog.record(
            Attempt(**base, status="failed", http_status=e.status, latency_ms=took(), error=str(e))
        )
        raise
    # The sent mark and the log entry are effects: written once, atomically with the ack.
    sent = Attempt(
        **base, status="sent", http_status=status, latency_ms=took(), reference=reference
    )
    for command in dlog.effects(sent, sent_key=sent_key, sent_ttl_s=s.sent_ttl_s):
        ctx.effect(*command)
    if rt.sent_one():
        await dlog.trim()


async def _dead_lettered(info: DeadLetterInfo) -> None:
    """Retries used up (or poison): say so in the delivery log."""
    if info.reason == "permanent":
        return  # the handler logged it as failed, with the response
    notification_id = delivery_id = subscription_id = ""
    try:
        ev = _decode_delivery(info.fields.get(b"data", b""))
        notification_id, subscription_id = ev.message.notification_id, ev.subscription_id
        delivery_id = ev.id
    except Exception:
        delivery_id = info.event_id or ""
    rt = runtime()
    await rt.log(info.redis, info.keys).record(
        Attempt(
            notification_id=notification_id or "unknown",
            delivery_id=delivery_id,
            subscription_id=subscription_id,
            channel="",
            destination="",
            status="dead_lettered",
            error=f"{info.reason}: {info.detail}"[:500],
        )
    )


def _decode_delivery(data: bytes) -> DeliveryRequested:
    import msgspec

    return msgspec.json.decode(data, type=DeliveryRequested)


DELIVER = Concern(
    group="notify-deliver",
    topics=("deliveries",),
    handlers={DeliveryRequested: deliver},
    concurrency=64,
    # 1 s doubling to 5 min, jittered: 10 retries span about 10-17 minutes.
    retry=RetryPolicy(max_retries=10, base_s=1.0, cap_s=300.0),
    on_dead_letter=_dead_lettered,
)
