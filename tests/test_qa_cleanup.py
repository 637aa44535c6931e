"""``screenshot.upload`` on moto's S3 server (no browser needed: the PNG comes in the
payload) and the ``qa-cleanup`` concern on ``tick.cleanup_qa``: sessions older than the
retention lose their screenshots and state, newer ones keep them."""

from __future__ import annotations

import base64
import hashlib
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

import qa
from qa import _keys, cleanup
from qa.screenshots import ScreenshotUpload, upload_screenshot
from schemas.ticks import QaCleanupTick
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.outbound import CallPermanent
from streamproc.tasks import TaskContext, TaskStore
from tests.helpers import moto_server
from tests.qa_support import qa_settings

pytestmark = pytest.mark.timeout(60)

BUCKET = "qa-cleanup"
DAY_MS = 86_400_000


def png(seed: int) -> bytes:
    """A valid 1x1 PNG whose colour is ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    raw = b"\x00" + bytes([seed % 256, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", (1).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00")
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    import boto3  # type: ignore[import-untyped]

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(k, v)
    with moto_server() as url:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield url, client


def ctx(client: aioredis.Redis, keys: Keys, producer: Producer) -> TaskContext:
    return TaskContext(
        task_id="up-1",
        task_type="screenshot.upload",
        attempt=0,
        store=TaskStore(client, keys),
        redis=client,
        keys=keys,
        producer=producer,
    )


def upload(session_id: str, data: bytes, **kw: Any) -> ScreenshotUpload:
    return ScreenshotUpload(
        session_id=session_id,
        sha256=kw.pop("sha256", hashlib.sha256(data).hexdigest()),
        png_base64=kw.pop("png_base64", base64.b64encode(data).decode()),
    )


async def test_uploads_land_under_their_hash_and_old_sessions_are_cleaned(
    s3: tuple[str, Any],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    endpoint, s3_client = s3
    with qa_settings(s3_bucket=BUCKET, s3_endpoint_url=endpoint, retention_days=7):
        results = {}
        for session_id, n in (("old", 1), ("old", 2), ("new", 3)):
            results[n] = await upload_screenshot(
                upload(session_id, png(n)), ctx(client, keys, producer)
            )
        for session_id in ("old", "new"):
            store = qa.SessionStore(client, keys, session_id)
            await store.start(task_id="t", base_url="http://x.example/", attempt=0)
            await store.finish("completed", pages_crawled=1, bugs_found=0)
        # "old" finished 8 days ago (the index's score is when a session finished).
        await client.zadd(_keys.sessions(keys), {"old": int(time.time() * 1000) - 8 * DAY_MS})
        await producer.publish(
            QaCleanupTick(schedule="qa-cleanup", scheduled_for=datetime.now(UTC))
        )
        consumer = Consumer(
            cleanup.CONCERN,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            settings=ConsumerSettings(consumer="qa-cleanup-1", block_ms=20),
        )
        assert await consumer.process_once() == 1
    sha = hashlib.sha256(png(1)).hexdigest()
    assert results[1]["key"] == f"qa/old/{sha}.png"
    assert results[1]["url"] == f"{endpoint}/{BUCKET}/qa/old/{sha}.png"
    left = s3_client.list_objects_v2(Bucket=BUCKET)["Contents"]
    assert [o["Key"] for o in left] == [results[3]["key"]]
    head = s3_client.head_object(Bucket=BUCKET, Key=results[3]["key"])
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(png(3))
    assert await qa.SessionStore.get(client, keys, "old") is None
    assert await client.exists(_keys.screenshots(keys, "old")) == 0
    assert await qa.SessionStore.get(client, keys, "new") is not None
    assert await client.hlen(_keys.screenshots(keys, "new")) == 1
    assert await client.zrange(_keys.sessions(keys), 0, -1) == [b"new"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"png_base64": "not base64!"}, "png_base64: not base64"),
        ({"sha256": "0" * 64}, "its SHA-256 is not the payload's sha256"),
        ({"png_base64": base64.b64encode(b"GIF89a").decode(),
          "sha256": hashlib.sha256(b"GIF89a").hexdigest()}, "not a PNG"),
        ({"png_base64": ""}, "is neither staged"),
    ],
)  # fmt: skip
async def test_a_bad_screenshot_fails_at_once_saying_why(
    s3: tuple[str, Any],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    change: dict[str, str],
    error: str,
) -> None:
    endpoint, _ = s3
    with qa_settings(s3_bucket=BUCKET, s3_endpoint_url=endpoint), pytest.raises(Permanent) as e:
        await upload_screenshot(upload("s", png(9), **change), ctx(client, keys, producer))
    assert error in str(e.value)


async def test_a_missing_bucket_or_none_configured_is_permanent(
    s3: tuple[str, Any], client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    endpoint, _ = s3
    missing = qa_settings(s3_bucket="no-such-bucket", s3_endpoint_url=endpoint)
    with missing, pytest.raises(CallPermanent, match="NoSuchBucket"):
        await upload_screenshot(upload("s", png(1)), ctx(client, keys, producer))
    with qa_settings(), pytest.raises(Permanent, match="STREAMPROC_QA_S3_BUCKET is not set"):
        await upload_screenshot(upload("s", png(1)), ctx(client, keys, producer))
