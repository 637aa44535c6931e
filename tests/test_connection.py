"""The start-up server check: version and stream features, against the real server too."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from streamproc import RedisSettings, ServerTooOld, UnsafeServerConfig, check_server, connect
from streamproc.config import load_config
from streamproc.connection import check_eviction, server_info
from streamproc.embedded import EmbeddedRedis
from streamproc.errors import ConfigError


async def test_the_test_server_passes_and_reports_its_version(client: aioredis.Redis) -> None:
    info = await check_server(client)
    assert info.version >= (7, 0, 0)
    assert info.version_text.count(".") == 2
    assert info.maxmemory_policy == "noeviction"


@pytest.mark.parametrize("version", ["6.2.14", "5.0.7", "garbage"])
def test_servers_older_than_7_0_are_refused_with_a_clear_message(version: str) -> None:
    with pytest.raises(ServerTooOld, match=r"needs Redis >= 7\.0"):
        server_info({"redis_version": version})


@pytest.mark.parametrize(
    ("info", "acked_trim", "readgroup_claim", "inactive", "idmp"),
    [
        ({"redis_version": "7.0.15"}, False, False, False, False),
        ({"redis_version": "7.2.4", "valkey_version": "8.0.1"}, False, False, True, False),
        ({"redis_version": "8.2.1"}, True, False, True, False),
        ({"redis_version": "8.6.0"}, True, True, True, True),
    ],
)
def test_newer_stream_features_are_detected(
    info: dict[str, str], acked_trim: bool, readgroup_claim: bool, inactive: bool, idmp: bool
) -> None:
    s = server_info(info)
    assert (s.has_acked_trim, s.has_readgroup_claim) == (acked_trim, readgroup_claim)
    assert (s.has_consumer_inactive, s.has_idempotent_xadd) == (inactive, idmp)


@pytest.mark.parametrize("version", ["7.0.15", "7.2.4", "8.2.1", "8.6.0"])
def test_noeviction_passes_on_old_and_new_servers(version: str) -> None:
    info = server_info({"redis_version": version, "maxmemory_policy": "noeviction"})
    assert info.maxmemory_policy == "noeviction"
    check_eviction(info)


@pytest.mark.parametrize("version", ["7.0.15", "8.6.0"])
@pytest.mark.parametrize(
    ("policy", "why"),
    [
        ("volatile-lru", "evicts keys that have a TTL"),
        ("volatile-lfu", "dedup"),
        ("volatile-ttl", "leases|lease"),
        ("volatile-random", "task state"),
        ("allkeys-lru", "streams and consumer groups"),
        ("allkeys-random", "events are lost"),
    ],
)
def test_any_eviction_policy_is_refused_naming_the_policy_the_reason_and_the_override(
    version: str, policy: str, why: str
) -> None:
    info = server_info({"redis_version": version, "maxmemory_policy": policy})
    with pytest.raises(UnsafeServerConfig) as refused:
        check_eviction(info)
    message = str(refused.value)
    assert f"maxmemory-policy is {policy}" in message
    assert "needs noeviction" in message
    assert "STREAMPROC_ALLOW_EVICTION=1" in message
    assert "allow_eviction=True" in message
    assert any(w in message for w in why.split("|"))


def test_the_override_lets_an_eviction_policy_through_with_a_warning() -> None:
    info = server_info({"redis_version": "7.2.4", "maxmemory_policy": "volatile-lru"})
    with capture_logs() as logs:
        check_eviction(info, allow_eviction=True)
    assert [(e["event"], e["maxmemory_policy"]) for e in logs] == [
        ("eviction_allowed", "volatile-lru")
    ]


def test_a_server_that_does_not_report_its_policy_is_refused_unless_overridden() -> None:
    info = server_info({"redis_version": "7.0.15"})
    assert info.maxmemory_policy is None
    with pytest.raises(UnsafeServerConfig, match="did not report its maxmemory-policy"):
        check_eviction(info)
    check_eviction(info, allow_eviction=True)


async def test_a_real_server_under_volatile_lru_is_refused_and_passes_with_the_override(
    tmp_path: Path,
) -> None:
    """On a redis-server of this test's own: the shared one keeps noeviction."""
    with EmbeddedRedis(tmp_path, appendonly=False) as server:
        client = connect(RedisSettings(url=server.url))
        try:
            await client.config_set("maxmemory-policy", "volatile-lru")
            with pytest.raises(UnsafeServerConfig, match="maxmemory-policy is volatile-lru"):
                await check_server(client)
            info = await check_server(client, allow_eviction=True)
            assert info.maxmemory_policy == "volatile-lru"
            await client.config_set("maxmemory-policy", "noeviction")
            assert (await check_server(client)).maxmemory_policy == "noeviction"
        finally:
            await client.aclose()


def test_the_override_is_read_from_the_environment() -> None:
    assert load_config({}).redis.allow_eviction is False
    assert load_config({"STREAMPROC_ALLOW_EVICTION": "0"}).redis.allow_eviction is False
    assert load_config({"STREAMPROC_ALLOW_EVICTION": "1"}).redis.allow_eviction is True
    with pytest.raises(ConfigError, match="STREAMPROC_ALLOW_EVICTION='yes': expected 0 or 1"):
        load_config({"STREAMPROC_ALLOW_EVICTION": "yes"})


def test_every_role_refuses_an_evicting_server_with_exit_code_4(tmp_path: Path) -> None:
    """The CLI's shared start (open_redis) runs the check: exit 4 naming the policy; the
    override lets the same command through."""
    import os
    import subprocess
    import sys

    with EmbeddedRedis(tmp_path, appendonly=False) as server:
        subprocess.run(
            [
                "redis-cli",
                "-p",
                str(server.port),
                "CONFIG",
                "SET",
                "maxmemory-policy",
                "allkeys-lru",
            ],
            check=True,
            capture_output=True,
        )
        env = {**os.environ, "REDIS_URL": server.url, "STREAMPROC_PREFIX": "evict"}
        cmd = [sys.executable, "-m", "streamproc", "consume", "--all"]
        refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 4, refused.stderr
        assert "allkeys-lru" in refused.stderr
        env["STREAMPROC_ALLOW_EVICTION"] = "1"
        ok = subprocess.run(
            [sys.executable, "-m", "streamproc", "inspect"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
