"""Ingest under hostile clients (issue 17, items 4, 6, 10, 11, 15), over real sockets on 127.0.0.1.

What each test pins down: a refusal is decided before the body becomes Python objects and
memory stays flat (measured with tracemalloc, in this process, where the server runs);
connections that never finish their headers are closed and do not crowd out real clients;
a Redis outage says nothing about where Redis lives; the ``Server`` header names no
versions; gzip bodies are read whole and bounded after decompression. No test asserts how
long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs
from yarl import URL

from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.embedded import free_port
from tests.test_ingest_support import Server, cluster_event, running_ingest

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


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def allocated() -> Iterator[list[int]]:
    """The peak of Python allocations inside the block above its start, in bytes.

    The server runs in this process, so its request handling is what is measured (the
    client's side of the request too, which only makes the bound stricter).
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out: list[int] = []
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1] - base)
        if started:
            tracemalloc.stop()


async def chunked(data: bytes, size: int = 1 << 14) -> AsyncIterator[bytes]:
    """A body aiohttp sends with Transfer-Encoding: chunked (no Content-Length)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def host_port(s: Server) -> tuple[str, int]:
    url = URL(s.url)
    assert url.host is not None
    assert url.port is not None
    return url.host, url.port


async def raw_request(s: Server, head: str, body: bytes = b"") -> bytes:
    """Send ``head`` (request line and headers) and ``body``; the answer until EOF."""
    reader, writer = await asyncio.open_connection(*host_port(s))
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


MiB = 1 << 20


# ---------------------------------------------------------------------- item 4: memory per request


@pytest.fixture
async def limited(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> AsyncIterator[tuple[Server, str]]:
    async with running_ingest(client, keys, producer) as s:
        yield s, await s.token("agent-1", ["cluster.*"])


@pytest.mark.parametrize(
    ("content_type", "body", "count"),
    [
        ("application/x-ndjson", b"1\n" * MiB, "more than 1000"),  # 2 MiB, a million lines
        ("application/msgpack", msgspec.msgpack.encode([1] * 4_000_000), "4000000"),
        ("application/json", b"[" + b",".join([b"1"] * 2_000_000) + b"]", "2000000"),
    ],
    ids=["ndjson-ones", "msgpack-4M-ints", "json-2M-ints"],
)
async def test_a_batch_over_the_limit_is_refused_before_it_becomes_objects(
    limited: tuple[Server, str], content_type: str, body: bytes, count: str
) -> None:
    """The item count is read before any item is built: 413, and memory stays flat.

    Before the fix each of these bodies became a million Python objects or more (the NDJSON
    one took a process from 66 MB to 300 MB) before the 1,000-item check refused them.
    """
    s, token = limited
    with allocated() as peak:
        status, answer, _ = await s.post(
            "/v1/events", data=body, token=token, headers={"Content-Type": content_type}
        )
    assert status == 413, answer
    assert answer["error"] == "batch_too_large"
    assert answer["detail"] == f"{count} events in one request, over the limit of 1000"
    assert answer["limit"] == 1000
    # The body itself is ~4 MiB, held by the client and the server (and once joined);
    # a million objects would be 50-300 MiB.
    assert peak[0] < 40 * MiB, peak[0] / MiB


async def test_invalid_requests_count_against_the_agents_rate(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """Garbage spends the agent's tokens like events do: past the burst, 429 for everything."""
    async with running_ingest(
        client, keys, producer, max_batch=5, rate_burst=5, rate_events_per_s=0.01, rate_lease_s=0
    ) as s:
        token = await s.token("agent-1", ["cluster.*"])
        json = {"Content-Type": "application/json"}
        bad = [await s.post("/v1/events", data=b"{x", token=token, headers=json) for _ in "abc"]
        assert [b[0] for b in bad] == [400, 400, 400]  # one event each
        status, answer, _ = await s.post("/v1/events", [{"type": "nope"}] * 2, token=token)
        assert status == 422, answer  # two: the bucket (5) is empty now
        status, answer, headers = await s.post("/v1/events", data=b"{", token=token, headers=json)
        assert status == 429, answer
        assert answer["error"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1
        assert (await s.post("/v1/events", cluster_event(), token=token))[0] == 429


async def test_bodies_in_flight_are_capped_per_process(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """A body held (still arriving) counts against max_inflight_bytes: past it, 503."""
    async with running_ingest(
        client, keys, producer, max_body_bytes=64 << 10, max_inflight_bytes=100 << 10
    ) as s:
        token = await s.token("agent-1", ["cluster.*"])
        # A slow sender: declares 60 KiB, sends 10 bytes, waits.
        _, writer = await asyncio.open_connection(*host_port(s))
        try:
            writer.write(
                (
                    "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Length: {60 << 10}\r\n\r\n"
                ).encode()
                + b'[{"type": '
            )
            await writer.drain()
            for _ in range(500):  # until the server holds it (an auth lookup first)
                if s.ingest.body_bytes:
                    break
                await asyncio.sleep(0.01)
            assert s.ingest.body_bytes == 60 << 10
            events = [cluster_event(instance_id=f"i-{'x' * 200}-{n}") for n in range(150)]
            body = orjson.dumps(events)
            assert 40 << 10 < len(body) < 64 << 10
            status, answer, headers = await s.post("/v1/events", events, token=token)
            assert status == 503, answer
            assert answer["error"] == "overloaded"
            assert headers["Retry-After"] == "1"
            # Smaller bodies still fit beside it; when the slow one goes, the big one fits.
            assert (await s.post("/v1/events", cluster_event(), token=token))[0] == 202
        finally:
            writer.close()
            await writer.wait_closed()
        for _ in range(500):
            if not s.ingest.body_bytes:
                break
            await asyncio.sleep(0.01)
        assert s.ingest.body_bytes == 0
        assert (await s.post("/v1/events", events, token=token))[0] == 202


async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(client, keys, producer, body_read_timeout_s=0.3) as s:
        token = await s.token("agent-1", ["cluster.*"])
        answer = await raw_request(
            s,
            "POST /v1/events HTTP/1.1\nHost: x\nContent-Type: application/json\n"
            f"Authorization: Bearer {token}\nContent-Length: 1000\n",
            b'{"type": ',
        )  # read until EOF: the server closed the connection
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"error":"body_timeout"' in answer
        assert s.ingest.body_bytes == 0


# ---------------------------------------------------------------------- item 15: gzip


async def test_gzip_bodies_are_read_whole_with_and_without_content_length(
    limited: tuple[Server, str], client: aioredis.Redis, keys: Keys
) -> None:
    """Content-Length counts the compressed bytes; the body read is the decompressed one."""
    s, token = limited
    batch = [cluster_event(instance_id=f"i-{n}") for n in range(200)]
    raw = orjson.dumps(batch)
    packed = gzip.compress(raw)
    assert len(packed) < len(raw) // 4
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, answer, _ = await s.post("/v1/events", data=packed, token=token, headers=headers)
    assert status == 202, answer  # was 400: the body was cut at len(packed)
    assert answer["accepted"] == 200
    h = {**headers, "Authorization": f"Bearer {token}"}
    async with s.session.post(s.url + "/v1/events", data=chunked(packed), headers=h) as r:
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.request_info.headers
        assert r.status == 202, await r.text()
        assert (await r.json())["accepted"] == 200
    assert await client.xlen(keys.stream("cluster")) == 400


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_a_gzip_bomb_is_bounded_by_max_body_bytes_after_decompression(
    client: aioredis.Redis, keys: Keys, producer: Producer, with_length: bool
) -> None:
    """256 MiB of zeros in ~250 KiB of gzip: 413 at 1 MiB decompressed, memory flat."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    zero = bytes(MiB)
    packed = b"".join(z.compress(zero) for _ in range(256)) + z.flush()
    assert len(packed) < MiB // 2
    async with running_ingest(client, keys, producer, max_body_bytes=MiB) as s:
        token = await s.token("agent-1", ["cluster.*"])
        h = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Authorization": f"Bearer {token}",
        }
        data: Any = packed if with_length else chunked(packed)
        with allocated() as peak:
            async with s.session.post(s.url + "/v1/events", data=data, headers=h) as r:
                answer = await r.json()
        assert r.status == 413, answer
        assert answer["error"] == "body_too_large"
        assert peak[0] < 24 * MiB, peak[0] / MiB
