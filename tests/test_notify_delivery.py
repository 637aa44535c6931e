"""Notifications delivered to a real receiver over real sockets: signatures, retries by error
class, Retry-After, the shared breaker, fan-out, the delivery log and the feed entry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from notifications import concern as notify
from notifications.delivery_log import DeliveryLog
from notifications.feed_keys import feed_key
from notifications.settings import NotifySettings
from notifications.subscriptions import Subscription, SubscriptionStore, new_subscription
from schemas import Notification
from streamproc import Codec, ConsumerSettings, Keys, Producer, RetryPolicy
from streamproc.breaker import breaker_states
from streamproc.consumer import Consumer
from tests.notify_receiver import Receiver

pytestmark = pytest.mark.timeout(90)

FAST = RetryPolicy(max_retries=4, base_s=0.05, cap_s=0.3)


@pytest.fixture
def settings() -> Any:
    s = NotifySettings(
        connect_timeout_s=1.0,
        read_timeout_s=0.5,
        total_timeout_s=2.0,
        breaker_threshold=3,
        breaker_cooldown_s=0.5,
    )
    notify.use_settings(s)
    yield s
    notify.use_settings(NotifySettings())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(hang_s=2.0).start()
    yield r
    await r.stop()


@contextlib.asynccontextmanager
async def delivering(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    *,
    retry: RetryPolicy = FAST,
) -> AsyncIterator[None]:
    """The fan-out and delivery concerns running in this process (fast retries)."""
    concerns = (notify.FANOUT, dataclasses.replace(notify.DELIVER, retry=retry))
    consumers = [
        Consumer(
            c,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            settings=ConsumerSettings(consumer="t1", block_ms=50, grace_s=1.0),
        )
        for c in concerns
    ]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        yield
    finally:
        for c in consumers:
            c.stop()
        await asyncio.gather(*tasks)
        await notify.runtime().close()


async def subscribe(client: aioredis.Redis, keys: Keys, **kw: Any) -> Subscription:
    return await SubscriptionStore(client, keys).add(new_subscription(**kw))


def alert(i: int = 0, cluster: str = "c1", severity: str = "warning") -> Notification:
    return Notification(
        key=cluster,
        source="test",
        cluster_id=cluster,
        severity=severity,  # type: ignore[arg-type]
        title=f"alert {i}",
        body="something happened",
    )


async def statuses(client: aioredis.Redis, keys: Keys, nid: str) -> list[str]:
    log = DeliveryLog(client, keys, maxlen=1000, ttl_s=60)
    return [a.status for a in await log.for_notification(nid)]


async def eventually(check: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def test_signed_webhook_arrives_once_with_the_notification_id(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    receiver: Receiver,
    settings: NotifySettings,
) -> None:
    sub = await subscribe(client, keys, cluster="c1", channel="webhook", destination=receiver.url)
    receiver.secret = sub.secret
    n = alert(1)
    async with delivering(client, codec, keys, producer):
        await producer.publish(n)
        await receiver.wait_for(1)

        async def logged() -> bool:
            return await statuses(client, keys, n.id) == ["sent"]

        await eventually(logged)
    [got] = receiver.received
    assert got.verified is True  # the reference verification of the standardwebhooks package
    assert got.webhook_id == n.id
    body = got.json()
    assert body["type"] == "notify.notification"
    assert body["data"]["title"] == "alert 1"
    assert body["data"]["cluster_id"] == "c1"
    assert body["data"]["subscription_id"] == sub.id
    # A tampered body fails the same verification.
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        Webhook(sub.secret).verify(got.body.replace(b"alert 1", b"alert 2"), got.headers)
    # The cluster's live feed has the notification.
    feed: Any = await client.xrange(feed_key(keys, "c1"))
    [(_, fields)] = feed
    assert fields[b"type"] == b"notify.notification"
    assert orjson.loads(fields[b"data"])["notification_id"] == n.id


async def test_transient_errors_retry_and_permanent_ones_dead_letter(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    receiver: Receiver,
    settings: NotifySettings,
) -> None:
    """500 then 200: sent on the retry. Hanging past the read timeout: retried. 400: dead-
    lettered at once with the status and the body, never sent again."""
    await subscribe(client, keys, cluster="c1", channel="webhook", destination=receiver.url)
    receiver.plan = [500]
    first = alert(1)
    async with delivering(client, codec, keys, producer):
        await producer.publish(first)

        async def sent_after_retry() -> bool:
            return await statuses(client, keys, first.id) == ["retry", "sent"]

        await eventually(sent_after_retry)
        assert [r.status for r in receiver.received] == [500, 200]

        receiver.plan = ["hang"]
        slow = alert(2)
        await producer.publish(slow)

        async def sent_after_timeout() -> bool:
            return await statuses(client, keys, slow.id) == ["retry", "sent"]

        await eventually(sent_after_timeout)
        log = await DeliveryLog(client, keys, maxlen=10, ttl_s=60).for_notification(slow.id)
        assert "timed out" in log[0].error

        receiver.plan = [400]
        bad = alert(3)
        await producer.publish(bad)

        async def failed() -> bool:
            return await statuses(client, keys, bad.id) == ["failed"]

        await eventually(failed)
        dlq = keys.dlq("deliveries", "notify-deliver")

        async def dead_lettered() -> bool:
            return bool(await client.xlen(dlq))

        await eventually(dead_lettered)
        await asyncio.sleep(0.5)  # time for a wrong retry to show up
    dead_letters: Any = await client.xrange(dlq)
    [(_, dead)] = dead_letters
    assert dead[b"dlq_reason"] == b"permanent"
    assert b"400" in dead[b"dlq_error"]
    assert b"nope" in dead[b"dlq_error"]
    assert sum(1 for r in receiver.received if r.webhook_id == bad.id) == 1


async def test_429_holds_the_destination_for_its_retry_after_without_using_an_attempt(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    receiver: Receiver,
    settings: NotifySettings,
) -> None:
    sub = await subscribe(client, keys, cluster="c1", channel="slack", destination=receiver.url)
    receiver.plan = [(429, "1")]
    n = alert(1, severity="critical")
    # One retry allowed: a 429 that used attempts would dead-letter after two of them.
    async with delivering(
        client, codec, keys, producer, retry=RetryPolicy(max_retries=0, base_s=0.05, cap_s=0.1)
    ):
        await producer.publish(n)

        async def sent() -> bool:
            return (await statuses(client, keys, n.id))[-1:] == ["sent"]

        await eventually(sent)
    first, second = receiver.received
    [state] = await breaker_states(client, keys)
    assert state.name == f"slack:http://127.0.0.1:{receiver.port}"
    assert state.hold_until > 0
    # The second call was not made before the hold ended (Redis runs on this host: one clock).
    assert second.arrived_at * 1000 >= state.hold_until - 2
    assert state.hold_until - first.arrived_at * 1000 >= 900  # Retry-After: 1 s
    logged = await DeliveryLog(client, keys, maxlen=10, ttl_s=60).for_notification(n.id)
    assert [a.status for a in logged] == ["rate_limited", "sent"]
    assert [a.attempt for a in logged] == [0, 0]  # waiting used no attempt
    # Slack's payload: a fallback text and blocks with the title, severity and cluster.
    payload = second.json()
    assert "alert 1" in payload["text"]
    assert payload["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "alert 1"},
    }
    fields = " ".join(f["text"] for f in payload["blocks"][1]["fields"])
    assert "critical" in fields
    assert "c1" in fields
    assert first.body == second.body
    assert sub.id


async def test_breaker_opens_holds_deliveries_and_drains_them_once(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    receiver: Receiver,
    settings: NotifySettings,
) -> None:
    """A destination that fails: after 3 failures the breaker opens and deliveries wait
    (deferred: they use no attempt, so none is dead-lettered though each would have used up
    its 4 retries many times over); once it recovers, a probe closes the breaker and every
    notification arrives exactly once."""
    await subscribe(client, keys, cluster="c1", channel="webhook", destination=receiver.url)
    receiver.default = 500
    sent = [alert(i) for i in range(6)]
    async with delivering(client, codec, keys, producer):
        for n in sent:
            await producer.publish(n)

        async def opened() -> bool:
            states = await breaker_states(client, keys)
            return bool(states) and states[0].state in ("open", "half_open")

        await eventually(opened)
        failing_since = len(receiver.received)
        await asyncio.sleep(2.0)  # four cool-downs: probes only, one at a time
        during = len(receiver.received) - failing_since
        receiver.default = 200

        async def drained() -> bool:
            return set(receiver.accepted_ids()) == {n.id for n in sent}

        await eventually(drained)
        await asyncio.sleep(0.3)
    # While open, only probes went out: far fewer than 6 deliveries retrying every 50-300 ms.
    assert during <= 6, during
    assert all(count == 1 for count in receiver.accepted_ids().values())
    assert await client.xlen(keys.dlq("deliveries", "notify-deliver")) == 0
    [state] = await breaker_states(client, keys)
    assert state.state == "closed"
    assert state.failures == 0
    held = [s for n in sent for s in await statuses(client, keys, n.id) if s == "held"]
    assert held  # deliveries waited on the breaker instead of calling


async def test_fan_out_reaches_each_matching_subscription_once(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    receiver: Receiver,
    settings: NotifySettings,
) -> None:
    """c1's subscriptions and the '*' ones, by severity and type; never another cluster's."""
    wanted = []
    for i in range(5):
        sub = await subscribe(
            client, keys, cluster="c1", channel="webhook", destination=f"{receiver.url}/{i}"
        )
        wanted.append(f"/hook/{i}")
    await subscribe(client, keys, cluster="*", channel="webhook", destination=f"{receiver.url}/all")
    wanted.append("/hook/all")
    for cluster, extra in (
        ("c2", {}),
        ("c1", {"min_severity": "critical"}),
        ("c1", {"types": ["report.ready"]}),
    ):
        await subscribe(
            client,
            keys,
            cluster=cluster,
            channel="webhook",
            destination=f"{receiver.url}/never",
            **extra,
        )
    n = alert(1, severity="warning")
    async with delivering(client, codec, keys, producer):
        await producer.publish(n)
        await receiver.wait_for(len(wanted))
        await asyncio.sleep(0.5)
    assert sorted(r.path for r in receiver.received) == sorted(wanted)
    assert {r.webhook_id for r in receiver.received} == {n.id}
    assert sub.cluster == "c1"
