"""The Redis-shared circuit breaker and the classification of outside calls (real Redis, real
sockets)."""

from __future__ import annotations

import asyncio
import email.utils
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
from botocore.exceptions import (  # type: ignore[import-untyped]
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from streamproc import Keys
from streamproc.breaker import CLEAN, PROBE, RESET, Breaker, BreakerOpen, breaker_states
from streamproc.errors import Defer, Permanent, Retry
from streamproc.outbound import (
    MAX_RETRY_AFTER_S,
    CallPermanent,
    CallRateLimited,
    CallTransient,
    HttpResult,
    Timeouts,
    aws_failure,
    check_status,
    guarded,
    http_post,
    retry_after_s,
)
from tests.helpers import free_port


def pair(client: aioredis.Redis, keys: Keys, **kw: float) -> tuple[Breaker, Breaker]:
    """Two replicas' view of one destination's breaker."""
    opts = {"threshold": 3, "cooldown_s": 0.2, "probe_s": 5.0, **kw}
    return (
        Breaker(client, keys, "dest", **opts),  # type: ignore[arg-type]
        Breaker(client, keys, "dest", **opts),  # type: ignore[arg-type]
    )


async def test_opens_after_threshold_consecutive_failures(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = pair(client, keys)
    assert await a.admit() == CLEAN
    await a.failure("e1")
    await b.failure("e2")
    assert await a.admit() == RESET  # failures to reset, still closed
    await a.success()
    for i in range(2):
        await a.failure(f"again {i}")
    assert await b.admit() == RESET
    await b.failure("third")
    with pytest.raises(BreakerOpen) as e:
        await a.admit()
    assert isinstance(e.value, Defer)
    assert 0 < (e.value.delay_s or 0) <= 0.2
    [state] = await breaker_states(client, keys)
    assert state.state == "open"
    assert state.failures == 3
    assert state.last_error == "third"


async def test_one_probe_across_replicas_then_closed(client: aioredis.Redis, keys: Keys) -> None:
    a, b = pair(client, keys, threshold=1)
    await a.failure("down")
    await asyncio.sleep(0.25)  # past the cool-down
    assert await a.admit() == PROBE
    with pytest.raises(BreakerOpen) as e:
        await b.admit()  # the probe is out: the other replica waits
    assert e.value.state == "half_open"
    assert (e.value.delay_s or 0) <= 0.2  # looks again within a cool-down, not the probe's lease
    await a.success()
    assert await b.admit() == CLEAN
    [state] = await breaker_states(client, keys)
    assert (state.state, state.failures) == ("closed", 0)


async def test_failed_probe_reopens_and_a_lost_probe_is_given_up(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = pair(client, keys, threshold=1, probe_s=0.3)
    await a.failure("down")
    await asyncio.sleep(0.25)
    assert await a.admit() == PROBE
    await a.failure("still down")
    with pytest.raises(BreakerOpen):
        await b.admit()
    await asyncio.sleep(0.25)
    assert await b.admit() == PROBE  # b probes and never reports (it crashed)
    with pytest.raises(BreakerOpen):
        await a.admit()
    await asyncio.sleep(0.35)  # past probe_s
    assert await a.admit() == PROBE


async def test_hold_makes_everyone_wait_without_a_failure(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = pair(client, keys)
    until = await a.hold(1.0, "429")
    assert until > time.time()
    with pytest.raises(BreakerOpen) as e:
        await b.admit()
    assert 0.5 < (e.value.delay_s or 0) <= 1.0
    [state] = await breaker_states(client, keys)
    assert (state.state, state.failures) == ("closed", 0)
    await a.hold(0.1)  # a shorter hold never shortens a longer one
    with pytest.raises(BreakerOpen):
        await b.admit()


async def test_guarded_counts_transient_failures_only(client: aioredis.Redis, keys: Keys) -> None:
    a, _ = pair(client, keys, threshold=2)

    async def permanent() -> None:
        raise CallPermanent("400", status=400)

    async def transient() -> None:
        raise CallTransient("503", status=503)

    async def limited() -> None:
        raise CallRateLimited("429", delay_s=0.2)

    async def ok() -> str:
        return "ok"

    for _ in range(3):
        with pytest.raises(CallPermanent):
            await guarded(a, permanent)
    assert await breaker_states(client, keys) == []  # the destination answered: no write
    with pytest.raises(CallRateLimited):
        await guarded(a, limited)
    with pytest.raises(BreakerOpen):
        await guarded(a, ok)  # held for the Retry-After
    await asyncio.sleep(0.25)
    assert await guarded(a, ok) == "ok"
    with pytest.raises(CallTransient):
        await guarded(a, transient)
    with pytest.raises(CallTransient):
        await guarded(a, transient)
    with pytest.raises(BreakerOpen):
        await guarded(a, ok)
    await asyncio.sleep(0.25)
    # The probe fails: a deferral (the destination's failure), not the event's retry.
    with pytest.raises(BreakerOpen) as e:
        await guarded(a, transient)
    assert "503" in str(e.value)
    await asyncio.sleep(0.25)
    assert await guarded(a, ok) == "ok"
    assert (await breaker_states(client, keys))[0].state == "closed"


def test_retry_after_values() -> None:
    assert retry_after_s("5") == 5.0
    assert retry_after_s(None) == 1.0
    assert retry_after_s("soon") == 1.0
    assert retry_after_s("-3") == 1.0
    assert retry_after_s("9" * 40) == MAX_RETRY_AFTER_S
    future = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < retry_after_s(future) <= 120
    past = email.utils.formatdate(time.time() - 120, usegmt=True)
    assert retry_after_s(past) == 0.0


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (204, None),
        (408, CallTransient),
        (429, CallRateLimited),
        (500, CallTransient),
        (503, CallTransient),
        (400, CallPermanent),
        (401, CallPermanent),
        (404, CallPermanent),
        (410, CallPermanent),
        (301, CallPermanent),
    ],
)
def test_status_classes(status: int, kind: type[Exception] | None) -> None:
    result = HttpResult(status=status, body="why", latency_s=0.01, retry_after_s=None)
    if kind is None:
        check_status(result)
        return
    with pytest.raises(kind) as e:
        check_status(result)
    assert str(status) in str(e.value)
    assert isinstance(e.value, Retry | Permanent)


async def test_network_failures_are_transient_and_bad_urls_permanent() -> None:
    timeouts = Timeouts(connect_s=1.0, read_s=1.0, total_s=2.0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(CallTransient):
            await http_post(session, f"http://127.0.0.1:{free_port()}/x", b"{}", {}, timeouts)
        with pytest.raises(CallPermanent):
            await http_post(session, "http://[::1/x", b"{}", {}, timeouts)


def test_aws_error_classes() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "SendRawEmail",
        )

    assert isinstance(aws_failure(client_error("Throttling", 400)), CallTransient)
    assert isinstance(aws_failure(client_error("InternalFailure", 500)), CallTransient)
    assert isinstance(aws_failure(client_error("ServiceUnavailable", 503)), CallTransient)
    assert isinstance(aws_failure(client_error("AccessDenied", 403)), CallPermanent)
    assert isinstance(aws_failure(client_error("MessageRejected", 400)), CallPermanent)
    assert isinstance(
        aws_failure(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")), CallTransient
    )
    assert isinstance(aws_failure(NoCredentialsError()), CallPermanent)
