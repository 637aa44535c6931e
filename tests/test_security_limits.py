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
import os
import resource
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs
from yarl import URL

from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.embedded import free_port
from streamproc.ingest import AgentStore, Ingest, IngestSettings, create_app
from streamproc.ingest._serve import GuardedSite, make_runner
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
    # The body itself is ~4 MiB, held by the client and the server (and once joined);
    # a million objects would be 50-300 MiB.
    assert peak[0] < 40 * MiB, peak[0] / MiB
    assert answer["detail"] == f"{count} events in one request, over the limit of 1000"
    assert answer["limit"] == 1000


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


# ---------------------------------------------------------------------- item 6: slowloris


@contextlib.asynccontextmanager
async def guarded_ingest(
    client: aioredis.Redis, keys: Keys, producer: Producer, **settings: Any
) -> AsyncIterator[tuple[Ingest, str]]:
    """Ingest served as ``streamproc ingest`` serves it: its runner and ``GuardedSite``."""
    ingest = Ingest(
        client=client,
        registry=REGISTRY,
        keys=keys,
        producer=producer,
        settings=IngestSettings(**{"auth_cache_s": 0.0, **settings}),
    )
    runner = make_runner(create_app(ingest), ingest.settings)
    await runner.setup()
    site = GuardedSite(runner, ingest.connections, host="127.0.0.1", port=0)
    await site.start()
    try:
        yield ingest, f"http://127.0.0.1:{site.port}"
    finally:
        await runner.cleanup()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def idle_socket(port: int, first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def drip(writer: asyncio.StreamWriter) -> None:
    """Slowloris proper: one more header line every 50 ms, never the blank line."""
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            writer.write(b"X-Drip: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (nothing when a drip was writing as it closed:
    a reset, or a broken pipe when the drip's write came after the server's close)."""
    try:
        return await reader.read()
    except ConnectionError:  # reset or broken pipe; CI under load saw the broken pipe
        return b""


IDLE = 1000  # sockets (the figure), each end in this process: 2,000 descriptors


@pytest.mark.serial  # 2,000 descriptors and 1 s header deadlines: not beside other workers
@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * IDLE + 400,
    reason="the open-files limit is too low for the idle sockets",
)
async def test_idle_and_dripping_connections_neither_block_clients_nor_leak(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """1,000 connections that never finish their headers: a real client is served meanwhile,
    and each of them is closed by the server once its headers are late."""
    fds = open_fds()
    async with guarded_ingest(
        client, keys, producer, header_read_timeout_s=1.0, keepalive_timeout_s=30.0
    ) as (ingest, url):
        port = URL(url).port
        assert port is not None
        token_ = (
            await AgentStore(client, keys).add("agent-1", types=["cluster.*"], clusters=["*"])
        )[1]
        partial = b"POST /v1/events HTTP/1.1\r\nHost: x\r\n"
        socks = [await idle_socket(port, b"" if n % 3 == 0 else partial) for n in range(IDLE)]
        drips = [asyncio.create_task(drip(w)) for _, w in socks[2::3]]  # a third of them
        try:
            async with aiohttp.ClientSession() as session:
                h = {"Authorization": f"Bearer {token_}"}
                async with session.post(url + "/v1/events", json=cluster_event(), headers=h) as r:
                    assert r.status == 202, await r.text()
                async with session.get(url + "/healthz") as r:
                    assert r.status == 200
            # Every idle one is closed by the server (EOF), the dripping ones included.
            answers = await asyncio.gather(*(until_closed(reader) for reader, _ in socks))
            assert answers == [b""] * IDLE  # closed without an answer
        finally:
            for task in drips:
                task.cancel()
            await asyncio.gather(*drips, return_exceptions=True)
            for _, writer in socks:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for _, w in socks), return_exceptions=True)
        assert ingest.connections.timed_out >= IDLE
        for _ in range(500):  # the client session's connection closes on its own
            if not ingest.connections.open:
                break
            await asyncio.sleep(0.01)
        assert ingest.connections.open == {}
    assert open_fds() <= fds + 2  # no descriptor left behind


async def test_past_max_connections_the_idlest_connection_makes_room(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """At the cap a new connection closes the one idle the longest: real clients get in."""
    async with guarded_ingest(
        client, keys, producer, max_connections=50, header_read_timeout_s=60.0
    ) as (ingest, url):
        port = URL(url).port
        assert port is not None
        socks = [await idle_socket(port, b"GET /healthz HTTP/1.1\r\n") for _ in range(120)]
        try:
            async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as r:
                assert r.status == 200
                assert len(ingest.connections.open) <= 50
            assert ingest.connections.evicted == 120 + 1 - 50
            assert ingest.connections.refused == 0
            assert await until_closed(socks[0][0]) == b""  # the idlest went first
        finally:
            for _, writer in socks:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for _, w in socks), return_exceptions=True)


async def test_past_max_connections_with_every_one_busy_the_new_one_is_closed(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """Connections mid-request are never evicted: the newcomer is the one closed."""
    async with guarded_ingest(client, keys, producer, max_connections=5) as (ingest, url):
        port = URL(url).port
        assert port is not None
        token = (
            await AgentStore(client, keys).add("agent-1", types=["cluster.*"], clusters=["*"])
        )[1]
        head = (
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n"
        ).encode()
        socks = [await idle_socket(port, head) for _ in range(5)]  # each waits for its body
        try:
            for _ in range(500):  # until all five are reading their bodies
                if ingest.body_bytes == 500:
                    break
                await asyncio.sleep(0.01)
            assert ingest.body_bytes == 500
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await until_closed(reader) == b""
            writer.close()
            assert ingest.connections.refused == 1
            assert ingest.connections.evicted == 0
            assert len(ingest.connections.open) == 5
        finally:
            for _, w in socks:
                w.close()
            await asyncio.gather(*(w.wait_closed() for _, w in socks), return_exceptions=True)


async def test_a_connection_idle_after_its_answer_closes_after_keepalive_timeout_s(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with guarded_ingest(
        client, keys, producer, keepalive_timeout_s=0.3, header_read_timeout_s=60.0
    ) as (ingest, url):
        port = URL(url).port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await until_closed(reader)  # kept alive, then closed by the server
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            assert answer.endswith(b'{"status":"ok"}')
            assert ingest.connections.timed_out == 0  # keep-alive closed it, not the header rule
        finally:
            writer.close()


@pytest.fixture
def ingest_process(redis_url: str, keys: Keys, repo_root: Path) -> Iterator[int]:
    """``streamproc ingest`` with a 0.5 s header deadline (from the environment): its port."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_LOG_LEVEL": "warning",
        "STREAMPROC_INGEST_HEADER_READ_TIMEOUT_S": "0.5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamproc", "ingest", "--port", str(port)],
        env=env,
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
        assert proc.poll() is None, f"ingest exited with {proc.returncode}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_streamproc_ingest_serves_with_the_header_deadline_and_a_neutral_server(
    ingest_process: int,
) -> None:
    """The entry point: settings from the environment, the guarded site, and aiohttp's own
    400 for an unparsable request without versions in ``Server``."""
    port = ingest_process
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.headers["Server"] == "streamproc"
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    answer = await until_closed(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400 "), answer
    assert b"\r\nServer: streamproc\r\n" in answer
    assert b"aiohttp" not in answer
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    assert await until_closed(reader) == b""  # closed: its headers were late
    writer.close()
