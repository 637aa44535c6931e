"""AWS accounts and guarded calls (spot/aws.py) against a moto server over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from spot.aws import AccountStore, Aws, AwsSettings, new_account
from streamproc import Keys
from streamproc.breaker import BreakerOpen, breaker_states
from streamproc.errors import ConfigError
from streamproc.outbound import CallPermanent, CallTransient
from tests.helpers import free_port, moto_server

ROLE = "arn:aws:iam::111122223333:role/streamproc-scan"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"id": "12345"}, "id"),
        ({"id": "1111222233334"}, "id"),
        ({"role_arn": "arn:aws:iam::999999999999:role/x"}, "role_arn"),
        ({"role_arn": "not-an-arn"}, "role_arn"),
        ({"regions": []}, "regions"),
        ({"regions": "eu-west-1"}, "regions"),
        ({"regions": ["eu-west-1\n"]}, "regions"),
        ({"regions": ["mars-north-1x"]}, "regions"),
        ({"external_id": "a b"}, "external_id"),
        ({"name": "x" * 101}, "name"),
        ({"name": "bad\x00name"}, "name"),
    ],
)
def test_bad_accounts_name_the_field(kw: dict[str, Any], field: str) -> None:
    good: dict[str, Any] = {"id": "111122223333", "role_arn": ROLE, "regions": ["eu-west-1"]}
    with pytest.raises(ConfigError) as e:
        new_account(**{**good, **kw})
    assert str(e.value).startswith(f"{field}: ")


async def test_accounts_are_stored_and_hide_the_external_id(
    client: aioredis.Redis, keys: Keys
) -> None:
    store = AccountStore(client, keys)
    acc = new_account(
        id="111122223333",
        role_arn=ROLE,
        regions=["eu-west-1", "eu-west-1", "us-east-1"],
        external_id="s3cret-ext",
    )
    assert acc.regions == ("eu-west-1", "us-east-1")
    assert await store.add(acc)
    assert not await store.add(acc)  # replaced, not new
    await client.hset(keys.state("aws", "accounts"), "junk", b"{not json")
    assert [a.id for a in await store.all()] == ["111122223333"]
    assert "s3cret" not in str(acc.public())
    assert await store.remove("111122223333")
    assert await store.get("111122223333") is None


async def test_calls_assume_the_role_and_classify_failures(
    client: aioredis.Redis, keys: Keys, endpoint: str
) -> None:
    # A generous read timeout: moto answers slowly on a loaded machine.
    aws = Aws(
        AwsSettings(
            endpoint_url=endpoint, read_timeout_s=90, breaker_threshold=2, breaker_cooldown_s=60
        )
    )
    acc = new_account(id="111122223333", role_arn=ROLE, regions=["eu-west-1"])

    def create(ec2: Any) -> str:
        image = ec2.describe_images()["Images"][0]["ImageId"]
        ran = ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, InstanceType="m5.large")
        return str(ran["Instances"][0]["InstanceId"])

    first = await aws.call(client, keys, acc, "ec2", "eu-west-1", create)

    def count(ec2: Any) -> int:
        pages = ec2.get_paginator("describe_instances").paginate()
        return sum(len(r["Instances"]) for p in pages for r in p["Reservations"])

    assert await aws.call(client, keys, acc, "ec2", "eu-west-1", count) == 2
    # The role's account, not the base credentials' (moto keeps accounts apart).
    other = new_account(
        id="444455556666", role_arn="arn:aws:iam::444455556666:role/scan", regions=["eu-west-1"]
    )
    assert await aws.call(client, keys, other, "ec2", "eu-west-1", count) == 0
    # One session per account, reused.
    assert set(aws._sessions) == {"111122223333", "444455556666"}

    def bad_request(ec2: Any) -> Any:
        return ec2.terminate_instances(InstanceIds=["i-does-not-exist"])

    with pytest.raises(CallPermanent) as e:
        await aws.call(client, keys, acc, "ec2", "eu-west-1", bad_request)
    assert "ec2 111122223333/eu-west-1" in str(e.value)
    assert first.startswith("i-")
    # An endpoint that does not answer: transient, and the breaker opens after 2.
    down = Aws(
        AwsSettings(
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            connect_timeout_s=0.5,
            read_timeout_s=0.5,
            breaker_threshold=2,
            breaker_cooldown_s=60,
        )
    )
    for _ in range(2):
        with pytest.raises(CallTransient):
            await down.call(client, keys, acc, "ec2", "us-east-1", count)
    with pytest.raises(BreakerOpen):
        await down.call(client, keys, acc, "ec2", "us-east-1", count)
    states = {b.name: b.state for b in await breaker_states(client, keys)}
    assert states["aws:ec2:111122223333:us-east-1"] == "open"
