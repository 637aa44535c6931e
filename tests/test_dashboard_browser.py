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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.connection import connect
from streamproc.dashboard import Panel
from streamproc.groups import ensure_declared_groups
from streamproc.settings import RedisSettings
from streamproc.tasks import task_concern
from tests.helpers import MakeConsumer, spot
from tests.tcpproxy import TcpProxy
from tests.test_dashboard import (
    HOSTILE,
    _Blocker,
    _submit,
    add_worker,
    broken_read,
    serving_panels,
)
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


async def _open(context: Any, srv: Server, token: str) -> Any:
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{srv.url}/dashboard")
    await page.fill("#token", token)
    await page.click("#login")
    await page.wait_for_selector("#live.on")
    return page


async def _reachable(action: Any) -> dict[str, float]:
    """Scroll an action into view and return its box. The page redraws its tables with every
    snapshot (each second), so an element can be replaced between the steps: try again."""
    from playwright.async_api import Error, expect

    for attempt in range(5):
        try:
            await action.scroll_into_view_if_needed()
            await expect(action).to_be_visible()
            box = await action.bounding_box()
        except Error as e:
            if "not attached" not in str(e) or attempt == 4:
                raise
            continue
        if box is not None:
            return dict(box)
    raise AssertionError("the action never stood still long enough to measure")


