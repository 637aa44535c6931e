"""Input hygiene (issue 17, items 9, 13 and 16), each finding reproduced as an attacker would.

- 9: a control character in an event's id or key (or anywhere in an entry) never reaches an
  operator's terminal raw (``tail --pretty``, ``dlq list``, ``inspect``), and ingest refuses
  them in ids, keys and sources with a 422 naming the field.
- 13: a notification built from an agent's text (a 10 kB reason, 253-character names) fits
  its own schema, so it decodes and is fanned out instead of dead-lettered.
- 16: ``*`` means every type agents may post, never one the application publishes itself
  (ticks, notifications, renders, task requests).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from consumers import cluster_events
from notifications import concern as notify
from notifications.cli import _print_attempts as print_attempts
from notifications.delivery_log import Attempt
from notifications.feed_keys import feed_key
from notifications.messages import message_of
from schemas import REGISTRY, Notification
from schemas.cluster import SpotInterruption
from schemas.notify import Message, RightSizingRecommendation, fit
from schemas.ticks import DiscoveryTick
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.app import load_app
from streamproc.breaker import BreakerState
from streamproc.errors import ConfigError
from streamproc.event import derived_id, postable_types
from streamproc.inspect import Report, render_table
from streamproc.scheduler import Scheduler
from streamproc.tail import TailEntry, follow, format_json, format_pretty
from tests.helpers import CliRun, cli_in_process
from tests.test_ingest_support import Server, cluster_event, running_ingest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
#: A terminal takes any of these as a command (ESC, BEL, CSI as one C1 byte, DEL, bidi).
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
CLEAR = "\x1b[2J\x1b[H"
TITLE = "\x1b]0;owned\x07"


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, rate_burst=1000) as s:
        yield s


@pytest.fixture
def env(redis_url: str, keys: Keys) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> Callable[..., CliRun]:
    return lambda *args: cli_in_process(monkeypatch, capsys, env, *args)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def consumer_of(concern: Any, client: aioredis.Redis, keys: Keys, producer: Producer) -> Consumer:
    return Consumer(
        concern,
        client=client,
        codec=Codec(REGISTRY),
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="t"),
    )


async def run_all(consumer: Consumer) -> None:
    await consumer.ensure_groups()
    while await consumer.process_once():
        pass


# ---------------------------------------------------------------------- 9: terminal output


async def test_tail_shows_control_characters_of_ids_keys_and_fields_as_escapes(
    client: aioredis.Redis, keys: Keys, codec: Codec[Any]
) -> None:
    """Entries written before ingest refused them (or straight into Redis): one that decodes
    no more, one whose type itself is hostile. Pretty and JSON output carry no raw control
    character but this module's own colours, and JSON still reads back the same values."""
    hostile = SpotInterruption(
        id="e-1\x9b31m",
        key=CLEAR,
        cluster_id="c1",
        instance_id=f"i-{TITLE}",
        instance_type="m5.large",
        availability_zone="a\u202eb",
    )
    await client.xadd(keys.stream("cluster"), codec.encode(hostile))  # type: ignore[arg-type]
    await client.xadd(
        keys.stream("cluster"), {"type": f"x{CLEAR}", "id": TITLE, "key": "\x7f", "data": "{}"}
    )
    got: list[TailEntry] = []
    async for entry in follow(client, keys, codec, "cluster", start="0"):
        got.append(entry)
        if len(got) == 2:
            break
    for entry in got:
        plain = format_pretty(entry)
        assert not RAW_CONTROL.search(plain), plain
        coloured = re.sub(r"\x1b\[[0-9]+m", "", format_pretty(entry, color=True))
        assert not RAW_CONTROL.search(coloured), coloured
        line = format_json(entry)
        assert not RAW_CONTROL.search(line), line
        assert json.loads(line)["key"] == entry.key
    assert "key=\\x1b[2J\\x1b[H" in format_pretty(got[0])
    assert "e-1\\x9b31m" in format_pretty(got[0])
    assert "\\u202e" in format_pretty(got[0])
    assert "x\\x1b[2J" in format_pretty(got[1])


