"""The streamproc command: bad arguments and configuration fail clearly; `up` runs it all."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Codec, Keys, Producer
from streamproc.embedded import free_port
from tests.helpers import CliRun, cli_in_process, entries

ROOT = Path(__file__).resolve().parent.parent
SPOT = {
    "cluster_id": "c1",
    "instance_id": "i-1",
    "instance_type": "m5.large",
    "availability_zone": "eu-west-1a",
}


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def env(redis_url: str, keys: Keys) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}


@pytest.fixture
def bad_input_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliRun | subprocess.CompletedProcess[str]]:
    """``run(real, *args, env=...)`` for the bad-input cases: the first case of each list in a
    real ``python -m streamproc`` process (what an operator runs), the others by the same
    ``main`` in this process (``tests.helpers.cli_in_process``): the same parser, settings and
    exit codes, without an interpreter start (~1.3 s on 2 cores) per case."""

    def run(
        real: bool, *args: str, env: dict[str, str]
    ) -> CliRun | subprocess.CompletedProcess[str]:
        if real:
            return cli(*args, env=env)
        return cli_in_process(monkeypatch, capsys, env, *args)

    return run


async def test_publish_adds_a_validated_event(
    env: dict[str, str], client: aioredis.Redis, keys: Keys
) -> None:
    r = cli("publish", "cluster.spot_interruption", json.dumps(SPOT), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    [(entry_id, fields)] = await entries(client, keys.stream("cluster"))
    assert entry_id.decode() == out["entry_id"]
    assert fields[b"id"].decode() == out["id"]
    data = json.loads(fields[b"data"])
    assert data["source"] == "cli"
    # ordered and partitioned by its cluster (the key was empty before, from the CLI)
    assert data["key"] == SPOT["cluster_id"]


PUBLISH_REFUSED: list[tuple[list[str], str]] = [
    (["cluster.spot_interruption", "{oops"], r"malformed JSON"),
    (
        ["cluster.spot_interruption", json.dumps({**SPOT, "instance_id": 5})],
        r"Expected `str`, got `int` - at `\$\.instance_id`",
    ),
    (
        ["cluster.spot_interruption", json.dumps({"cluster_id": "c"})],
        r"missing required field `instance_id`",
    ),
    (
        ["cluster.spot_interruption", json.dumps({**SPOT, "instance_type": "x" * 100_000})],
        r"length <= 253 - at `\$\.instance_type`",
    ),
    (["cluster.spot_interruption", "[" * 100_000], r"invalid cluster\.spot_interruption"),
    (["cluster.nope", "{}"], r"unknown event type 'cluster\.nope'; known: .*cluster\.oom"),
    (
        ["cluster.spot_interruption", json.dumps({**SPOT, "occurred_at": "yesterday"})],
        r"occurred_at",
    ),
]


@pytest.mark.parametrize(("args", "message"), PUBLISH_REFUSED)
def test_publish_refuses_bad_input_with_the_reason(
    env: dict[str, str], args: list[str], message: str, bad_input_cli: Any
) -> None:
    real = (args, message) == PUBLISH_REFUSED[0]
    r = bad_input_cli(real, "publish", *args, env=env)
    assert r.returncode == 2
    assert re.search(message, r.stderr), r.stderr
    assert "Traceback" not in r.stderr


BAD_CONFIGURATION: list[tuple[dict[str, str], str]] = [
    ({"STREAMPROC_BATCH": "lots"}, "STREAMPROC_BATCH='lots': Expected `int`, got `str`"),
    ({"STREAMPROC_BATCH": "0"}, "STREAMPROC_BATCH='0': ConsumerSettings.batch must be > 0"),
    ({"STREAMPROC_NAME_TAKEN": "x"}, "NAME_TAKEN='x': expected one of 'refuse', 'suffix'"),
    ({"STREAMPROC_MIN_IDLE_MS": "-5"}, "MIN_IDLE_MS='-5': ConsumerSettings.min_idle_ms must"),
    ({"STREAMPROC_PREFIX": "a b"}, "STREAMPROC_PREFIX='a b'"),
    ({"STREAMPROC_LOG_LEVEL": "loud"}, "STREAMPROC_LOG_LEVEL='loud': expected one of"),
    ({"STREAMPROC_CONSUMER": "x" * 500}, "STREAMPROC_CONSUMER="),
]


@pytest.mark.parametrize(("extra", "message"), BAD_CONFIGURATION)
def test_bad_configuration_fails_at_start_naming_the_variable(
    env: dict[str, str], extra: dict[str, str], message: str, bad_input_cli: Any
) -> None:
    real = (extra, message) == BAD_CONFIGURATION[0]
    r = bad_input_cli(real, "consume", "--all", env={**env, **extra})
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


BAD_ARGUMENTS: list[tuple[list[str], str]] = [
    (["consume", "no-such-group"], "unknown group(s) no-such-group; known: cluster-events"),
    (["consume"], "(none given)"),
    (["dlq", "list", "cluster-events", "--reason", "nope"], "unknown reason(s) nope"),
    (["dlq", "list", "nope"], "unknown group 'nope'"),
    (["dlq", "show", "cluster-events"], "needs --id"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS)
def test_bad_arguments_fail_with_exit_2(
    env: dict[str, str], args: list[str], message: str, bad_input_cli: Any
) -> None:
    real = (args, message) == BAD_ARGUMENTS[0]
    r = bad_input_cli(real, *args, env=env)
    assert r.returncode == 2
    assert message in r.stderr


def _with_path(url: str, path: str) -> str:
    """The test Redis' URL with another database path (its host, port and password kept)."""
    return re.sub(r"(//[^/]*)(/.*)?$", lambda m: m.group(1) + path, url, count=1)


