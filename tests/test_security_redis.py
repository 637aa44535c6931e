"""Redis is never open (issue 17, items 1 and 5): the embedded Redis of ``streamproc up`` and
the compose stack's ACL users, each tried against a real ``redis-server`` on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import yaml  # type: ignore[import-untyped]  # no stubs; locked (schemathesis needs it)
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from schemas import REGISTRY, SpotInterruption
from streamproc import (
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Permanent,
    Producer,
    ProducerSettings,
    RedisSettings,
    RetryPolicy,
    check_server,
    cli,
    connect,
)
from streamproc.embedded import EmbeddedRedis, free_port
from streamproc.errors import ConfigError
from streamproc.ingest import AgentStore
from streamproc.schedule import Schedule, Tick, every
from streamproc.ticker import Ticker, TickerSettings
from tests.helpers import spot
from tests.test_ingest_support import cluster_event, running_ingest

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SERVICE_ROLES = ("ingest", "consumer", "ticker")


def _load_secrets_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("redis_secrets", DOCKER / "redis_secrets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


secrets_script = _load_secrets_script()
ROLES: tuple[str, ...] = secrets_script.ROLES


def _raw(port: int, command: bytes) -> bytes:
    """One command on a fresh, unauthenticated connection; the first line of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.recv(256).split(b"\r\n")[0]


# ---------------------------------------------------------------------- streamproc up