def test_dlq_list_and_show_escape_what_the_dead_letter_carries(
    redis_url: str, keys: Keys, env: dict[str, str]
) -> None:
    """In real ``streamproc`` processes: what the operator's terminal receives."""
    fields = {
        "type": f"spot{CLEAR}",
        "id": TITLE,
        "key": CLEAR,
        "data": "{}",
        "dlq_reason": "invalid\x9b",
        "dlq_error": f"Expected `str` matching regex, got {CLEAR}",
    }
    with redis.Redis.from_url(redis_url) as r:
        r.xadd(keys.dlq("cluster", "cluster-events"), fields)
    listed = cli("dlq", "list", "cluster-events", env=env)
    assert listed.returncode == 0, listed.stderr
    assert not RAW_CONTROL.search(listed.stdout), listed.stdout
    assert "spot\\x1b[2J\\x1b[H" in listed.stdout
    assert "invalid\\x9b" in listed.stdout
    shown = cli("dlq", "show", "cluster-events", "--id", TITLE, env=env)
    assert shown.returncode == 0, shown.stderr
    assert not RAW_CONTROL.search(shown.stdout), shown.stdout
    assert "spot\\x1b[2J\\x1b[H" in shown.stdout
    shown = cli("dlq", "show", "cluster-events", "--id", TITLE, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert not RAW_CONTROL.search(shown.stdout), shown.stdout
    doc = json.loads(shown.stdout)  # still JSON, and the same values
    assert doc["fields"]["key"] == CLEAR
    assert doc["fields"]["dlq_reason"] == "invalid\x9b"


def test_inspect_escapes_names_and_errors_read_from_redis() -> None:
    report = Report(
        prefix="sp",
        server_time_ms=1,
        topics=[],
        ticker=None,
        breakers=[BreakerState(name=f"webhook{CLEAR}", last_error=f"HTTP 500: {TITLE}")],
    )
    table = render_table(report, [f"group{CLEAR} over its lag"])
    assert not RAW_CONTROL.search(table), table
    assert "webhook\\x1b[2J" in table
    assert "\\x1b]0;owned\\x07" in table


def test_the_delivery_log_prints_a_destinations_answer_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A permanent failure logs the start of the destination's answer: anyone's text."""
    attempt = Attempt(
        notification_id="n-1",
        delivery_id="d-1",
        subscription_id="sub_1",
        channel="webhook",
        destination="https://hooks.example/x",
        status="failed",
        http_status=400,
        error=f"HTTP 400: {CLEAR}{TITLE}",
    )
    row = msgspec.structs.asdict(attempt)
    print_attempts([row], False)
    print_attempts([row], True)
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out), out
    assert "HTTP 400: \\x1b[2J" in out
    assert json.loads(out.splitlines()[-1])["error"] == attempt.error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", f"e-1{CLEAR}"),
        ("id", "e-1\n"),
        ("key", TITLE),
        ("key", "c1\x9b31m"),
        ("key", "\u202ec1"),
        ("source", "agent\x1b"),
        ("cluster_id", f"c1{CLEAR}"),
        ("instance_id", "i-1\x7f"),
    ],
)
async def test_ingest_refuses_control_characters_naming_the_field(
    srv: Server, client: aioredis.Redis, keys: Keys, field: str, value: str
) -> None:
    token = await srv.token("agent-1", ["cluster.*"])
    status, body, _ = await srv.post("/v1/events", cluster_event(**{field: value}), token=token)
    assert status == 422, body
    assert body["path"] == f"$.{field}"
    batch = [cluster_event(), cluster_event(**{field: value})]
    status, body, _ = await srv.post("/v1/events", batch, token=token)
    assert status == 422, body
    assert [e["path"] for e in body["errors"]] == [f"$[1].{field}"]
    assert await client.xlen(keys.stream("cluster")) == 0


async def test_the_cluster_route_refuses_a_control_character_in_the_path_cluster(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await srv.token("agent-1", ["cluster.*"])
    ev = cluster_event()
    del ev["cluster_id"]
    status, body, _ = await srv.post("/clusters/c1%1B%5B2J/events", ev, token=token)
    assert status == 422, body
    assert body["path"] == "$.cluster_id"
    assert await client.xlen(keys.stream("cluster")) == 0


async def test_ids_and_keys_in_use_today_are_still_accepted(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await srv.token("agent-1", ["cluster.*"])
    accepted = [
        cluster_event(id="0190d0b6-0000-7000-8000-000000000001"),
        cluster_event(id=derived_id("0190d0b6-0000-7000-8000-000000000001", "notify")),
        cluster_event(id="a1:order-42", key="prod/eu-1"),
        cluster_event(id="évènement 7", key="clé é", instance_id="i-é"),
    ]
    status, body, _ = await srv.post("/v1/events", accepted, token=token)
    assert status == 202, body
    assert await client.xlen(keys.stream("cluster")) == 4


async def test_a_runtime_schedule_key_with_control_characters_is_refused(
    client: aioredis.Redis, keys: Keys
) -> None:
    """Its ticks carry the key: every one would fail to decode and be dead-lettered."""
    with pytest.raises(ConfigError, match=r"key: .* holds control characters"):
        await Scheduler(client, keys).add("probe", event=DiscoveryTick, every=60, key=CLEAR)
    assert await client.exists(keys.ticker_defs(), keys.ticker_due()) == 0


# ---------------------------------------------------------------------- 13: notifications


async def test_a_hostile_cluster_event_gives_a_notification_that_fits_and_is_fanned_out(
    srv: Server, client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    """A NotReady with the longest reason and a spot interruption with the longest names
    ingest allows: the notifications decode (title <= 512, body <= 8192) and the fan-out
    handles them; before, every consumer of ``notify`` dead-lettered them. (A longer reason
    is a 422 at ingest now: tests/test_security_inputs.py.)"""
    token = await srv.token("agent-1", ["cluster.*"])
    long = "n" * 253
    hostile = [
        {
            "type": "cluster.node_not_ready",
            "cluster_id": "c1",
            "node_name": long,
            "reason": "r" * 4096,
        },
        cluster_event(instance_id=long, instance_type="t" * 253, availability_zone="z" * 253),
    ]
    status, body, _ = await srv.post("/v1/events", hostile, token=token)
    assert status == 202, body
    await run_all(consumer_of(cluster_events.CONCERN, client, keys, producer))
    rows: Any = await client.xrange(keys.stream("notify"))
    notes = [codec.decode(fields) for _, fields in rows]
    assert [type(n) for n in notes] == [Notification, Notification]
    assert all(len(n.title) <= 512 and len(n.body) <= 8192 for n in notes)
    assert (notes[1].title[-1], len(notes[1].title)) == ("…", 512)
    await run_all(consumer_of(notify.FANOUT, client, keys, producer))
    assert await client.xlen(keys.dlq("notify", "notify-fanout")) == 0
    assert await client.xlen(feed_key(keys, "c1")) == 2
    assert 0 < await client.ttl(feed_key(keys, "c1")) <= 7 * 24 * 3600  # the feed expires


def test_fit_cuts_every_limited_string_and_escapes_the_envelope() -> None:
    note = fit(
        Notification(
            key=f"c1{CLEAR}",
            source="x" * 300,
            cluster_id="c1",
            title="t" * 10_000,
            body="b" * 20_000,
            link="l" * 5_000,
        )
    )
    again = msgspec.json.decode(msgspec.json.encode(note), type=Notification)
    assert (len(again.title), len(again.body), len(again.link)) == (512, 8192, 2048)
    assert again.key == "c1\\x1b[2J\\x1b[H"
    assert len(again.source) == 256
    short = Notification(cluster_id="c1", title="fine")
    assert fit(short) is short  # nothing to change: the same object
    rec = RightSizingRecommendation(
        cluster_id="c1",
        namespace="n" * 253,
        workload="w" * 5_000,
        container="c" * 253,
        current_limit_bytes=1,
        recommended_limit_bytes=2,
    )
    message = message_of(rec, "http://127.0.0.1:8080")
    assert len(msgspec.json.decode(msgspec.json.encode(message), type=Message).title) == 512


# ---------------------------------------------------------------------- 16: who posts what

#: The types agents may post, decided per type (docs/ingest.md, "Who may post what"). A new
#: type is internal unless it is added here, to the docs and marked ``external``.
POSTABLE = [
    "cluster.node_not_ready",
    "cluster.oom_killed",
    "cluster.pod_pending",
    "cluster.spot_interruption",
    "worker.created",
    "worker.imported",
    "worker.terminated",
]


def test_the_postable_types_are_the_decided_list_and_the_docs_name_every_type() -> None:
    app = load_app("application:app", origin="test")
    names = sorted(app.registry.by_name)
    assert sorted(t.type_name() for t in postable_types(app.registry.by_name.values())) == POSTABLE
    doc = (ROOT / "docs" / "ingest.md").read_text()
    section = doc[doc.index("### Who may post what") :]
    missing = [
        n for n in names if f"`{n}`" not in section and f"`{n.split('.')[0]}.*`" not in section
    ]
    assert not missing, missing


async def test_a_wildcard_agent_cannot_post_the_applications_own_types(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    star = await srv.token("star", ["*"])
    now = datetime.now(UTC).isoformat()
    internal: list[dict[str, Any]] = [
        {"type": "tick.discovery", "schedule": "discovery", "scheduled_for": now},
        {"type": "tick.weekly_report", "schedule": "weekly-report", "scheduled_for": now},
        {"type": "tick", "schedule": "x", "scheduled_for": now},
        {"type": "notify.notification", "cluster_id": "c1", "title": "pay here"},
        {
            "type": "notify.rightsizing",
            "cluster_id": "c1",
            "namespace": "n",
            "workload": "w",
            "container": "c",
            "current_limit_bytes": 1,
            "recommended_limit_bytes": 2,
        },
        {"type": "render.requested", "kind": "render", "frames": 600},
        {"type": "report.ready", "job_id": "j", "location": "https://evil.example/"},
        {"type": "task.normal", "task_type": "optimizer.run"},
        {"type": "notify.delivery", "subscription_id": "s", "message": {}},
    ]
    for body in internal:
        for path in ("/v1/events", "/clusters/c1/events"):
            status, answer, _ = await srv.post(path, body, token=star)
            assert status in (403, 422), (body["type"], status, answer)
            assert answer["error"] in ("forbidden_type", "unknown_type"), answer
            assert answer["path"] == "$.type"
    for topic in ("ticks", "notify", "renders", "reports", "tasks.normal", "deliveries"):
        assert await client.xlen(keys.stream(topic)) == 0, topic
    status, answer, _ = await srv.post("/v1/events", cluster_event(), token=star)
    assert status == 202, answer
    ev = cluster_event()
    del ev["cluster_id"]
    status, answer, _ = await srv.post("/clusters/c1/events", [ev, ev], token=star)
    assert status == 202, answer
    assert await client.xlen(keys.stream("cluster")) == 3


def test_agents_add_star_covers_the_postable_types_only(run_cli: Callable[..., CliRun]) -> None:
    added = run_cli("agents", "add", "star", "--types", "*", "--clusters", "*")
    assert added.returncode == 0, added.stderr
    assert f"types: * = {', '.join(POSTABLE)};" in added.stderr
    for internal in ("tick.", "notify.", "render.", "task."):
        assert internal not in added.stderr
    refused = run_cli("agents", "add", "ticker", "--types", "tick.*", "cluster.*")
    assert refused.returncode != 0
    assert "--types tick.* match no type agents may post" in refused.stderr
    assert "cluster.spot_interruption" in refused.stderr  # the postable ones are listed