BAD_REDIS_URL: list[tuple[str, str]] = [
    ("/notanumber", "the database index must be a number, got 'notanumber'"),
    ("/99999", "database 99999 does not exist on this server"),
    ("/0?db=x", "the database index must be a number, got 'x'"),
    ("http://127.0.0.1:1", "must start with redis://"),
    ("redis://127.0.0.1:notaport/0", "bad port"),
    ("redis://127.0.0.1:99999/0", "bad port"),
    ("redis+cluster://127.0.0.1:1/2", "a Redis Cluster has database 0 only"),
]


@pytest.mark.parametrize("command", [["schedules", "list"], ["consume", "--all"]])
@pytest.mark.parametrize(("url", "message"), BAD_REDIS_URL)
def test_bad_redis_url_is_one_line_and_exit_3(
    env: dict[str, str],
    url: str,
    message: str,
    command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A REDIS_URL that names no usable Redis (redis-py would read ``/notanumber`` as database
    0, and fails on the rest with a traceback) is one line naming it and exit 3, for a one-shot
    command and a role alike."""
    bad = _with_path(env["REDIS_URL"], url) if url.startswith("/") else url
    r = cli_in_process(monkeypatch, capsys, {**env, "REDIS_URL": bad}, *command)
    assert r.returncode == 3, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith("streamproc: error: REDIS_URL: "), line
    assert message in line


def test_bad_redis_url_hides_its_password(env: dict[str, str], bad_input_cli: Any) -> None:
    r = bad_input_cli(True, "check", env={**env, "REDIS_URL": "redis://u:s3cret@h:1/x"})
    assert r.returncode == 3
    assert "u:***@h" in r.stderr
    assert "s3cret" not in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_redis_is_exit_3(env: dict[str, str]) -> None:
    r = cli(
        "dlq",
        "list",
        "cluster-events",
        env={**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
    )
    assert r.returncode == 3
    assert "cannot reach Redis" in r.stderr


async def test_entries_read_as_text_in_redis_cli(
    redis_url: str, producer: Producer, keys: Keys
) -> None:
    """An operator with redis-cli alone sees the type, id, time, key and JSON body."""
    event = SpotInterruption(**SPOT, key="c1")  # type: ignore[arg-type]
    await producer.publish(event)
    proc = await asyncio.create_subprocess_exec(
        "redis-cli",
        "-u",
        redis_url,
        "XRANGE",
        keys.stream("cluster"),
        "-",
        "+",
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    lines = stdout.decode().splitlines()
    pairs = dict(zip(lines[1::2], lines[2::2], strict=False))
    assert pairs["type"] == "cluster.spot_interruption"
    assert pairs["id"] == event.id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", pairs["ts"])
    assert pairs["key"] == "c1"
    assert pairs["v"] == "1"
    assert json.loads(pairs["data"])["instance_type"] == "m5.large"


async def test_dlq_cli_lists_and_replays(
    env: dict[str, str], client: aioredis.Redis, keys: Keys, codec: Codec[Any]
) -> None:
    fields: Any = {"type": "cluster.unknown_yet", "id": "e-1", "data": "{}"}
    await client.xadd(
        keys.dlq("cluster", "cluster-events"), {**fields, "dlq_reason": "unknown_type"}
    )
    listed = cli("dlq", "list", "cluster-events", env=env)
    assert listed.returncode == 0
    assert "cluster.unknown_yet" in listed.stdout
    assert "unknown_type" in listed.stdout
    shown = cli("dlq", "list", "cluster-events", "--json", env=env)
    assert json.loads(shown.stdout.splitlines()[0])["fields"]["id"] == "e-1"
    # it did not decode (unknown_type): a replay warns and waits for --yes
    held = cli("dlq", "replay", "cluster-events", "--id", "e-1", env=env)
    assert "fail the same way again" in held.stderr
    assert "add --yes" in held.stdout
    replayed = cli("dlq", "replay", "cluster-events", "--id", "e-1", "--yes", env=env)
    assert "replayed 1" in replayed.stdout
    [(_, back)] = await entries(client, keys.retry_stream("cluster", "cluster-events"))
    assert back == {k.encode(): v.encode() for k, v in fields.items()}


@pytest.mark.slow
def test_up_runs_everything_on_an_embedded_redis(tmp_path: Path) -> None:
    """`streamproc up` without REDIS_URL: embedded Redis, every role; a published spot
    interruption flags its pool; SIGTERM stops it all, Redis included."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env |= {"STREAMPROC_LOG_JSON": "1", "STREAMPROC_INGEST_PORT": str(free_port())}
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamproc",
            "up",
            "--data-dir",
            str(tmp_path / "redis"),
            "--redis-port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    password_file = tmp_path / "redis" / "password"  # the embedded Redis requires it
    auth = {**os.environ, "REDISCLI_AUTH": ""}
    try:
        deadline = time.monotonic() + 60
        published = False
        got = ""
        while time.monotonic() < deadline:
            if not password_file.exists():
                time.sleep(0.1)
                continue
            password = password_file.read_text().strip()
            auth["REDISCLI_AUTH"] = password
            if not published:
                url = f"redis://default:{password}@127.0.0.1:{port}/0"
                r = cli(
                    "publish", "cluster.spot_interruption", json.dumps(SPOT), env={"REDIS_URL": url}
                )
                published = r.returncode == 0
            got = subprocess.run(
                # One cluster's interruption: the pool is risky for that cluster (its report).
                [
                    "redis-cli",
                    "-p",
                    str(port),
                    "ZRANGE",
                    "sp:state:risky-pool-reports:m5.large:eu-west-1a",
                    "0",
                    "-1",
                ],
                capture_output=True,
                text=True,
                check=False,
                env=auth,
            ).stdout.strip()
            if got:
                break
            time.sleep(0.3)
        assert got, "the spot interruption was not handled"
        assert (tmp_path / "redis" / "appendonlydir").exists()  # data and AOF in the folder
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert f"redis-cli -p {port}" in out
    assert shutil.which("redis-server")
    ping = subprocess.run(
        ["redis-cli", "-p", str(port), "PING"],
        capture_output=True,
        text=True,
        check=False,
        env=auth,
    )
    assert "PONG" not in ping.stdout  # the embedded Redis stopped with it


def test_a_one_shot_commands_warning_is_one_plain_line_unless_verbose(
    env: dict[str, str],
) -> None:
    """Waiting for Redis, `check` warns as one `streamproc: warning:` line, not a JSON log
    line, even with JSON logs forced on (roles keep them); `-v` gives the JSON logs back."""
    env = {**env, "STREAMPROC_LOG_JSON": "1", "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    r = cli("check", "--timeout-s", "0.2", env=env)
    assert r.returncode == 3
    lines = r.stderr.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{")], r.stderr
    assert lines[0].startswith("streamproc: warning: waiting for redis (url=redis://"), lines
    assert lines[-1].startswith("streamproc: error: cannot reach Redis"), lines
    loud = cli("-v", "check", "--timeout-s", "0.2", env=env)
    assert loud.returncode == 3
    logged = [json.loads(line) for line in loud.stderr.splitlines() if line.startswith("{")]
    assert "waiting_for_redis" in [rec["event"] for rec in logged]


def test_a_plain_log_line_is_one_line_with_an_exceptions_last_line() -> None:
    from streamproc.logs import render_plain

    line = render_plain(
        None,
        "warning",
        {
            "event": "topic_registry_failed",
            "level": "warning",
            "timestamp": "2026-12-01T20:00:00Z",
            "topic": "a\nb",
            "exception": "Traceback (most recent call last):\n  ...\nOSError: refused",
        },
    )
    assert line == (
        "streamproc: warning: topic registry failed (topic=a\\x0ab, error=OSError: refused)"
    )


def test_one_shot_commands_write_for_people(env: dict[str, str]) -> None:
    """`agents add` prints the token alone on stdout and a sentence on stderr: no JSON log
    lines, even with JSON logs on; `--verbose` shows them (the Redis server line)."""
    env = {**env, "STREAMPROC_LOG_JSON": "1"}
    r = cli("agents", "add", "people-agent", "--types", "cluster.*", "--clusters", "*", env=env)
    assert r.returncode == 0, r.stderr
    [token] = r.stdout.splitlines()
    assert len(token) >= 32
    assert r.stderr.startswith("agent 'people-agent' added"), r.stderr
    assert not [line for line in r.stderr.splitlines() if line.lstrip().startswith("{")]
    loud = cli("--verbose", "agents", "list", env=env)
    assert loud.returncode == 0, loud.stderr
    logged = [json.loads(line) for line in loud.stderr.splitlines() if line.startswith("{")]
    assert "redis_server" in [rec["event"] for rec in logged]


ISO_AND_RELATIVE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \((in \d+ (s|min|h|d)|now)\)"


def test_schedule_listings_show_times_as_iso_and_relative_and_intervals_in_units(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`schedules add|list` and `ticker --list`: next times as ``2026-12-01T20:00:00Z (in 45
    s)``, intervals as ``every 6 h`` (not ``every 21600s``)."""
    run = functools.partial(cli_in_process, monkeypatch, capsys, env)
    added = run("schedules", "add", "six-hourly", "--event", "tick.discovery", "--every", "6h")
    assert added.returncode == 0, added.stderr
    last = added.stdout.splitlines()[-1]  # (the session's own logs may come before)
    assert re.fullmatch(f"set six-hourly: next {ISO_AND_RELATIVE}", last), added.stdout
    listed = run("schedules", "list")
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("six-hourly")]
    assert re.search(rf"every 6 h \(offset [\d.]+ (s|min|h)\) .* next {ISO_AND_RELATIVE}$", row)
    ticker = run("ticker", "--list")
    assert ticker.returncode == 0, ticker.stderr
    [discovery] = [line for line in ticker.stdout.splitlines() if line.startswith("discovery ")]
    assert "every 5 min " in discovery
    assert re.search(f"next: {ISO_AND_RELATIVE}, ", discovery), discovery


@pytest.mark.parametrize("command", [["inspect"], ["tasks", "history"]])
def test_output_piped_into_a_reader_that_left_is_not_a_redis_error(
    env: dict[str, str], command: list[str]
) -> None:
    """`streamproc tasks history | head`: the reader closes the pipe before the command writes.
    That is no error: exit 0 and nothing on stderr (it said 'Redis connection lost', exit 3)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        p = subprocess.run(
            [sys.executable, "-m", "streamproc", *command],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
