"""Traces across the stream (streamproc.tracing) with a real Redis and real sockets: the
producer writes the W3C trace context into the entry, the consumer continues it around each
handler, a follow-up event carries the handler's span, the ingest starts a span per request;
and the OTLP/HTTP exporter, set up from OTEL_* variables, reaches a receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from schemas import NodeNotReady, SpotInterruption
from streamproc import Codec, Context, Keys, Producer, tracing
from streamproc.errors import ConfigError
from tests.helpers import MakeConsumer, entries, pending, spot
from tests.test_ingest_support import cluster_event, running_ingest

pytestmark = pytest.mark.timeout(60)

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """Tracing on, into memory, for this test only (not the process's global provider)."""
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(p)
    yield p
    tracing.use(None)
    p.shutdown()


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def consumer_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in finished(exporter) if s.kind is SpanKind.CONSUMER]


def traceparent_of(span: Any) -> bytes:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{c.trace_flags:02x}".encode()


async def test_producer_consumer_follow_up_is_one_trace(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    make_consumer: MakeConsumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    """The entry carries the publisher's span; the consumer's span is its child; an event the
    handler publishes carries the handler's span, and its own consumer span is a child of it."""

    async def on_spot(event: SpotInterruption, ctx: Context) -> None:
        await ctx.producer.publish(NodeNotReady(cluster_id="c1", node_name=event.instance_id))

    async def on_node(event: NodeNotReady, ctx: Context) -> None:
        pass

    consumer = make_consumer({SpotInterruption: on_spot, NodeNotReady: on_node}, concurrency=1)
    await consumer.ensure_groups()
    event = spot(1)
    with provider.get_tracer("test").start_as_current_span("request") as root:
        entry_id = await producer.publish(event)
    while await consumer.process_once():
        pass
    assert await pending(client, keys) == 0

    rows = await entries(client, keys.stream("cluster"))
    assert rows[0][1][b"traceparent"] == traceparent_of(root)
    assert b"tracestate" not in rows[0][1]  # none to carry
    first, follow = consumer_spans(exporter)
    trace_id = root.get_span_context().trace_id
    assert first.name == follow.name == "process cluster"
    assert first.context.trace_id == follow.context.trace_id == trace_id
    assert first.parent is not None
    assert first.parent.span_id == root.get_span_context().span_id
    assert first.parent.is_remote  # continued from the entry, not from the publisher's task
    assert follow.parent is not None
    assert follow.parent.span_id == first.context.span_id
    assert rows[1][1][b"traceparent"] == traceparent_of(first)
    assert first.attributes == {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.destination.name": "cluster",
        "messaging.consumer.group.name": "g",
        "messaging.message.id": entry_id,
        "streamproc.event.type": "cluster.spot_interruption",
        "streamproc.event.id": event.id,
        "streamproc.deliveries": 1,
        "streamproc.attempt": 0,
    }
    assert follow.attributes is not None
    assert follow.attributes["streamproc.event.type"] == "cluster.node_not_ready"
    assert first.status.status_code is StatusCode.UNSET


async def test_the_tracestate_travels_with_the_traceparent(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    make_consumer: MakeConsumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, use_span

    state = TraceState([("vendor", "opaque-1")])
    remote = SpanContext(TRACE_ID, PARENT_ID, True, TraceFlags(1), state)
    with use_span(NonRecordingSpan(remote)):
        await producer.publish(spot(1))
    [(_, fields)] = await entries(client, keys.stream("cluster"))
    assert fields[b"traceparent"] == TRACEPARENT.encode()
    assert fields[b"tracestate"] == b"vendor=opaque-1"

    consumer = make_consumer({SpotInterruption: _nothing})
    await consumer.ensure_groups()
    await consumer.process_once()
    [span] = consumer_spans(exporter)
    assert span.context.trace_id == TRACE_ID
    assert span.context.trace_state.get("vendor") == "opaque-1"


async def _nothing(event: Any, ctx: Context) -> None:
    pass


async def test_a_failed_handler_marks_its_span_as_an_error(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    make_consumer: MakeConsumer,
    producer: Producer,
) -> None:
    async def broken(event: SpotInterruption, ctx: Context) -> None:
        raise ValueError("no such node")

    consumer = make_consumer({SpotInterruption: broken}, concern={"retry": _no_retry()})
    await consumer.ensure_groups()
    await producer.publish(spot(1))
    await consumer.process_once()
    [span] = consumer_spans(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: no such node"
    [exception] = [e for e in span.events if e.name == "exception"]
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "ValueError"


def _no_retry() -> Any:
    from streamproc.settings import RetryPolicy

    return RetryPolicy(max_retries=0)


HOSTILE: list[dict[bytes, bytes]] = [
    {},  # an entry written without tracing
    {b"traceparent": b"garbage"},
    {b"traceparent": b"00-" + b"a" * 10_000},  # 10 KB
    {b"traceparent": TRACEPARENT.encode() + b"-" + b"x" * 10_000},  # valid start, 10 KB
    {b"traceparent": b"\xff\xfe" + TRACEPARENT.encode()[2:]},  # not ASCII
    {b"traceparent": "00-é".encode() + TRACEPARENT.encode()[4:]},
    {b"traceparent": f"00-{0:032x}-{PARENT_ID:016x}-01".encode()},  # an all-zero trace id
    {b"traceparent": f"ff-{TRACE_ID:032x}-{PARENT_ID:016x}-01".encode()},  # version ff
    {b"tracestate": b"vendor=1"},  # a state without a parent
]


@pytest.mark.parametrize("extra", HOSTILE, ids=range(len(HOSTILE)))
async def test_entries_without_or_with_a_bad_trace_context_are_processed_in_a_new_trace(
    extra: dict[bytes, bytes],
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    make_consumer: MakeConsumer,
    codec: Codec[Any],
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.id)

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    event = spot(1)
    fields: Any = {**codec.encode(event), **extra}
    await client.xadd(keys.stream("cluster"), fields)
    await consumer.process_once()
    assert seen == [event.id]
    assert await pending(client, keys) == 0
    [span] = consumer_spans(exporter)
    assert span.parent is None
    assert span.context.trace_id != TRACE_ID


async def test_a_huge_tracestate_is_dropped_and_the_traceparent_kept(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    make_consumer: MakeConsumer,
    codec: Codec[Any],
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    consumer = make_consumer({SpotInterruption: _nothing})
    await consumer.ensure_groups()
    fields = {
        **codec.encode(spot(1)),
        b"traceparent": TRACEPARENT.encode(),
        b"tracestate": b"vendor=" + b"a" * 10_000,
    }
    await client.xadd(keys.stream("cluster"), fields)  # type: ignore[arg-type]
    await consumer.process_once()
    [span] = consumer_spans(exporter)
    assert span.parent is not None
    assert span.parent.span_id == PARENT_ID
    assert span.context.trace_id == TRACE_ID
    assert not span.context.trace_state


async def test_with_tracing_off_entries_carry_no_trace_context(
    make_consumer: MakeConsumer,
    producer: Producer,
    codec: Codec[Any],
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    """Off (the default), nothing is written even under someone else's span, and entries that
    carry a context are processed as any other."""
    assert not tracing.active()
    elsewhere = TracerProvider()
    with elsewhere.get_tracer("app").start_as_current_span("app's own"):
        await producer.publish(spot(1))
    elsewhere.shutdown()
    [(_, fields)] = await entries(client, keys.stream("cluster"))
    assert set(fields) == {b"type", b"id", b"ts", b"key", b"v", b"data"}
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.id)

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    traced = spot(2)
    carried: Any = {**codec.encode(traced), b"traceparent": TRACEPARENT.encode()}
    await client.xadd(keys.stream("cluster"), carried)
    while await consumer.process_once():
        pass
    assert sorted(seen) == sorted([spot_id(fields), traced.id])
    assert await pending(client, keys) == 0


def spot_id(fields: dict[bytes, bytes]) -> str:
    return fields[b"id"].decode()


# ---------------------------------------------------------------------- ingest


@pytest.fixture
async def traced_ingest(
    provider: TracerProvider, client: aioredis.Redis, keys: Keys, producer: Producer
) -> AsyncIterator[Any]:
    async with running_ingest(client, keys, producer, rate_burst=1000) as s:
        yield s


async def test_ingest_starts_a_server_span_per_request_and_its_events_are_children(
    exporter: InMemorySpanExporter, traced_ingest: Any, client: aioredis.Redis, keys: Keys
) -> None:
    srv = traced_ingest
    token = await srv.token("agent-1", ["cluster.*"])
    status, _, _ = await srv.post("/v1/events", [cluster_event(), cluster_event()], token=token)
    assert status == 202
    status, _, _ = await srv.post(
        "/v1/events", cluster_event(), token=token, headers={"traceparent": TRACEPARENT}
    )
    assert status == 202
    status, _, _ = await srv.post("/v1/events", cluster_event(), token="wrong")
    assert status == 401
    status, _, _ = await srv.post(
        # (aiohttp itself refuses a header line over 8 KB)
        "/v1/events",
        cluster_event(),
        token=token,
        headers={"traceparent": "00-" + "x" * 4000},
    )
    assert status == 202
    async with srv.session.get(srv.url + "/healthz") as r:
        assert r.status == 200

    servers = [s for s in finished(exporter) if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == ["POST /v1/events"] * 4  # no span for the probe
    own, continued, refused, hostile = servers
    assert own.parent is None
    assert continued.parent is not None
    assert continued.parent.span_id == PARENT_ID
    assert continued.context.trace_id == TRACE_ID
    assert hostile.parent is None
    assert refused.attributes is not None
    assert refused.attributes["http.response.status_code"] == 401
    assert refused.status.status_code is StatusCode.UNSET  # a client's error, not ours
    assert own.attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/events",
        "http.route": "/v1/events",
        "http.response.status_code": 202,
    }
    rows = await entries(client, keys.stream("cluster"))
    carried = [f[b"traceparent"] for _, f in rows]
    assert carried == [traceparent_of(own)] * 2 + [traceparent_of(continued)] + [
        traceparent_of(hostile)
    ]


# ---------------------------------------------------------------------- set-up from OTEL_*


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    for env in ({}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": " "}):
        assert tracing.setup_from_env(env, role="test") is False
    off = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert tracing.setup_from_env(off, role="test") is False
    assert not tracing.active()
    with pytest.raises(ConfigError, match="unknown exporter"):
        tracing.setup_from_env({"OTEL_TRACES_EXPORTER": "jaeger"}, role="test")
    grpc = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(ConfigError, match="http/protobuf only"):
        tracing.setup_from_env(grpc, role="test")


class Receiver:
    """An OTLP/HTTP receiver on 127.0.0.1: decodes each ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.got = asyncio.Event()
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        if request.content_type == "application/x-protobuf":
            self.requests.append(message)
            self.got.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> tuple[set[str], dict[str, Any]]:
        """The service names, and the spans by name."""
        services: set[str] = set()
        spans: dict[str, Any] = {}
        for message in self.requests:
            for rs in message.resource_spans:
                for attr in rs.resource.attributes:
                    if attr.key == "service.name":
                        services.add(attr.value.string_value)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        spans[span.name] = span
        return services, spans


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", r.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    r.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield r
    await runner.cleanup()


async def wait_for(cond: Any, timeout_s: float = 30.0) -> Any:
    for _ in range(int(timeout_s / 0.05)):
        if got := await cond():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_a_consume_role_set_up_by_otel_variables_exports_over_otlp_http(
    receiver: Receiver,
    provider: TracerProvider,
    redis_url: str,
    keys: Keys,
    client: aioredis.Redis,
    repo_root: Path,
) -> None:
    """``streamproc consume`` with OTEL_TRACES_EXPORTER=otlp and an endpoint alone exports its
    spans (OTLP/HTTP, protobuf) to the receiver: the handler's span continues the trace of
    the span that published the event here, under the service named."""
    from tests.tiny_app import Ping
    from tests.tiny_app import app as tiny

    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_BLOCK_MS": "100",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "tracing-test",
    }
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "streamproc", "--app", "tests.tiny_app:app", "consume", "--all"),
        cwd=repo_root,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for(lambda: client.exists(keys.stream("tiny")))
        producer = Producer(client, tiny.codec, keys)
        with provider.get_tracer("test").start_as_current_span("job") as job:
            await producer.publish(Ping(n=3))
        assert await wait_for(lambda: client.get(keys.state("tiny", "pings"))) == b"3"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]
    await asyncio.wait_for(receiver.got.wait(), 10)  # flushed at exit at the latest
    services, spans = receiver.spans()
    assert services == {"tracing-test"}
    process = spans["process tiny"]
    context = job.get_span_context()
    assert process.trace_id == context.trace_id.to_bytes(16, "big")
    assert process.parent_span_id == context.span_id.to_bytes(8, "big")
    assert process.kind == process.SPAN_KIND_CONSUMER
    attributes = {a.key: a.value for a in process.attributes}
    assert attributes["messaging.consumer.group.name"].string_value == "tiny-counter"
    assert attributes["streamproc.event.type"].string_value == "tiny.ping"


async def test_an_ingest_role_set_up_by_otel_variables_exports_its_request_spans(
    receiver: Receiver, redis_url: str, keys: Keys, repo_root: Path
) -> None:
    """``streamproc ingest`` traces each request (even a refused one) under its default
    service name, continuing the caller's ``traceparent``."""
    import aiohttp

    from streamproc.embedded import free_port

    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
    }
    env.pop("OTEL_SERVICE_NAME", None)
    env.pop("OTEL_RESOURCE_ATTRIBUTES", None)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "streamproc", "--app", "tests.tiny_app:app"),
        *("ingest", "--port", str(port)),
        cwd=repo_root,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def answered() -> int | None:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return r.status
                except aiohttp.ClientConnectionError:
                    return None

            assert await wait_for(answered) == 200
            async with session.post(
                f"http://127.0.0.1:{port}/v1/events",
                json={"type": "tiny.ping", "n": 1},
                headers={"traceparent": TRACEPARENT},
            ) as r:
                assert r.status == 401  # no token: refused, and traced all the same
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]
    await asyncio.wait_for(receiver.got.wait(), 10)
    services, spans = receiver.spans()
    assert services == {"streamproc-ingest"}
    assert set(spans) == {"POST /v1/events"}  # not the probe
    span = spans["POST /v1/events"]
    assert span.trace_id == TRACE_ID.to_bytes(16, "big")
    assert span.parent_span_id == PARENT_ID.to_bytes(8, "big")
    assert span.kind == span.SPAN_KIND_SERVER
