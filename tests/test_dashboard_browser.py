"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright).

The real ingest app on 127.0.0.1, a real Consumer, real events posted to ingest: after login
the page goes live, its numbers move when events flow, a poison event shows in the DLQ view
and its Replay button sends it back to the group, which handles it. The application's panels
show as tables: a worker row appears, a hostile worker name is shown as text, a panel that
fails shows its error. Screenshots are saved to ``tests/artifacts/`` (ignored by git; CI can
keep them as artefacts).

Skipped where ``/usr/bin/chromium`` or the ``playwright`` package is missing. Playwright's own
browser downloads are never used: the Debian browser is launched by its path.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Codec, Keys, Permanent, Producer
from streamproc.dashboard import Panel
from tests.helpers import MakeConsumer, spot
from tests.test_dashboard import HOSTILE, add_worker, broken_read, serving_panels
from tests.test_ingest_support import Server, cluster_event, running_ingest
from workers.panel import PANEL as WORKERS_PANEL

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
_POSITIVE = re.compile(r"^(?:[1-9]|0\.\d*[1-9])")
#: Generous bounds on waiting for the page; never a performance threshold.
WAIT_MS = 20_000

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="the playwright package is absent"
    ),
]

_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer) as s:
        yield s


async def test_dashboard_goes_live_moves_and_replays_a_dead_letter(
    srv: Server,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    make_consumer: MakeConsumer,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)

    broken = True  # the handler's "bug": fixed before the replay
    poison_handled = asyncio.Event()

    async def handle(event: SpotInterruption, ctx: Any) -> None:
        if event.instance_id == "i-poison":
            if broken:
                raise Permanent("cannot handle i-poison (yet)")
            poison_handled.set()

    consumer = make_consumer({SpotInterruption: handle}, block_ms=200)
    started = asyncio.Event()
    runner = asyncio.create_task(consumer.run(started=started))
    await started.wait()
    agent = await srv.token("agent-1", ["cluster.*"])
    operator = await srv.token("admin", (), operator=True)
    row = 'tr[data-group="g"][data-topic="cluster"]'
    try:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = await context.new_page()
                page.set_default_timeout(WAIT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))

                # Login form → session cookie → the live page.
                await page.goto(f"{srv.url}/dashboard")
                await page.fill("#token", operator)
                await page.click("#login")
                await page.wait_for_selector("#live.on")
                await page.wait_for_selector(row)
                cookies = await context.cookies()
                [session] = [c for c in cookies if c["name"] == "sp_dashboard"]
                assert session["httpOnly"]
                assert session["sameSite"] == "Strict"

                # The numbers move when events flow through ingest and the consumer.
                batch = [cluster_event(instance_id=f"i-{n}") for n in range(20)]
                status, body, _ = await srv.post("/v1/events", batch, token=agent)
                assert status == 202, body
                await expect(page.locator(f"{row} td[data-field=done_total]")).to_have_text("20")
                # The throughput chart drew a non-zero rate (its largest value shown).
                await expect(page.locator("#chart-rate")).to_have_attribute("data-max", _POSITIVE)

                # Poison: an entry of an unknown type written with XADD, and an event the
                # handler refuses (Permanent). Both appear in the DLQ view.
                fields = codec.encode(spot(0))
                fields[b"type"] = b"cluster.no_such_type"
                fields[b"id"] = str(uuid.uuid4()).encode()
                await client.xadd(keys.stream("cluster"), fields)  # type: ignore[arg-type]
                status, body, _ = await srv.post(
                    "/v1/events", cluster_event(instance_id="i-poison"), token=agent
                )
                assert status == 202, body
                await expect(page.locator("#dlq tr[data-dlq-id]")).to_have_count(2)
                await expect(page.locator("#total-dlq")).to_have_text("2")
                dlq_text = await page.text_content("#dlq")
                assert dlq_text is not None
                assert "unknown_type" in dlq_text
                assert "cannot handle i-poison" in dlq_text
                # Details: the payload indented and the full error, under the row
                await (
                    page.locator("#dlq tr[data-dlq-id]", has_text="cluster.spot_interruption")
                    .get_by_test_id("dlq-expand")
                    .click()
                )
                payload = page.locator("tr.dlq-detail:visible [data-testid=dlq-payload]")
                await expect(payload).to_contain_text('  "instance_id": "i-poison"')
                await expect(
                    page.locator("tr.dlq-detail:visible [data-testid=dlq-error]")
                ).to_contain_text("cannot handle i-poison")
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "dashboard-dlq.png"), full_page=True)
                # the reason filter: only the undecodable one, "1 of 1 … 2 in all"
                await page.select_option("#dlq-reason", "unknown_type")
                await expect(page.locator("#dlq tr[data-dlq-id]")).to_have_count(1)
                await expect(page.locator("#dlq-title")).to_contain_text(
                    "shown 1 of 1 unknown_type, 2 in all"
                )
                await page.select_option("#dlq-reason", "")
                await expect(page.locator("#dlq tr[data-dlq-id]")).to_have_count(2)

                # Fix the handler, press Replay on the refused event: the group handles it.
                broken = False
                poisoned = page.locator(
                    "#dlq tr[data-dlq-id]", has_text="cluster.spot_interruption"
                )
                await poisoned.get_by_role("button", name="Replay").click()
                await asyncio.wait_for(poison_handled.wait(), WAIT_MS / 1000)
                await expect(page.locator("#dlq tr[data-dlq-id]")).to_have_count(1)
                await expect(page.locator("#total-dlq")).to_have_text("1")
                assert "Replayed 1" in (await page.text_content("#dlq-status") or "")
                assert await client.xlen(keys.dlq("cluster", "g")) == 1
                shot = ARTIFACTS / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                print(f"dashboard screenshot: {shot}")
                assert errors == []
            finally:
                await context.close()
    finally:
        consumer.stop()
        await runner