def test_up_hands_its_roles_a_password_and_redis_refuses_everyone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`streamproc up` without REDIS_URL: the embedded Redis answers NOAUTH to a client without
    the password and serves the children's REDIS_URL; the printed redis-cli hint works; data
    dir 0700 (tightened if it existed), files 0600; maxmemory 1gb with noeviction."""
    data = tmp_path / "redis"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    monkeypatch.delenv("REDIS_URL", raising=False)
    seen: dict[str, Any] = {}

    def supervise(argvs: Sequence[Sequence[str]], env: dict[str, str]) -> int:
        url = env["REDIS_URL"]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        seen["url"], seen["port"] = url, port
        seen["noauth"] = _raw(port, b"PING\r\n")
        seen["wrong"] = _raw(port, b"AUTH default not-the-password\r\nPING\r\n")
        with redis.Redis.from_url(url) as child:
            seen["ping"] = child.ping()
            child.set("sp:probe", "x")
            seen["config"] = child.config_get("maxmemory*")
        seen["modes"] = {p: stat.S_IMODE(p.stat().st_mode) for p in [data, *data.rglob("*")]}
        seen["password"] = (data / "password").read_text().strip()
        printed = capsys.readouterr().out
        seen["printed"] = printed
        hint = re.search(r"inspect it with:\s+(.+?)\s{3}e\.g\.", printed)
        assert hint is not None, printed
        seen["hint"] = subprocess.run(
            ["bash", "-c", f"{hint.group(1)} PING"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return 0

    monkeypatch.setattr(cli, "supervise", supervise)
    # main() configures logging for the process; the later tests log to pytest's streams.
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **kw: None)
    assert cli.main(["up", "--data-dir", str(data)]) == 0

    assert seen["noauth"].startswith(b"-NOAUTH")
    assert seen["wrong"].startswith(b"-WRONGPASS")
    assert seen["ping"] is True
    assert seen["url"].startswith("redis://default:")
    assert seen["password"] in seen["url"]
    assert len(seen["password"]) >= 32
    assert seen["password"] not in seen["printed"]  # never printed, only its file named
    assert seen["hint"] == "PONG"
    assert seen["config"]["maxmemory-policy"] == "noeviction"
    assert int(seen["config"]["maxmemory"]) == 1024**3
    modes = seen["modes"]
    assert modes.pop(data) == 0o700
    assert any(p.name.endswith(".aof") for p in modes)  # the AOF is among the files checked
    for path, mode in modes.items():
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert _refused_connection(seen["port"])  # stopped with `up`


def _refused_connection(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_embedded_redis_refuses_a_bad_maxmemory_or_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="maxmemory"):
        EmbeddedRedis(tmp_path, maxmemory="lots")
    with pytest.raises(ConfigError, match="password"):
        EmbeddedRedis(tmp_path, password='two words and a quote"')
    with pytest.raises(ConfigError, match="password"):
        EmbeddedRedis(tmp_path, password="short")


# ---------------------------------------------------------------------- compose: static


def _compose(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DOCKER / name).read_text())
    return doc


def test_compose_files_hold_no_password_and_redis_requires_users() -> None:
    """No password or credentialed URL in the committed compose files; Redis loads the
    aclfile, protected mode on, maxmemory with noeviction, not published on the host, bound
    to 127.0.0.1 under host networking; every streamproc service logs in as its role."""
    for name in ("docker-compose.yml", "docker-compose.hostnet.yml"):
        text = (DOCKER / name).read_text()
        assert not re.search(r"redis://[^\s\"']*@", text), name
        assert "requirepass" not in text, name
        assert "REDISCLI_AUTH=" not in text, name
        assert "REDIS_URL:" not in text, name  # it comes from the role's env file only
    main, hostnet = _compose("docker-compose.yml"), _compose("docker-compose.hostnet.yml")
    for doc, bind in ((main, None), (hostnet, "127.0.0.1")):
        args = doc["services"]["redis"]["command"]
        pairs = dict(zip(args[1::2], args[2::2], strict=False))
        assert pairs["--aclfile"] == "/etc/redis/users.acl"
        assert pairs["--protected-mode"] == "yes"
        assert pairs["--maxmemory-policy"] == "noeviction"
        assert pairs["--maxmemory"]
        assert pairs.get("--bind") == bind
    assert "ports" not in main["services"]["redis"]
    assert "PONG" in " ".join(main["services"]["redis"]["healthcheck"]["test"])
    expected = {
        "ingest": "ingest",
        "cluster-events": "consumer",
        "tasks": "consumer",
        "tasks-crawl": "consumer",
        "renders": "consumer",
        "ticker-a": "ticker",
        "ticker-b": "ticker",
        "operator": "operator",
    }
    for service, role in expected.items():
        [env_file] = main["services"][service]["env_file"]
        assert env_file.endswith(f"/{role}.env"), service


def test_generated_secrets_are_private_kept_and_never_committed(tmp_path: Path) -> None:
    """The folder 0700, env files 0600, the aclfile (mounted into the container) only hashes;
    existing secrets are kept unless --force; git ignores docker/secrets/."""
    out = tmp_path / "secrets"
    assert secrets_script.write_secrets(out, prefix="sp")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    passwords = []
    for role in (*ROLES, "redis"):
        env = out / f"{role}.env"
        assert stat.S_IMODE(env.stat().st_mode) == 0o600
        value = env.read_text().strip().split("=", 1)[1]
        passwords.append(value.split(":")[2].split("@")[0] if role != "redis" else value)
    acl = (out / "users.acl").read_text()
    assert stat.S_IMODE((out / "users.acl").stat().st_mode) == 0o644
    assert all(len(p) >= 32 and p not in acl for p in passwords)
    assert " >" not in acl  # a plaintext password rule
    assert "nopass" not in acl
    before = (out / "ingest.env").read_text()
    assert not secrets_script.write_secrets(out, prefix="sp")
    assert (out / "ingest.env").read_text() == before
    assert secrets_script.write_secrets(out, prefix="sp", force=True)
    assert (out / "ingest.env").read_text() != before
    paths = ["docker/secrets/ingest.env", "docker/secrets/users.acl"]
    ignored = subprocess.run(
        ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert ignored.stdout.split() == paths


@pytest.mark.parametrize("name", ["sp:agents", "sp:agentsX", "sp:agent", "sp:x", "sp:{a}:s"])
def test_key_patterns_cover_every_key_but_the_agents_hash(name: str) -> None:
    import fnmatch

    patterns = secrets_script.all_keys_but("sp", "agents")
    matched = any(fnmatch.fnmatchcase(name, p.replace("[^", "[!")) for p in patterns)
    assert matched == (name != "sp:agents")


# ---------------------------------------------------------------------- compose: live ACL


class AclRedis:
    def __init__(self, port: int, prefix: str, urls: dict[str, str], health: str) -> None:
        self.port, self.prefix, self.urls, self.health = port, prefix, urls, health
        self.keys = Keys(prefix)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    """redis-server (Debian's 7.0 here) started with the aclfile generated for compose."""
    if not (server := _which("redis-server")):
        pytest.skip("redis-server is not installed")
    work = tmp_path_factory.mktemp("acl")
    port, prefix = free_port(), f"t{uuid.uuid4().hex[:10]}"
    secrets_script.write_secrets(work / "secrets", host="127.0.0.1", port=port, prefix=prefix)
    urls = {
        role: (work / "secrets" / f"{role}.env").read_text().strip().split("=", 1)[1]
        for role in ROLES
    }
    health = (work / "secrets" / "redis.env").read_text().strip().split("=", 1)[1]
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes"]
    argv += ["--aclfile", str(work / "secrets" / "users.acl"), "--save", "", "--dir", str(work)]
    argv += ["--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "noeviction"]
    argv += ["--logfile", str(work / "redis.log")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        _wait_for(port, proc, work / "redis.log")
        yield AclRedis(port, prefix, urls, health)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def _wait_for(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(500):
        if proc.poll() is not None:
            out = log.read_text(errors="replace") if log.exists() else ""
            raise AssertionError(f"redis-server refused the aclfile: {out[-2000:]}")
        try:
            if _raw(port, b"PING\r\n"):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("redis-server did not answer")


@pytest.fixture
async def clients(acl_redis: AclRedis) -> AsyncIterator[dict[str, aioredis.Redis]]:
    """A client per role; the operator deletes what the test wrote afterwards."""
    made = {
        role: connect(RedisSettings(url=url, key_prefix=acl_redis.prefix))
        for role, url in acl_redis.urls.items()
    }
    yield made
    op = made["operator"]
    found = [k async for k in op.scan_iter(match=f"{acl_redis.prefix}:*", count=1000)]
    if found:
        await op.delete(*found)
    for c in made.values():
        await c.aclose()


async def test_without_a_user_redis_answers_noauth_and_health_may_only_ping(
    acl_redis: AclRedis,
) -> None:
    assert _raw(acl_redis.port, b"PING\r\n").startswith(b"-NOAUTH")
    assert _raw(acl_redis.port, b"GET x\r\n").startswith(b"-NOAUTH")
    with pytest.raises(AuthenticationError):
        await aioredis.Redis(port=acl_redis.port, password="").ping()
    health = aioredis.Redis(port=acl_redis.port, username="health", password=acl_redis.health)
    try:
        assert await health.ping()
        with pytest.raises(NoPermissionError):
            await health.get(f"{acl_redis.prefix}:x")
    finally:
        await health.aclose()


#: What no role may do: wipe, reconfigure, list every key, change users, ad-hoc scripts,
#: persistence and replication, or any key outside the prefix.
FORBIDDEN: tuple[tuple[str, ...], ...] = (
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
    ("CONFIG", "GET", "requirepass"),
    ("KEYS", "*"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "evil", "on", ">x", "+@all", "~*"),
    ("EVAL", "return 1", "0"),
    ("SCRIPT", "FLUSH"),
    ("SAVE",),
    ("SWAPDB", "0", "1"),
    ("BGSAVE",),
    ("REPLICAOF", "NO", "ONE"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("MODULE", "LIST"),
    ("SET", "not-streamproc:key", "1"),
)


@pytest.mark.parametrize("role", ROLES)
async def test_no_role_may_flush_reconfigure_list_keys_or_leave_its_prefix(
    clients: dict[str, aioredis.Redis], role: str
) -> None:
    refused, client = [], clients[role]
    for command in FORBIDDEN:
        try:
            await client.execute_command(*command)  # type: ignore[no-untyped-call]  # redis-py
        except NoPermissionError:
            refused.append(command)
    assert refused == list(FORBIDDEN)


@pytest.mark.parametrize("role", SERVICE_ROLES)
async def test_only_the_operator_may_write_the_agents_hash(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis], role: str
) -> None:
    """HSET <p>:agents is refused to ingest, consumers and tickers, directly and through the
    agents' own Lua script; the operator CLI's user adds agents; only ingest looks tokens up
    (consumers may read an agent's record by name, not through the lookup script)."""
    keys = acl_redis.keys
    _, token = await AgentStore(clients["operator"], keys).add("op-made", types=["cluster.*"])
    with pytest.raises(NoPermissionError):
        await clients[role].hset(keys.agents(), "evil", '{"operator": true}')
    with pytest.raises(ResponseError):  # NOPERM, or the script's refused HSET
        await AgentStore(clients[role], keys).add("evil", types=["*"], operator=True)
    names = {a.name for a in await AgentStore(clients["operator"], keys).list()}
    assert names == {"op-made"}
    store = AgentStore(clients[role], keys, cache_s=0)
    if role == "ingest":
        agent = await store.authenticate(token)
        assert agent is not None
        assert agent.name == "op-made"
    else:
        with pytest.raises(NoPermissionError):
            await store.authenticate(token)


FAST_RETRY = RetryPolicy(max_retries=3, base_s=0.01, cap_s=0.02)


async def test_ingest_publishes_and_a_consumer_retries_acks_and_dead_letters_as_their_users(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis]
) -> None:
    """A real POST /v1/events through ingest's user; the consumer's user handles the events:
    one retried then acked, one dead-lettered; check_server (INFO) passes for both."""
    keys, codec = acl_redis.keys, Codec(REGISTRY)
    for role in ("ingest", "consumer"):
        info = await check_server(clients[role])
        assert info.maxmemory_policy == "noeviction"
    _, token = await AgentStore(clients["operator"], keys).add(
        "a1", types=["cluster.*"], clusters=["*"]
    )
    ingest_producer = Producer(clients["ingest"], codec, keys, ProducerSettings())
    async with running_ingest(clients["ingest"], keys, ingest_producer, rate_burst=1000) as srv:
        for body in (cluster_event(instance_id="i-flaky"), cluster_event(instance_id="i-bad")):
            status, reply, _ = await srv.post("/v1/events", body, token=token)
            assert status == 202, reply
        status, reply, _ = await srv.post(
            "/v1/events", cluster_event(), token=token, headers={"Idempotency-Key": "k-1"}
        )
        assert status == 202, reply
    # records by id as ingest's user: after a call's first XADD the script claims each next
    # record with HSETNX before its XADD (issue 20), a command the user must have
    got = await ingest_producer.append([spot(2, id="x-1"), spot(3, id="x-2"), spot(2, id="x-1")])
    assert [p.duplicate for p in got] == [False, False, True]

    attempts: dict[str, int] = {}

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        attempts[event.instance_id] = attempts.get(event.instance_id, 0) + 1
        if event.instance_id == "i-bad":
            raise Permanent("refused")
        if event.instance_id == "i-flaky" and ctx.attempt == 0:
            raise ConnectionResetError("upstream hiccup")

    consumer_client = clients["consumer"]
    consumer = Consumer(
        Concern(
            group="g", topics=("cluster",), handlers={SpotInterruption: handle}, retry=FAST_RETRY
        ),
        client=consumer_client,
        codec=codec,
        keys=keys,
        producer=Producer(consumer_client, codec, keys, ProducerSettings()),
        settings=ConsumerSettings(consumer="c1"),
    )
    await consumer.ensure_groups()
    await Producer(consumer_client, codec, keys, ProducerSettings()).publish(spot(1))
    for _ in range(200):
        idle = await consumer.process_once(block_ms=20) == 0
        if idle and attempts.get("i-flaky") == 2:
            break
    assert attempts == {"i-flaky": 2, "i-bad": 1, "i-0abc": 1, "i-1": 1, "i-2": 1, "i-3": 1}
    assert consumer.stats.acked >= 3
    op = clients["operator"]
    assert await op.xlen(keys.dlq("cluster", "g")) == 1
    summary: Any = await op.xpending(keys.stream("cluster"), "g")
    assert summary["pending"] == 0


async def test_the_ticker_leads_fires_and_lets_go_as_its_user(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis]
) -> None:
    keys, codec, client = acl_redis.keys, Codec(REGISTRY), clients["ticker"]
    ticker = Ticker(
        (Schedule(name="fast", trigger=every(1), event=Tick),),
        client=client,
        producer=Producer(client, codec, keys, ProducerSettings()),
        keys=keys,
        settings=TickerSettings(node="a", lease_ttl_ms=1000),
    )
    now = datetime.now(UTC).replace(microsecond=0)
    last_ms = int((now - timedelta(seconds=5)).timestamp() * 1000)
    await client.hset(keys.ticker_last(), "fast", last_ms)  # fired 5 s ago: one is due now
    assert await ticker.lease.acquire()
    assert await ticker.lease.renew()
    await ticker.load_state()
    await ticker.fire_due(now)
    await ticker.fire_runtime(now)
    await ticker.lease.release()
    assert await clients["operator"].xlen(keys.stream("ticks")) >= 1


def _streamproc(url: str, prefix: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": url, "STREAMPROC_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_operator_cli_runs_as_its_user_and_ingest_cannot_add_agents(
    acl_redis: AclRedis,
) -> None:
    added = _streamproc(
        acl_redis.urls["operator"],
        acl_redis.prefix,
        "agents",
        "add",
        "cli-a1",
        "--types",
        "cluster.*",
        "--clusters",
        "*",
    )
    assert added.returncode == 0, added.stderr
    listed = _streamproc(acl_redis.urls["operator"], acl_redis.prefix, "agents", "list")
    assert "cli-a1" in listed.stdout, listed.stderr
    inspected = _streamproc(acl_redis.urls["operator"], acl_redis.prefix, "inspect", "--json")
    assert inspected.returncode in (0, 1), inspected.stderr  # 1 = an SLO breach, not NOPERM
    assert "permission" not in inspected.stderr.lower()
    refused = _streamproc(
        acl_redis.urls["ingest"],
        acl_redis.prefix,
        "agents",
        "add",
        "cli-a2",
        "--types",
        "*",
        "--clusters",
        "*",
    )
    assert refused.returncode != 0
    assert (
        "cli-a2"
        not in _streamproc(acl_redis.urls["operator"], acl_redis.prefix, "agents", "list").stdout
    )
    revoked = _streamproc(
        acl_redis.urls["operator"], acl_redis.prefix, "agents", "revoke", "cli-a1"
    )
    assert revoked.returncode == 0, revoked.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_roles_run_as_processes_on_their_users_as_under_compose(
    acl_redis: AclRedis, tmp_path: Path
) -> None:
    """`streamproc ingest`, `consume cluster-events` and `ticker` as their compose users, a
    token from the operator CLI: a POSTed spot interruption flags its pool, the ticker leads,
    everything stops cleanly and no process was refused a command (NOPERM)."""
    prefix, urls = acl_redis.prefix, acl_redis.urls
    added = _streamproc(
        urls["operator"],
        prefix,
        "agents",
        "add",
        "proc-a1",
        "--types",
        "cluster.*",
        "--clusters",
        "c1",
    )
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    port = free_port()
    roles = {
        "ingest": ["ingest", "--port", str(port)],
        "consumer": ["consume", "cluster-events"],
        "ticker": ["ticker"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {role: tmp_path / f"{role}.log" for role in roles}
    env = {**os.environ, "STREAMPROC_PREFIX": prefix, "STREAMPROC_LOG_JSON": "1"}
    try:
        for role, argv in roles.items():
            with logs[role].open("wb") as out:
                procs[role] = subprocess.Popen(
                    [sys.executable, "-m", "streamproc", *argv],
                    cwd=ROOT,
                    env={**env, "REDIS_URL": urls[role]},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        flagged = leader = None
        body = json.dumps({"type": "cluster.spot_interruption", **SPOT}).encode()
        with redis.Redis.from_url(urls["operator"]) as op:
            for _ in range(300):
                if all(p.poll() is None for p in procs.values()):
                    _post(port, body, token)
                # One cluster's report: risky for that cluster (schemas.risky_pools); the
                # consumer read the agent's record (HGET <p>:agents) to act on it.
                flagged = op.zcard(f"{prefix}:state:risky-pool-reports:m5.large:eu-west-1a")
                leader = op.get(f"{prefix}:ticker:{{ticker}}:lease")
                if flagged and leader:
                    break
                time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {role: p.wait(timeout=60) for role, p in procs.items()}
        with redis.Redis.from_url(urls["operator"]) as op:  # leave nothing to later tests
            found = list(op.scan_iter(match=f"{prefix}:*", count=1000))
            if found:
                op.delete(*found)
    output = {role: log.read_text(errors="replace") for role, log in logs.items()}
    for role, text in output.items():
        assert "NOPERM" not in text, (role, text[-3000:])
        assert "no permissions" not in text, (role, text[-3000:])
    assert codes == dict.fromkeys(roles, 0), output
    assert flagged, output["consumer"][-3000:]
    assert leader, output["ticker"][-3000:]


SPOT = {
    "cluster_id": "c1",
    "instance_id": "i-proc",
    "instance_type": "m5.large",
    "availability_zone": "eu-west-1a",
}


def _post(port: int, body: bytes, token: str) -> None:
    """POST one event to ingest; connection errors (not up yet) are ignored."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            r.read()
    except (OSError, urllib.error.HTTPError):
        pass


@pytest.mark.parametrize("role", ["ingest", "ticker"])
async def test_ingest_and_the_ticker_may_not_consume_or_ack(
    acl_redis: AclRedis, clients: dict[str, aioredis.Redis], role: str
) -> None:
    """Reading a group, acking and claiming are the consumers' (and the operator's)."""
    stream = acl_redis.keys.stream(f"ro-{role}")  # its own: earlier tests leave entries
    op = clients["operator"]
    await op.xgroup_create(stream, "g-ro", id="$", mkstream=True)
    entry_id = await op.xadd(stream, {"type": "x"})
    client = clients[role]
    with pytest.raises(NoPermissionError):
        await client.xreadgroup("g-ro", "c1", {stream: ">"}, count=1)
    with pytest.raises(NoPermissionError):
        await client.xack(stream, "g-ro", entry_id)
    with pytest.raises(NoPermissionError):
        await client.xclaim(stream, "g-ro", "c1", 0, [entry_id])
    read: Any = await clients["consumer"].xreadgroup("g-ro", "c1", {stream: ">"}, count=1)
    assert read[0][1][0][0] == entry_id
    assert await clients["consumer"].xack(stream, "g-ro", entry_id) == 1


def test_the_printed_rules_make_the_same_users_on_another_redis(tmp_path: Path) -> None:
    """`redis_secrets.py --rules | redis-cli`: the users for a Redis compose does not start."""
    rules = subprocess.run(
        [sys.executable, str(DOCKER / "redis_secrets.py"), "--prefix", "sp", "--rules"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with EmbeddedRedis(tmp_path / "r", appendonly=False) as server:
        loaded = subprocess.run(
            ["redis-cli", "-p", str(server.port)],
            input=rules,
            capture_output=True,
            text=True,
            check=False,
        )
        assert loaded.stdout.split() == ["OK"] * len(ROLES), loaded.stdout + loaded.stderr
        url = f"redis://ingest:CHANGE-ME-ingest@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(url) as ingest:
            assert ingest.hget("sp:agents", "a") is None
            with pytest.raises(NoPermissionError):
                ingest.hset("sp:agents", "a", "b")
            with pytest.raises(NoPermissionError):
                ingest.flushall()
