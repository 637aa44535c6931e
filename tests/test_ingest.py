"""The ingest endpoint over a real socket and a real Redis: what is accepted, what is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
import pytest
import redis.asyncio as aioredis

from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, ProducerSettings, RedisSettings, connect
from streamproc.embedded import free_port
from tests.test_ingest_support import Server, cluster_event, running_ingest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, max_batch=50, rate_burst=1000) as s:
        yield s


@pytest.fixture
async def token(srv: Server) -> str:
    return await srv.token("agent-1", ["cluster.*"])


async def entries(client: aioredis.Redis, keys: Keys, topic: str = "cluster") -> list[Any]:
    codec = Codec(REGISTRY)
    rows: Any = await client.xrange(keys.stream(topic))
    return [codec.decode(fields) for _, fields in rows]


# ---------------------------------------------------------------------- accepted


async def test_one_event_is_published_with_server_set_source_and_received_at(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    status, body, _ = await srv.post(
        "/v1/events", cluster_event(source="someone-else"), token=token
    )
    assert status == 202, body
    assert body["accepted"] == 1
    [ev] = await entries(client, keys)
    assert body["events"] == [{"id": ev.id, "entry_id": body["events"][0]["entry_id"]}]
    assert ev.source == "agent-1"  # an agent cannot speak for another
    assert ev.received_at is not None


async def test_batch_json_ndjson_and_msgpack_are_accepted_in_order(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    batch = [cluster_event(instance_id=f"i-{n}") for n in range(3)]
    status, body, _ = await srv.post("/v1/events", batch, token=token)
    assert status == 202
    assert body["accepted"] == 3
    nd = b"\n".join(orjson.dumps(e) for e in batch) + b"\n\n"
    status, body2, _ = await srv.post(
        "/v1/events", data=nd, token=token, headers={"Content-Type": "application/x-ndjson"}
    )
    assert status == 202
    assert body2["accepted"] == 3
    status, body3, _ = await srv.post(
        "/v1/events",
        data=msgspec.msgpack.encode(batch),
        token=token,
        headers={"Content-Type": "application/msgpack"},
    )
    assert status == 202
    assert body3["accepted"] == 3
    stored = await entries(client, keys)
    assert [e.instance_id for e in stored] == ["i-0", "i-1", "i-2"] * 3
    rows: Any = await client.xrange(keys.stream("cluster"))
    assert [r[0].decode() for r in rows][:3] == [e["entry_id"] for e in body["events"]]


async def test_cluster_route_merges_the_path_cluster_id(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    ev = cluster_event()
    del ev["cluster_id"]
    status, body, _ = await srv.post("/clusters/prod-7/events", [ev, ev], token=token)
    assert status == 202, body
    stored = await entries(client, keys)
    assert [(e.cluster_id, e.key) for e in stored] == [("prod-7", "prod-7")] * 2
    status, body, _ = await srv.post(
        "/clusters/prod-7/events", cluster_event(cluster_id="other"), token=token
    )
    assert status == 422
    assert body["error"] == "cluster_mismatch"
    assert body["path"] == "$.cluster_id"


# ---------------------------------------------------------------------- idempotency


async def test_retry_with_idempotency_key_returns_the_same_ids_and_adds_nothing(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    h = {"Idempotency-Key": "req-42"}
    batch = [cluster_event(instance_id="a"), cluster_event(instance_id="b")]
    first = await srv.post("/v1/events", batch, token=token, headers=h)
    again = await srv.post("/v1/events", batch, token=token, headers=h)
    assert first[0] == again[0] == 202
    assert first[1]["events"] == again[1]["events"]
    single = await srv.post("/v1/events", cluster_event(), token=token, headers=h)
    single2 = await srv.post("/v1/events", cluster_event(), token=token, headers=h)
    assert single[1]["events"] == single2[1]["events"]
    assert await client.xlen(keys.stream("cluster")) == 3


async def test_retry_of_an_event_with_its_own_id_adds_no_second_entry(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    ev = cluster_event(id="0190d0b6-0000-7000-8000-000000000001")
    a = await srv.post("/v1/events", ev, token=token)
    b = await srv.post("/v1/events", ev, token=token)
    assert a[1]["events"] == b[1]["events"]
    assert await client.xlen(keys.stream("cluster")) == 1


async def test_a_bad_idempotency_key_is_refused(srv: Server, token: str) -> None:
    status, body, _ = await srv.post(
        "/v1/events", cluster_event(), token=token, headers={"Idempotency-Key": "x" * 201}
    )
    assert status == 400
    assert body["error"] == "bad_idempotency_key"


# ---------------------------------------------------------------------- validation


async def test_a_batch_with_bad_items_lists_each_and_publishes_nothing(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    batch = [
        cluster_event(),
        cluster_event(cluster_id=5),
        cluster_event(),
        cluster_event(availability_zone=""),
    ]
    status, body, _ = await srv.post("/v1/events", batch, token=token)
    assert status == 422
    assert body["path"] == "$[1].cluster_id"
    assert [(e["index"], e["path"]) for e in body["errors"]] == [
        (1, "$[1].cluster_id"),
        (3, "$[3].availability_zone"),
    ]
    assert "Expected `str`, got `int`" in body["errors"][0]["reason"]
    assert body["detail"].startswith("2 of 4 events invalid, nothing published")
    assert await client.xlen(keys.stream("cluster")) == 0


async def test_unknown_and_missing_types_are_422_listing_the_known_types(
    srv: Server, token: str
) -> None:
    status, body, _ = await srv.post("/v1/events", {"type": "nope.x"}, token=token)
    assert status == 422
    assert body["error"] == "unknown_type"
    assert body["path"] == "$.type"
    assert "cluster.spot_interruption" in body["known_types"]
    assert "task.normal" not in body["known_types"]  # tasks enter through /v1/tasks only
    # Internal events (Event.external False) are not postable, whatever the agent's scopes:
    # a forged delivery would send anything to any subscriber's destination.
    assert "notify.delivery" not in body["known_types"]
    forged = {"type": "notify.delivery", "subscription_id": "sub_x", "message": {}}
    wildcard = await srv.token("may-post-anything", ["*"])
    status, body, _ = await srv.post("/v1/events", forged, token=wildcard)
    assert status == 422
    assert body["error"] == "unknown_type"
    status, body, _ = await srv.post("/v1/events", [cluster_event(), {"a": 1}], token=token)
    assert status == 422
    assert body["path"] == "$[1].type"
    assert body["error"] == "unknown_type"


@pytest.mark.parametrize(
    ("data", "error", "extra"),
    [
        (b'{"type": "cluster.spot_interruption",', "malformed_json", "position"),
        (b'{"x": NaN}', "malformed_json", "position"),
        (b"[1, 2", "malformed_json", None),
        (b"hello", "malformed_json", "position"),
        (b"", "empty_body", None),
        (b"   \n ", "empty_body", None),
        (b"[]", "empty_batch", None),
        (b'{"type": "\xff\xfe"}', "invalid_utf8", "position"),
        (
            b'[{"type":"cluster.spot_interruption","cluster_id":"\xed\xa0\x80"}]',
            "invalid_utf8",
            None,
        ),
    ],
)
async def test_malformed_bodies_are_400_with_the_position(
    srv: Server, token: str, data: bytes, error: str, extra: str | None
) -> None:
    status, body, _ = await srv.post(
        "/v1/events", data=data, token=token, headers={"Content-Type": "application/json"}
    )
    assert status == 400, body
    assert body["error"] == error
    if extra:
        assert extra in body


async def test_a_malformed_ndjson_line_names_the_line(srv: Server, token: str) -> None:
    data = orjson.dumps(cluster_event()) + b"\n\n{oops\n"
    status, body, _ = await srv.post(
        "/v1/events", data=data, token=token, headers={"Content-Type": "application/x-ndjson"}
    )
    assert status == 400
    assert body["line"] == 3


async def test_hostile_bodies_never_give_5xx(srv: Server, token: str) -> None:
    """Deep nesting, huge strings, wrong types, non-finite numbers: refused with a 4xx."""
    deep = b"[" * 50_000 + b"]" * 50_000
    cases: list[tuple[str, bytes, str]] = [
        ("/v1/events", deep, "application/json"),
        ("/clusters/c/events", deep, "application/json"),
        ("/clusters/c/events", b'[{"a":' * 20_000, "application/json"),
        ("/v1/events", orjson.dumps(cluster_event(instance_id="x" * 300_000)), "application/json"),
        ("/v1/events", orjson.dumps(cluster_event(action=["terminate"])), "application/json"),
        ("/v1/events", orjson.dumps([1, "a", None, True]), "application/json"),
        ("/v1/events", orjson.dumps("just a string"), "application/json"),
        ("/v1/events", b"\x00\x01\x02", "application/json"),
        ("/v1/events", b"\xc1\xc1", "application/msgpack"),
        ("/v1/events", msgspec.msgpack.encode({"type": 5}), "application/msgpack"),
        ("/v1/events", msgspec.msgpack.encode(7), "application/msgpack"),
        ("/v1/events", b"\x91" + b"\x91" * 100_000, "application/msgpack"),
        ("/clusters/c/events", b"\x91" * 100_000 + b"\x80", "application/msgpack"),
    ]
    for path, data, ctype in cases:
        status, body, _ = await srv.post(
            path, data=data, token=token, headers={"Content-Type": ctype}
        )
        assert 400 <= status < 500, (path, data[:40], status, body)
        assert isinstance(body, dict)
        assert "error" in body
    assert (await srv.post("/healthz", method="GET"))[0] == 200


async def test_non_finite_numbers_from_msgpack_are_422(srv: Server, token: str) -> None:
    ev = {
        "type": "cluster.pod_pending",
        "cluster_id": "c",
        "namespace": "n",
        "pod": "p",
        "pending_s": float("inf"),
    }
    status, body, _ = await srv.post(
        "/v1/events",
        data=msgspec.msgpack.encode([ev]),
        token=token,
        headers={"Content-Type": "application/msgpack"},
    )
    assert status == 422
    assert body["path"] == "$[0].pending_s"


# ---------------------------------------------------------------------- limits


async def test_body_too_large_is_413_declared_or_streamed(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(client, keys, producer, max_body_bytes=1000) as srv:
        token = await srv.token("big", ["*"])
        big = orjson.dumps([cluster_event(node_name="n" * 100)] * 10)
        status, body, _ = await srv.post(
            "/v1/events", data=big, token=token, headers={"Content-Type": "application/json"}
        )
        assert status == 413
        assert body["error"] == "body_too_large"
        assert body["limit"] == 1000
        await _streamed_too_large(srv, token)


async def _streamed_too_large(srv: Server, token: str) -> None:

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 200

    async with srv.session.post(
        srv.url + "/v1/events",
        data=chunks(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "body_too_large"


async def test_batch_too_large_is_413(srv: Server, token: str) -> None:
    status, body, _ = await srv.post("/v1/events", [cluster_event()] * 10_000, token=token)
    assert status == 413
    assert body["error"] == "batch_too_large"
    assert body["limit"] == 50
    nd = b"\n".join([orjson.dumps(cluster_event())] * 51)
    status, body, _ = await srv.post(
        "/v1/events", data=nd, token=token, headers={"Content-Type": "application/x-ndjson"}
    )
    assert status == 413


async def test_wrong_content_type_is_415(srv: Server, token: str) -> None:
    status, body, _ = await srv.post(
        "/v1/events", data=b"a=1", token=token, headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    assert "application/json" in body["accepted"]


async def test_rate_limit_is_429_with_retry_after(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(
        client, keys, producer, rate_events_per_s=0.5, rate_burst=3, max_batch=3
    ) as s:
        token = await s.token("fast", ["cluster.*"])
        assert (await s.post("/v1/events", [cluster_event()] * 3, token=token))[0] == 202
        status, body, headers = await s.post("/v1/events", cluster_event(), token=token)
        assert status == 429
        assert body["error"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1
        other = await s.token("other", ["cluster.*"])  # buckets are per agent
        assert (await s.post("/v1/events", cluster_event(), token=other))[0] == 202


async def test_backpressure_is_503_with_retry_after(client: aioredis.Redis, keys: Keys) -> None:
    settings = ProducerSettings(high_watermark=1, backpressure_timeout_s=0.05, lag_cache_ms=0)
    producer = Producer(client, Codec(REGISTRY), keys, settings)
    await client.xgroup_create(keys.stream("cluster"), "slow-group", id="0", mkstream=True)
    async with running_ingest(client, keys, producer) as s:
        token = await s.token("a", ["cluster.*"])
        assert (await s.post("/v1/events", [cluster_event()] * 2, token=token))[0] == 202
        status, body, headers = await s.post("/v1/events", cluster_event(), token=token)
        assert status == 503
        assert body["error"] == "backpressure"
        assert body["group"] == "slow-group"
        assert int(headers["Retry-After"]) >= 1


async def test_redis_down_is_503_and_not_ready(keys: Keys) -> None:
    dead = connect(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.2))
    producer = Producer(dead, Codec(REGISTRY), keys, retry_timeout_s=0.1)
    try:
        async with running_ingest(dead, keys, producer) as s:
            status, body, headers = await s.post("/v1/events", cluster_event(), token="spk_x")
            assert status == 503
            assert body["error"] == "redis_unavailable"
            assert headers["Retry-After"] == "1"
            assert (await s.post("/readyz", method="GET"))[0] == 503
            assert (await s.post("/healthz", method="GET"))[0] == 200
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------- auth


async def test_missing_bad_and_revoked_tokens_are_401(srv: Server) -> None:
    assert (await srv.post("/v1/events", cluster_event()))[0] == 401
    status, body, headers = await srv.post("/v1/events", cluster_event(), token="spk_wrong")
    assert status == 401
    assert body["error"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    token = await srv.token("gone", ["*"])
    assert (await srv.post("/v1/events", cluster_event(), token=token))[0] == 202
    assert await srv.agents.revoke("gone")
    assert (await srv.post("/v1/events", cluster_event(), token=token))[0] == 401


async def test_types_outside_the_scope_are_403(srv: Server) -> None:
    token = await srv.token("pods-only", ["cluster.pod_*"])
    status, body, _ = await srv.post(
        "/v1/events",
        [
            {"type": "cluster.pod_pending", "cluster_id": "c", "namespace": "n", "pod": "p"},
            cluster_event(),
        ],
        token=token,
    )
    assert status == 403
    assert body["error"] == "forbidden_type"
    assert body["path"] == "$[1].type"


async def test_tokens_are_never_stored_in_clear(srv: Server, client: aioredis.Redis) -> None:
    token = await srv.token("secretive", ["*"], operator=True)
    dump = b""
    async for key in client.scan_iter(match=f"{srv.keys.prefix}:*"):
        kind = await client.type(key)
        if kind == b"hash":
            fields: Any = await client.hgetall(key)
            for k, v in fields.items():
                dump += k + v
        elif kind == b"string":
            value: Any = await client.get(key)
            dump += value or b""
    assert dump
    assert token.encode() not in dump
    assert token.removeprefix("spk_").encode() not in dump
    [agent] = await srv.agents.list()
    assert agent.name == "secretive"
    assert agent.operator
    assert len(agent.token_sha256) == 64


async def test_revocation_takes_effect_within_the_cache_bound(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(client, keys, producer, auth_cache_s=0.2) as s:
        token = await s.token("cached", ["*"])
        assert (await s.post("/v1/events", cluster_event(), token=token))[0] == 202
        await s.agents.revoke("cached")
        s.ingest.agents._cache.clear()  # what 0.2 s of waiting does, without the wait
        assert (await s.post("/v1/events", cluster_event(), token=token))[0] == 401


# ---------------------------------------------------------------------- probes


async def test_health_ready_metrics_and_openapi(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(client, keys, producer, groups={"cluster": ["cluster-events"]}) as s:
        assert (await s.post("/healthz", method="GET"))[:2] == (200, {"status": "ok"})
        status, body, _ = await s.post("/readyz", method="GET")
        assert status == 503
        assert body["missing_groups"] == ["cluster/cluster-events"]
        await client.xgroup_create(keys.stream("cluster"), "cluster-events", mkstream=True)
        assert (await s.post("/readyz", method="GET"))[0] == 200
        token = await s.token("m", ["*"])
        await s.post("/v1/events", cluster_event(), token=token)
        await s.post("/v1/events", {"type": "x"}, token=token)
        status, text, headers = await s.post("/metrics", method="GET")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        assert 'streamproc_ingest_events_total{type="cluster.spot_interruption"}' in text
        assert 'streamproc_ingest_rejections_total{reason="unknown_type"}' in text
        assert "streamproc_ingest_request_duration_seconds_bucket" in text
        status, spec, _ = await s.post("/openapi.json", method="GET")
        assert status == 200
        assert spec["openapi"].startswith("3.1")
        assert {"/v1/events", "/clusters/{cluster_id}/events", "/v1/tasks"} <= set(spec["paths"])
        assert "SpotInterruption" in spec["components"]["schemas"]
        status, body, _ = await s.post("/nowhere", method="GET")
        assert status == 404
        assert body["error"] == "not_found"
        status, body, headers = await s.post("/v1/events", method="GET")
        assert status == 405
        assert "POST" in headers["Allow"]
