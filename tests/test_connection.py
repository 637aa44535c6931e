"""The start-up server check: version and stream features, against the real server too."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from streamproc import ServerTooOld, check_server
from streamproc.connection import server_info


async def test_the_test_server_passes_and_reports_its_version(client: aioredis.Redis) -> None:
    info = await check_server(client)
    assert info.version >= (7, 0, 0)
    assert info.version_text.count(".") == 2


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
