"""The operator API of subscriptions, the delivery log and breakers, over real sockets; the
CLI commands; and broken, huge and hostile input to both."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from notifications import api
from notifications.delivery_log import Attempt, DeliveryLog
from notifications.settings import NotifySettings
from notifications.subscriptions import SubscriptionStore
from schemas import REGISTRY
from streamproc import Keys, Producer
from streamproc.breaker import Breaker
from streamproc.ingest import Ingest, IngestSettings, create_app
from tests.helpers import CliRun, cli_in_process
from tests.test_ingest_support import Server

SLACK = "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    ingest = Ingest(
        client=client,
        registry=REGISTRY,
        keys=keys,
        producer=producer,
        settings=IngestSettings(auth_cache_s=0.0, max_body_bytes=64 * 1024),
    )
    app = create_app(ingest, routes=[lambda a, i: api.add_routes(a, i, NotifySettings())])
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(server, session, ingest, keys)
    finally:
        await server.close()


async def test_subscriptions_are_added_listed_and_removed_without_showing_secrets(
    srv: Server,
) -> None:
    op = await srv.token("op", (), operator=True)
    status, body, _ = await srv.post(
        "/v1/subscriptions",
        {"cluster": "c1", "channel": "webhook", "destination": "https://example.test/h?k=s3cr3t"},
        token=op,
    )
    assert status == 201, body
    secret = body["secret"]
    assert secret.startswith("whsec_")
    sub_id = body["subscription"]["id"]
    status, body, _ = await srv.post(
        "/v1/subscriptions",
        {"cluster": "*", "channel": "slack", "destination": SLACK, "min_severity": "critical"},
        token=op,
    )
    assert status == 201
    assert "secret" not in body
    status, listed, _ = await srv.post("/v1/subscriptions", token=op, method="GET")
    assert status == 200
    text = orjson.dumps(listed).decode()
    assert secret not in text
    assert "s3cr3t" not in text  # a URL's query may hold a token: masked
    assert "XXXXXXXXXXXX" not in text  # a Slack URL is its own secret
    assert len(listed["subscriptions"]) == 2
    status, only, _ = await srv.post("/v1/subscriptions?cluster=c1", token=op, method="GET")
    assert [s["id"] for s in only["subscriptions"]] == [sub_id]
    status, _, _ = await srv.post(f"/v1/subscriptions/{sub_id}", token=op, method="DELETE")
    assert status == 204
    status, body, _ = await srv.post(f"/v1/subscriptions/{sub_id}", token=op, method="DELETE")
    assert status == 404
    assert body["error"] == "not_found"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"cluster": "c1", "channel": "pigeon", "destination": "x"}, "$.channel"),
        ({"cluster": "c1", "channel": "webhook", "destination": "ftp://x/y"}, "$.destination"),
        ({"cluster": "c1", "channel": "webhook", "destination": "http://a b/"}, "$.destination"),
        ({"cluster": "c1", "channel": "email", "destination": "not-an-address"}, "$.destination"),
        ({"cluster": "c1", "channel": "email", "destination": "a@b.co\r\nBcc: x@y.z"}, None),
        ({"cluster": "c1", "channel": "email", "destination": "a@b.co\n"}, "$.destination"),
        ({"cluster": "c1\n", "channel": "webhook", "destination": "http://a/"}, "$.cluster"),
        ({"cluster": "{x}", "channel": "webhook", "destination": "http://a/"}, "$.cluster"),
        (
            {"cluster": "c1", "channel": "webhook", "destination": "http://a/", "types": ["zz"]},
            "$.types",
        ),
        (
            {
                "cluster": "c1",
                "channel": "webhook",
                "destination": "http://a/",
                "min_severity": "loud",
            },
            "$.min_severity",
        ),
        (
            {
                "cluster": "c1",
                "channel": "webhook",
                "destination": "http://a/",
                "secret": "whsec_short",
            },
            "$.secret",
        ),
        (
            {"cluster": "c1", "channel": "slack", "destination": "http://a/", "secret": "x"},
            "$.secret",
        ),
        ({"cluster": "c1", "channel": "webhook"}, "$"),
        ({"cluster": 5, "channel": "webhook", "destination": "http://a/"}, "$.cluster"),
        ({"cluster": "c1", "channel": "webhook", "destination": "http://a/", "extra": 1}, None),
        ({"cluster": "c1", "channel": "webhook", "destination": "http://a/" + "x" * 5000}, None),
        ([1, 2], "$"),
    ],
)
async def test_bad_subscriptions_get_a_precise_400(
    srv: Server, client: aioredis.Redis, keys: Keys, body: Any, path: str | None
) -> None:
    op = await srv.token("op", (), operator=True)
    status, answer, _ = await srv.post("/v1/subscriptions", body, token=op)
    assert status == 400, answer
    assert answer["error"] == "invalid"
    assert answer["detail"]
    if path is not None:
        assert answer["path"] == path, answer
    assert await SubscriptionStore(client, keys).all() == []


async def test_hostile_bodies_and_tokens(srv: Server, client: aioredis.Redis, keys: Keys) -> None:
    op = await srv.token("op", (), operator=True)
    agent = await srv.token("edge", ("cluster.*",))
    good = {"cluster": "c1", "channel": "webhook", "destination": "http://a/"}
    assert (await srv.post("/v1/subscriptions", good))[0] == 401
    assert (await srv.post("/v1/subscriptions", good, token="spk_forged"))[0] == 401
    status, body, _ = await srv.post("/v1/subscriptions", good, token=agent)
    assert status == 403  # only operators manage subscriptions
    assert (await srv.post("/v1/subscriptions", token=agent, method="GET"))[0] == 403
    assert (await srv.post("/v1/breakers", token=agent, method="GET"))[0] == 403
    status, body, _ = await srv.post(
        "/v1/subscriptions",
        data=b"{not json",
        token=op,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert body["error"] == "malformed"
    status, _, _ = await srv.post(
        "/v1/subscriptions",
        data=b"x" * (65 * 1024),
        token=op,
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    deep = b"[" * 10_000 + b"]" * 10_000
    status, _, _ = await srv.post(
        "/v1/subscriptions", data=deep, token=op, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    status, _, _ = await srv.post(
        "/v1/subscriptions",
        data=b"a=b",
        token=op,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    status, body, _ = await srv.post("/v1/subscriptions?cluster=%7Bx%7D", token=op, method="GET")
    assert status == 400
    assert body["path"] == "cluster"
    status, body, _ = await srv.post(
        "/v1/notifications/..%2F..%2Fx/deliveries", token=op, method="GET"
    )
    assert status in (400, 404)
    # Still serving, nothing stored.
    assert (await srv.post("/v1/subscriptions", good, token=op))[0] == 201
    assert len(await SubscriptionStore(client, keys).all()) == 1


async def test_delivery_log_and_breakers_are_readable(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    op = await srv.token("op", (), operator=True)
    log = DeliveryLog(client, keys, maxlen=100, ttl_s=60)
    for outcome in ("retry", "sent"):
        await log.record(
            Attempt(
                notification_id="n-1",
                delivery_id="d-1",
                subscription_id="sub_1",
                channel="webhook",
                destination="http://a/",
                status=outcome,
                http_status=500 if outcome == "retry" else 200,
            )
        )
    await client.xadd(keys.state("notify", "log"), {"attempt": b"garbage"})  # another writer
    status, body, _ = await srv.post("/v1/notifications/n-1/deliveries", token=op, method="GET")
    assert status == 200
    assert [a["status"] for a in body["attempts"]] == ["retry", "sent"]
    assert [a.status for a in await log.recent(10)] == ["sent", "retry"]
    b = Breaker(client, keys, "webhook:http://a:80", threshold=1, cooldown_s=60)
    await b.admit()
    await b.failure("boom")
    status, body, _ = await srv.post("/v1/breakers", token=op, method="GET")
    assert status == 200
    [state] = body["breakers"]
    assert state["state"] == "open"
    assert state["last_error"] == "boom"


def _cli(env: dict[str, str], repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        env=env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_subscriptions_and_log(
    redis_url: str,
    keys: Keys,
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    env = {**os.environ, **overrides}

    def in_process(*args: str) -> CliRun:
        """Refusals (exit codes, messages) by the same ``main`` without a process start each;
        every command above also ran as a real process."""
        return cli_in_process(monkeypatch, capsys, overrides, *args)

    added = _cli(
        env,
        repo_root,
        "subscriptions",
        "add",
        "--cluster",
        "c1",
        "--channel",
        "webhook",
        "--to",
        "http://127.0.0.1:9/hook",
        "--types",
        "notify.*",
    )
    assert added.returncode == 0, added.stderr
    sub_id, secret = added.stdout.split()
    assert sub_id.startswith("sub_")
    assert secret.startswith("whsec_")
    slack = _cli(
        env,
        repo_root,
        "subscriptions",
        "add",
        "--cluster",
        "*",
        "--channel",
        "slack",
        "--to",
        SLACK,
    )
    assert slack.returncode == 0, slack.stderr
    assert "XXXXXXXXXX" not in slack.stdout + slack.stderr
    listed = _cli(env, repo_root, "subscriptions", "list")
    assert listed.returncode == 0
    assert sub_id in listed.stdout
    assert secret not in listed.stdout
    assert "XXXXXXXXXX" not in listed.stdout
    as_json = _cli(env, repo_root, "subscriptions", "list", "--json", "--cluster", "c1")
    [row] = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert row["id"] == sub_id
    assert "secret" not in row
    bad = in_process(
        "subscriptions",
        "add",
        "--cluster",
        "c1",
        "--channel",
        "email",
        "--to",
        "nobody",
    )
    assert bad.returncode == 2
    assert "not an email address" in bad.stderr
    bad_type = in_process(
        "subscriptions",
        "add",
        "--cluster",
        "c1",
        "--channel",
        "slack",
        "--to",
        SLACK,
        "--types",
        "cluster.*",
    )
    assert bad_type.returncode == 2
    assert "matches no notification type" in bad_type.stderr
    assert _cli(env, repo_root, "subscriptions", "remove", sub_id).returncode == 0
    assert in_process("subscriptions", "remove", sub_id).returncode == 1
    missing = in_process("notifications", "log", "no-such-id")
    assert missing.returncode == 1
    assert _cli(env, repo_root, "notifications", "recent").returncode == 0


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("STREAMPROC_NOTIFY_READ_TIMEOUT_S", "-1"),
        ("STREAMPROC_NOTIFY_READ_TIMEOUT_S", "soon"),
        ("STREAMPROC_NOTIFY_BREAKER_THRESHOLD", "0"),
        ("STREAMPROC_NOTIFY_LOG_MAXLEN", "9" * 400),
    ],
)
def test_bad_settings_name_their_variable(var: str, value: str) -> None:
    import notifications
    from streamproc.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        notifications.settings_from({var: value})
    assert str(e.value).startswith(f"{var}={value[:20]!r}"[: len(var) + 15]), str(e.value)
