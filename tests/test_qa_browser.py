"""The crawl in Debian's headless Chromium: console errors are bugs, their pages'
screenshots go to S3 (moto's server) through ``screenshot.upload``, and the daily cleanup
removes them once the session is older than the retention.

Skipped where ``/usr/bin/chromium`` or the ``playwright`` package is missing (Playwright's
own browser downloads are never used); the crawl without a browser is
``tests/test_qa_crawl.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import qa
from qa import _keys
from qa.cleanup import clean
from streamproc import Codec, Keys, Producer
from streamproc.tasks import TaskStore
from tests.helpers import moto_server
from tests.qa_support import Site, qa_settings, run_until_settled, runners, serve, submit

CHROMIUM = Path("/usr/bin/chromium")
BUCKET = "qa-shots"

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="the playwright package is absent"
    ),
]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    import boto3  # type: ignore[import-untyped]

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(k, v)
    with moto_server() as url:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield url, client


async def test_console_errors_are_bugs_with_screenshots_in_s3(
    s3: tuple[str, Any],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    endpoint, s3_client = s3
    site = Site()
    async with serve(site.app) as url:
        with qa_settings(browser="required", s3_bucket=BUCKET, s3_endpoint_url=endpoint):
            run = runners(client, keys, producer, codec)
            payload = {"session_id": "b1", "base_url": url, "max_pages": 20, "max_depth": 1}
            await submit(client, keys, producer, "crawl.session", "crawl-b1", payload)
            store = TaskStore(client, keys)
            [view] = await run_until_settled(run["crawl"], store, ["crawl-b1"])
            assert view.status == "completed", view.error
            result = view.result
            # The uploads the crawl submitted, run by the media queue's runner.
            uploads: Any = await client.xrange(keys.stream("tasks.media.normal"))
            upload_ids = [f[b"id"].decode() for _, f in uploads]
            done = await run_until_settled(run["media"], store, upload_ids)
    assert result["browser"].startswith("chromium")
    bugs = {(b["kind"], b["url"].removeprefix(url)) for b in result["bugs"]}
    assert bugs == {
        ("broken_link", "/missing"),
        ("http_error", "/error"),
        ("console_error", "/js-error"),
    }
    pages = {p["url"].removeprefix(url): p for p in result["pages"]}
    errors = pages["/js-error"]["console_errors"]
    assert any("boom: checkout failed" in e for e in errors)
    assert any("undefinedFunction" in e for e in errors)
    assert pages["/about"]["console_errors"] == []
    assert pages["/about"]["screenshot_url"] == ""  # no problem: no screenshot
    # Every page with a problem has a screenshot, uploaded once per distinct image.
    shot_urls = {pages[p]["screenshot_url"] for p in ("/js-error", "/missing", "/error")}
    assert all(u.startswith(f"{endpoint}/{BUCKET}/qa/b1/") for u in shot_urls)
    assert len(upload_ids) == result["screenshots"] == len(shot_urls)
    assert all(v.status == "completed" for v in done), [v.error for v in done]
    assert {v.result["url"] for v in done} == shot_urls
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix="qa/b1/")["Contents"]
    assert len(listed) == len(shot_urls)
    for obj in listed:
        got = s3_client.get_object(Bucket=BUCKET, Key=obj["Key"])
        body = got["Body"].read()
        assert got["ContentType"] == "image/png"
        assert body.startswith(b"\x89PNG\r\n\x1a\n")
        assert obj["Key"] == f"qa/b1/{hashlib.sha256(body).hexdigest()}.png"
    # The bug events carry their page's screenshot; the staged copies are gone.
    events: Any = await client.xrange(keys.stream("qa"))
    decoded = [codec.decode(f) for _, f in events]
    js = next(e for e in decoded if e.kind == "console_error")
    assert js.screenshot_url == pages["/js-error"]["screenshot_url"]
    assert await client.keys(_keys.staged_png(keys, "*")) == []
    assert len(await client.hgetall(_keys.screenshots(keys, "b1"))) == len(shot_urls)

    # An upload run again (its answer lost) finds the object and answers the same URL.
    again_id = upload_ids[0]
    with qa_settings(s3_bucket=BUCKET, s3_endpoint_url=endpoint):
        again = await qa.TASK_TYPES["screenshot.upload"].run(
            qa.ScreenshotUpload(session_id="b1", sha256=done[0].result["sha256"]),
            _ctx(client, keys, producer, again_id),
        )
    assert again["url"] == done[0].result["url"]

    # The daily cleanup: nothing within the retention; everything of the session after it.
    with qa_settings(s3_bucket=BUCKET, s3_endpoint_url=endpoint, retention_days=7):
        kept = await clean(client, keys)
        assert (kept.sessions, kept.objects) == (0, 0)
        later_ms = int((time.time() + 8 * 86_400) * 1000)
        removed = await clean(client, keys, now_ms=later_ms)
    assert (removed.sessions, removed.objects) == (1, len(shot_urls))
    assert s3_client.list_objects_v2(Bucket=BUCKET, Prefix="qa/b1/").get("KeyCount") == 0
    assert await qa.SessionStore.get(client, keys, "b1") is None
    assert await client.exists(_keys.screenshots(keys, "b1")) == 0
    assert await client.zcard(_keys.sessions(keys)) == 0


def _ctx(client: aioredis.Redis, keys: Keys, producer: Producer, task_id: str) -> Any:
    from streamproc.tasks import TaskContext

    return TaskContext(
        task_id=task_id,
        task_type="screenshot.upload",
        attempt=1,
        store=TaskStore(client, keys),
        redis=client,
        keys=keys,
        producer=producer,
    )


async def test_without_chromium_the_crawl_goes_on_and_says_so(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    site = Site()
    async with serve(site.app) as url:
        with qa_settings(browser="auto", chromium_path="/nonexistent/chromium"):
            result = await qa.TASK_TYPES["crawl.session"].run(
                qa.CrawlRequest(session_id="b2", base_url=url, max_depth=1),
                _ctx(client, keys, producer, "t-b2"),
            )
    assert result["browser"] == "unavailable: no executable /nonexistent/chromium"
    assert result["bugs_found"] == 2  # the HTTP bugs; console errors need the browser
    assert await asyncio.sleep(0, result["status"]) == "completed"
