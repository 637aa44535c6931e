"""A delivery consumer SIGKILLed mid-delivery: each notification is sent at most once more,
with the same webhook id, so a receiver that drops copies by webhook id keeps exactly one."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from notifications import concern as notify
from notifications.settings import NotifySettings
from notifications.subscriptions import SubscriptionStore, new_subscription
from schemas import Notification
from streamproc import Codec, ConsumerSettings, Keys, Producer, RetryPolicy
from streamproc.consumer import Consumer
from tests.notify_receiver import Receiver

pytestmark = pytest.mark.timeout(120)


async def test_sigkill_mid_delivery_sends_each_notification_at_most_once_more(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    redis_url: str,
    repo_root: Path,
) -> None:
    receiver = await Receiver(hang_s=3.0).start()
    sub = await SubscriptionStore(client, keys).add(
        new_subscription(cluster="c1", channel="webhook", destination=receiver.url)
    )
    receiver.secret = sub.secret
    # Three answered, then one that hangs: the consumer is mid-delivery when it is killed.
    receiver.plan = [200, 200, 200, "hang"]
    sent = [Notification(key="c1", source="t", cluster_id="c1", title=f"n{i}") for i in range(8)]
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_CONSUMER": "doomed",
        "STREAMPROC_LOG_LEVEL": "warning",
        "STREAMPROC_NOTIFY_READ_TIMEOUT_S": "60",
        "STREAMPROC_NOTIFY_TOTAL_TIMEOUT_S": "60",
    }
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "streamproc", "consume", "notify-fanout", "notify-deliver"),
        env=env,
        cwd=repo_root,
    )
    try:
        for n in sent:
            await producer.publish(n)
        await receiver.wait_for(4, timeout_s=60)  # the 4th hangs: in flight when killed
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    before = Counter(receiver.ids())
    notify.use_settings(NotifySettings(read_timeout_s=2.0, total_timeout_s=5.0))
    survivors = [
        Consumer(
            c,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            # Reclaims what the dead consumer held once it has been silent 600 ms.
            settings=ConsumerSettings(consumer="heir", block_ms=50, min_idle_ms=600, grace_s=1),
        )
        for c in (
            notify.FANOUT,
            dataclasses.replace(
                notify.DELIVER, retry=RetryPolicy(max_retries=4, base_s=0.05, cap_s=0.3)
            ),
        )
    ]
    tasks = [asyncio.create_task(c.run()) for c in survivors]
    try:
        deadline = time.monotonic() + 60
        while set(receiver.ids()) != {n.id for n in sent}:
            assert time.monotonic() < deadline, (receiver.ids(), before)
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # room for a wrong extra send to show up
    finally:
        for c in survivors:
            c.stop()
        await asyncio.gather(*tasks)
        await notify.runtime().close()
        notify.use_settings(NotifySettings())
        await receiver.stop()
    counts = receiver.ids()
    assert set(counts) == {n.id for n in sent}
    # Sent at most once more: only what was in flight or unmarked at the kill went again.
    assert all(c <= 2 for c in counts.values()), counts
    resent = [i for i, c in counts.items() if c == 2]
    assert resent, "the delivery in flight at the kill is sent again"
    assert all(before[i] == 1 for i in resent)
    assert all(r.verified for r in receiver.received)
    # A receiver deduplicating by webhook id keeps each notification once.
    assert len({r.webhook_id for r in receiver.received}) == len(sent)