async def _shoot(page: Any, name: str) -> None:
    """A full-page screenshot at 1440 px and at 390 px (a phone) into tests/artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    for width, height in ((1440, 1000), (390, 844)):
        await page.set_viewport_size({"width": width, "height": height})
        await page.wait_for_timeout(300)  # one layout pass; not a performance bound
        await page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)


async def test_tasks_view_lists_expands_and_cancels_and_the_page_fits_a_phone(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any], tmp_path: Path
) -> None:
    """The tasks group is one row with its priority streams beneath; a queued task shows its
    payload on expand and Cancel (confirmed) ends it; at 390 px the page is one column, its
    tables scroll inside their cards and Cancel, Replay and Log out are reachable."""
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    blocker = _Blocker()
    runner = Consumer(
        task_concern(blocker.types()),
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="runner-1", block_ms=50),
    )
    await runner.ensure_groups()  # the tasks group on its four priority topics; not running
    await client.xadd(keys.dlq("tasks.low", "tasks"), {"type": "x", "dlq_reason": "permanent"})
    async with running_ingest(client, keys, producer, task_types=blocker.types()) as srv:
        operator = await srv.token("admin", (), operator=True)
        # a payload written by a submitter: shown as text, never parsed as HTML
        ids = [
            await _submit(srv, operator, f"job-{n} {HOSTILE}", p)
            for n, p in enumerate(("low", "high"))
        ]
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=_ARGS,
                viewport={"width": 1440, "height": 1000},
            )
            try:
                page = await _open(context, srv, operator)
                errors: list[str] = []
                dialogs: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))

                async def accept(dialog: Any) -> None:
                    dialogs.append(dialog.message)
                    await dialog.accept()

                page.on("dialog", accept)
                # one row for the group, its four priority topics beneath
                await expect(
                    page.locator('#groups tr.group-row[data-group="tasks"]')
                ).to_have_count(1)
                await expect(page.locator('#groups tr.sub[data-group="tasks"]')).to_have_count(4)
                await expect(
                    page.locator('#groups tr.group-row[data-group="tasks"] td').nth(1)
                ).to_have_text("4 topics")

                rows = page.locator("#tasks tr[data-task]")
                await expect(rows).to_have_count(2)
                low = page.locator(f'#tasks tr[data-task="{ids[0]}"]')
                await expect(low.locator("td").nth(0)).to_have_text("test.block")
                await expect(low.locator("td").nth(1)).to_have_text("low")
                await expect(low.locator("[data-field=status]")).to_have_text("queued")
                await low.get_by_test_id("task-expand").click()
                detail = page.locator(f'tr[data-task-detail="{ids[0]}"]')
                await expect(detail.get_by_test_id("task-payload")).to_contain_text(
                    f'"label": "job-0 {HOSTILE}"'
                )
                assert await page.locator("#tasks img").count() == 0
                await _shoot(page, "dashboard-tasks")

                # at a phone's width: one column, no page-wide horizontal scroll, tables scroll
                # inside their cards, and every action is reachable
                await page.set_viewport_size({"width": 390, "height": 844})
                width = await page.evaluate("document.documentElement.scrollWidth")
                assert width <= 390, width
                cards = page.locator(".cards .card")
                xs = {round((await cards.nth(i).bounding_box())["x"]) for i in range(5)}
                assert len(xs) == 1, xs  # stacked: one column
                wrap = page.locator("#groups").locator("xpath=..")
                assert await wrap.evaluate("e => e.scrollWidth > e.clientWidth")
                for action in (
                    page.locator("#logout"),
                    page.get_by_test_id("dlq-open").first,
                    page.get_by_test_id("replay").first,  # the DLQ table's last column
                    page.locator(f'#tasks tr[data-task="{ids[1]}"]').get_by_test_id("task-cancel"),
                ):
                    box = await _reachable(action)
                    assert box["x"] >= 0, box
                    assert box["x"] + box["width"] <= 390, box
                await (
                    page.locator(f'#tasks tr[data-task="{ids[1]}"]')
                    .get_by_test_id("task-cancel")
                    .click()
                )
                high = page.locator(f'#tasks tr[data-task="{ids[1]}"]')
                await expect(high.locator("[data-field=status]")).to_have_text("cancelled")
                await expect(page.locator("#tasks-note")).to_contain_text("Cancelled")
                assert len(dialogs) == 1  # the confirmation; no alert() from the payload
                assert "Cancel task test.block" in dialogs[0]
                await page.screenshot(
                    path=str(ARTIFACTS / "dashboard-tasks-cancelled-390.png"), full_page=True
                )
                assert errors == []
            finally:
                await context.close()


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """Redis behind a TCP proxy that the test can make stop answering."""
    url = urlparse(redis_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


@pytest.mark.timeout(180)
async def test_busy_and_stuck_groups_read_differently_and_an_outage_greys_the_page(
    redis_proxy: TcpProxy, keys: Keys, client: aioredis.Redis, codec: Codec[Any], tmp_path: Path
) -> None:
    """Two groups with an entry older than stuck_after_s (60 s): one just delivered (its
    owner renews it: busy, blue), one nobody renewed for 2 min (stuck, red). Then Redis stops
    answering: the figures grey out under 'as of HH:MM:SS'; a reload gets the outage page (HTML,
    not JSON); when Redis is back the page is live again."""
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    stream = keys.stream("cluster")
    entry_id = await client.xadd(stream, {"type": "t"}, id="1000-0")  # stamped 1970: old
    await ensure_declared_groups(client, keys, {"cluster": ["busy-g", "stuck-g"]})
    await client.xreadgroup("busy-g", "c1", {stream: ">"})
    await client.xreadgroup("stuck-g", "c2", {stream: ">"})
    await client.xclaim(stream, "stuck-g", "c2", 0, [entry_id], idle=120_000)
    secs, _ = await client.time()
    await client.hset(keys.ticker_last(), "discovery", str((int(secs) - 120) * 1000))
    through = connect(
        RedisSettings(url=redis_proxy.url, key_prefix=keys.prefix, socket_timeout_s=1)
    )
    try:
        async with running_ingest(through, keys, Producer(through, codec, keys)) as srv:
            operator = await srv.token("admin", (), operator=True)
            async with async_playwright() as pw:
                context = await pw.chromium.launch_persistent_context(
                    str(tmp_path / "chromium-profile"),
                    executable_path=str(CHROMIUM),
                    headless=True,
                    args=_ARGS,
                    viewport={"width": 1440, "height": 1000},
                )
                try:
                    page = await _open(context, srv, operator)
                    busy = page.locator('#groups tr[data-group="busy-g"]')
                    stuck = page.locator('#groups tr[data-group="stuck-g"]')
                    await expect(busy).to_have_attribute("data-state", "busy")
                    await expect(stuck).to_have_attribute("data-state", "stuck")
                    await expect(busy.locator("[data-field=state]")).to_have_text("busy")
                    await expect(stuck.locator("[data-field=state]")).to_have_text("stuck")
                    colour = "e => getComputedStyle(e).backgroundColor"
                    busy_bg = await busy.locator("[data-field=state]").evaluate(colour)
                    stuck_bg = await stuck.locator("[data-field=state]").evaluate(colour)
                    assert busy_bg != stuck_bg, (busy_bg, stuck_bg)
                    await expect(page.get_by_test_id("total-state")).to_have_text("stuck")
                    await expect(stuck.locator("[data-field=idle]")).to_have_text(
                        re.compile(r"\d")
                    )  # its idle time
                    # the ticker's times read as the CLI's: ISO-8601 and how long ago
                    await expect(
                        page.locator('#schedules tr[data-schedule="discovery"]')
                    ).to_contain_text(re.compile(r"\d\d:\d\d:\d\dZ \(2 min ago\)"))
                    await _shoot(page, "dashboard-states")
                    await page.set_viewport_size({"width": 1440, "height": 1000})

                    # Redis stops answering: stale figures, greyed, and since when
                    redis_proxy.refuse(True)
                    redis_proxy.cut()
                    banner = page.get_by_test_id("outage")
                    await expect(banner).to_be_visible()
                    await expect(banner).to_contain_text(re.compile(r"as of \d\d:\d\d:\d\d UTC"))
                    await expect(page.locator("body")).to_have_class(re.compile("stale"))
                    grey = await page.locator("#total-backlog").evaluate(
                        "e => getComputedStyle(e).color"
                    )
                    assert grey == "rgb(156, 163, 175)", grey
                    await _shoot(page, "dashboard-outage")
                    await page.set_viewport_size({"width": 1440, "height": 1000})
                    answer = await page.reload()
                    assert answer is not None
                    assert answer.status == 503
                    await expect(page.get_by_test_id("outage")).to_contain_text("does not answer")
                    assert "application/problem+json" not in answer.headers["content-type"]
                    await _shoot(page, "dashboard-outage-reload")

                    redis_proxy.refuse(False)  # back: the outage page reloads itself into the page
                    # (each reload every 5 s; a pooled connection the cut left dead fails one
                    # of them, so it can take a few; the page's stream reopens after a 503)
                    await page.wait_for_selector("#live.on", timeout=3 * WAIT_MS)
                    await expect(page.get_by_test_id("outage")).to_be_hidden()
                finally:
                    await context.close()
    finally:
        await through.aclose()


async def test_the_live_stream_reopens_after_an_answer_that_is_not_a_stream(
    client: aioredis.Redis, keys: Keys, producer: Producer, tmp_path: Path
) -> None:
    """A browser's EventSource gives up for good after a non-stream answer (the 503 of an
    events request made while Redis did not answer): the page opens a new stream itself."""
    from playwright.async_api import async_playwright

    refused: list[str] = []

    async def first_one_refused(route: Any) -> None:
        if not refused:
            refused.append(route.request.url)
            await route.fulfill(status=503, body="{}", content_type="application/problem+json")
        else:
            await route.continue_()

    async with running_ingest(client, keys, producer) as srv:
        operator = await srv.token("admin", (), operator=True)
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=_ARGS,
            )
            try:
                await context.route("**/dashboard/events", first_one_refused)
                await _open(context, srv, operator)  # waits for #live.on
                assert len(refused) == 1
            finally:
                await context.close()


async def test_the_redis_memory_card_reads_high_at_the_alert_ratio_and_calms_below_it(
    keys: Keys, codec: Codec[Any], tmp_path: Path
) -> None:
    """A redis-server of its own (the test moves maxmemory): the card shows used/maxmemory as
    a percentage, red with 'high' at the alert ratio (0.5 here), and plain with 'alert at
    50 %' once maxmemory is raised."""
    from playwright.async_api import async_playwright, expect

    from streamproc.embedded import EmbeddedRedis

    expect.set_options(timeout=WAIT_MS)
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    own = connect(RedisSettings(url=server.url, key_prefix=keys.prefix))
    try:
        used = int((await own.info("memory"))["used_memory"])
        await own.config_set("maxmemory", int(used * 1.5))  # ~0.67: over 0.5
        producer = Producer(own, codec, keys)
        async with running_ingest(own, keys, producer, memory_alert_ratio=0.5) as srv:
            operator = await srv.token("admin", (), operator=True)
            async with async_playwright() as pw:
                context = await pw.chromium.launch_persistent_context(
                    str(tmp_path / "chromium-profile"),
                    executable_path=str(CHROMIUM),
                    headless=True,
                    args=_ARGS,
                    viewport={"width": 1440, "height": 900},
                )
                try:
                    page = await context.new_page()
                    page.set_default_timeout(WAIT_MS)
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    await page.goto(f"{srv.url}/dashboard")
                    await page.fill("#token", operator)
                    await page.click("#login")
                    await page.wait_for_selector("#live.on")
                    await expect(page.locator("#memory")).to_have_text(re.compile(r"^\d+ %$"))
                    await expect(page.locator("#memory")).to_have_class(re.compile(r"\bbad\b"))
                    await expect(page.locator("#memory-of")).to_contain_text("high")
                    await expect(page.locator("#memory-of")).to_contain_text(" of ")
                    ARTIFACTS.mkdir(exist_ok=True)
                    await page.screenshot(path=str(ARTIFACTS / "dashboard-memory-high.png"))

                    await own.config_set("maxmemory", used * 50)
                    await expect(page.locator("#memory-of")).to_contain_text("alert at 50 %")
                    await expect(page.locator("#memory")).not_to_have_class(re.compile(r"\bbad\b"))
                    assert errors == []
                finally:
                    await context.close()
    finally:
        await own.aclose()
        server.stop()
