"""Ingest under hostile clients (issue 17, items 4, 6, 10, 11, 15), over real sockets on 127.0.0.1.

What each test pins down: a refusal is decided before the body becomes Python objects and
memory stays flat (measured with tracemalloc, in this process, where the server runs);
connections that never finish their headers are closed and do not crowd out real clients;
a Redis outage says nothing about where Redis lives; the ``Server`` header names no
versions; gzip bodies are read whole and bounded after decompression. No test asserts how
long something took.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.embedded import free_port
from tests.test_ingest_support import cluster_event, running_ingest

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- item 10: outages


async def test_redis_outage_answers_say_nothing_about_where_redis_is(keys: Keys) -> None:
    """Unauthenticated callers get a fixed text; the host and port go to the log only."""
    port = free_port()  # nothing listens there: every connect is refused
    dead = connect(RedisSettings(url=f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.2))
    producer = Producer(dead, Codec(REGISTRY), keys, retry_timeout_s=0.1)
    try:
        async with running_ingest(dead, keys, producer) as s:
            with capture_logs() as logs:
                status, body, headers = await s.post(
                    "/v1/events", cluster_event(), token="spk_anyone"
                )
                ready_status, ready, _ = await s.post("/readyz", method="GET")
            assert status == 503
            assert body == {
                "error": "redis_unavailable",
                "detail": "the event store is unavailable; retry later",
            }
            assert headers["Retry-After"] == "1"
            assert ready_status == 503
            assert ready["detail"] == "the event store does not answer"
            for text in (repr(body), repr(ready)):
                assert "127.0.0.1" not in text
                assert str(port) not in text
            logged = repr([e for e in logs if e["event"] in ("redis_unavailable", "not_ready")])
            assert f"127.0.0.1:{port}" in logged  # the operator still learns what failed
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------- item 11: Server header


async def test_server_header_names_no_versions(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(client, keys, producer) as s:
        token = await s.token("agent-1", ["cluster.*"])
        answers = [
            await s.post("/v1/events", cluster_event(), token=token),  # 202
            await s.post("/v1/events", cluster_event()),  # 401
            await s.post("/no/such/route", method="GET"),  # 404
            await s.post("/healthz", method="GET"),  # 200
        ]
        assert [a[0] for a in answers] == [202, 401, 404, 200]
        for _, _, headers in answers:
            assert headers["Server"] == "streamproc"
