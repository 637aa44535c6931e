"""``streamproc dlq``: dead letters an operator can judge before replaying or purging them.

In-process (``tests.helpers.cli_in_process``); test_cli.py keeps a real-process run."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamproc import Keys
from tests.helpers import CliRun, cli_in_process, entries

GROUP = "cluster-events"
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


@pytest.fixture
def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str, keys: Keys
) -> Any:
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}

    async def go(*args: str) -> CliRun:  # its own event loop: in a thread
        r = await asyncio.to_thread(cli_in_process, monkeypatch, capsys, env, "dlq", *args)
        # the session's structlog (not configured by main here) writes to stdout: left out
        out = "".join(line for line in r.stdout.splitlines(True) if not _LOG_LINE.match(line))
        return CliRun(r.returncode, out, r.stderr)

    return go


async def letter(
    client: aioredis.Redis,
    keys: Keys,
    event_id: str,
    *,
    reason: str = "permanent",
    kind: str = "cluster.spot_interruption",
    ago_s: int = 0,
    data: str = '{"instance_id":"i-1","pool":{"az":"eu-west-1a"}}',
    error: str = "boom",
    error_type: str = "ValueError",
) -> str:
    """A dead letter as a consumer writes it, dead-lettered ``ago_s`` ago (Redis' clock)."""
    seconds, micros = await client.time()
    ms = seconds * 1000 + micros // 1000 - ago_s * 1000
    fields: Any = {
        "dlq_reason": reason,
        "dlq_error_type": error_type,
        "dlq_error": error,
        "dlq_attempts": "4",
        "dlq_deliveries": "5",
        "dlq_consumer": "host-a-17",
        "dlq_entry_id": f"{ms}-0",
        "type": kind,
        "id": event_id,
        "data": data,
    }
    dlq_id: bytes = await client.xadd(keys.dlq("cluster", GROUP), fields, id=f"{ms}-*")  # type: ignore[assignment]
    return dlq_id.decode()


async def test_list_shows_age_consumer_deliveries_and_n_of_m(
    run: Any, client: aioredis.Redis, keys: Keys
) -> None:
    await letter(client, keys, "e-2", reason="poison", ago_s=2 * 3600)
    await letter(client, keys, "e-1", ago_s=3 * 60 + 5, error="first line\ntraceback line")
    await letter(client, keys, "e-3", reason="bad_json", ago_s=0, data="{nope")
    # (a stream's ids grow: the letters are added oldest first)
    r = await run("list", GROUP, "--count", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "2 h ago" in lines[1]
    assert "poison" in lines[1]
    assert "3 min ago" in lines[2]
    assert "host-a-17" in lines[2]
    assert "permanent" in lines[2]
    assert "ValueError: first line" in lines[2]
    assert "traceback" not in r.stdout
    assert " 5 " in lines[2]  # deliveries
    assert lines[-1].startswith("shown 2 of 3 dead letter(s)")
    assert "0 replayed so far" in lines[-1]
    r = await run("list", GROUP, "--reason", "poison")
    assert "permanent" not in r.stdout
    assert r.stdout.splitlines()[-1].startswith(
        "shown 1 of 1 matching reason=poison (3 in the group)"
    )
    r = await run("list", GROUP, "--type", "cluster.other")
    assert "shown 0 of 0 matching type=cluster.other" in r.stdout


async def test_list_refuses_an_unknown_reason_naming_the_known(run: Any) -> None:
    r = await run("list", GROUP, "--reason", "nope")
    assert r.returncode == 2
    assert "unknown reason(s) nope; known: permanent, retries_exhausted" in r.stderr


async def test_show_pretty_prints_the_payload_and_the_full_error(
    run: Any, client: aioredis.Redis, keys: Keys
) -> None:
    await letter(client, keys, "e-1", error="first line\n  second line\x1b[2J")
    r = await run("show", GROUP, "--id", "e-1")
    assert r.returncode == 0, r.stderr
    assert '    "pool": {\n      "az": "eu-west-1a"\n    }' in r.stdout
    assert "first line\n    second line\\x1b[2J" in r.stdout  # full, escaped
    assert "host-a-17" in r.stdout


async def test_show_of_an_unknown_id_says_not_found(run: Any) -> None:
    r = await run("show", GROUP, "--id", "nope")
    assert (r.returncode, r.stderr.strip(), r.stdout) == (1, "not found: nope", "")


async def test_replay_of_everything_needs_yes_and_is_counted(
    run: Any, client: aioredis.Redis, keys: Keys
) -> None:
    await letter(client, keys, "e-1")
    await letter(client, keys, "e-2")
    await letter(client, keys, "e-3", reason="poison", kind="cluster.other")
    dry = await run("replay", GROUP)
    assert dry.returncode == 0
    assert "would replay 3 dead letter(s) of cluster-events" in dry.stdout
    assert "2  cluster.spot_interruption (permanent)" in dry.stdout
    assert "1  cluster.other (poison)" in dry.stdout
    assert "add --yes" in dry.stdout
    assert await client.xlen(keys.dlq("cluster", GROUP)) == 3
    assert await client.exists(keys.retry_stream("cluster", GROUP)) == 0
    done = await run("replay", GROUP, "--reason", "permanent", "--yes")
    assert "replayed 2 dead letter(s)" in done.stdout
    assert len(await entries(client, keys.retry_stream("cluster", GROUP))) == 2
    assert "shown 1 of 1 dead letter(s) · 2 replayed so far" in (await run("list", GROUP)).stdout


async def test_replay_by_id_says_what_it_replayed(
    run: Any, client: aioredis.Redis, keys: Keys
) -> None:
    await letter(client, keys, "e-1")
    r = await run("replay", GROUP, "--id", "e-1", "--id", "e-9")
    assert r.returncode == 0
    assert "replayed 1 dead letter(s) of cluster-events to the group's retry stream" in r.stdout
    assert "1  cluster.spot_interruption (permanent)" in r.stdout
    assert "not found: e-9" in r.stderr


async def test_replaying_a_decode_failure_warns_and_needs_yes(
    run: Any, client: aioredis.Redis, keys: Keys
) -> None:
    await letter(client, keys, "e-1", reason="unknown_type", error_type="DecodeError")
    r = await run("replay", GROUP, "--id", "e-1")
    assert r.returncode == 0
    assert "did not decode (unknown_type)" in r.stderr
    assert "fail the same way again unless the code changed" in r.stderr
    assert "nothing done: add --yes" in r.stdout
    assert await client.xlen(keys.dlq("cluster", GROUP)) == 1
    r = await run("replay", GROUP, "--id", "e-1", "--yes")
    assert "replayed 1" in r.stdout
    assert await client.xlen(keys.dlq("cluster", GROUP)) == 0


async def test_purge_of_a_selection_needs_yes(run: Any, client: aioredis.Redis, keys: Keys) -> None:
    await letter(client, keys, "e-1")
    await letter(client, keys, "e-2", reason="poison")
    dry = await run("purge", GROUP, "--reason", "poison")
    assert dry.returncode == 0
    assert "would purge 1 dead letter(s)" in dry.stdout
    assert "1  cluster.spot_interruption (poison)" in dry.stdout
    assert await client.xlen(keys.dlq("cluster", GROUP)) == 2
    done = await run("purge", GROUP, "--reason", "poison", "--yes")
    assert "purged 1 dead letter(s)" in done.stdout
    [(_, left)] = await entries(client, keys.dlq("cluster", GROUP))
    assert left[b"id"] == b"e-1"
    assert "purged 1" in (await run("purge", GROUP, "--yes")).stdout
    assert await client.xlen(keys.dlq("cluster", GROUP)) == 0


async def test_list_json_lines(run: Any, client: aioredis.Redis, keys: Keys) -> None:
    await letter(client, keys, "e-1")
    r = await run("list", GROUP, "--json")
    assert json.loads(r.stdout.splitlines()[0])["fields"]["id"] == "e-1"