async def test_workers_panel_rows_appear_as_text_and_a_failing_panel_shows_its_error(
    client: aioredis.Redis, keys: Keys, producer: Producer, tmp_path: Path
) -> None:
    """A worker named like an HTML tag is shown as that text (no element, no script run)."""
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    await add_worker(client, keys, "w-hostile", 1, name=HOSTILE, status="running", cpu=12.5)
    await add_worker(client, keys, "w-hot", 2, status="running", cpu=97.0, alert_cpu="alert")
    panels = [WORKERS_PANEL, Panel("broken", "Broken", broken_read)]
    async with serving_panels(client, keys, producer, panels) as srv:
        operator = await srv.token("admin", (), operator=True)
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = await context.new_page()
                page.set_default_timeout(WAIT_MS)
                errors: list[str] = []
                dialogs: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("dialog", lambda d: dialogs.append(d.message))
                await page.goto(f"{srv.url}/dashboard")
                await page.fill("#token", operator)
                await page.click("#login")
                await page.wait_for_selector("#live.on")

                rows = page.locator('section[data-panel="workers"] tbody tr')
                await expect(rows).to_have_count(2)
                await expect(rows.nth(0).locator("td").nth(0)).to_have_text("w-hot")
                await expect(rows.nth(0).locator("td").nth(5)).to_have_text("cpu")
                hostile = rows.nth(1)
                await expect(hostile.locator("td").nth(1)).to_have_text(HOSTILE)
                await expect(hostile.locator("td").nth(3)).to_have_text("12.5")
                assert await page.locator("#panels img").count() == 0
                await expect(
                    page.locator('section[data-panel="broken"] [data-field="panel-error"]')
                ).to_have_text("Could not read this panel: RuntimeError: lookup failed <b>")
                assert await page.locator('section[data-panel="broken"] b').count() == 0
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "dashboard-workers.png"), full_page=True)
                assert errors == []
                assert dialogs == []
            finally:
                await context.close()
