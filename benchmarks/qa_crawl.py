"""QA crawl: pages per second of the crawler against a generated local site (issue 16).

    .venv/bin/python benchmarks/qa_crawl.py [--pages 200] [--repeat 3] [--concurrency 1,4,8]
        [--browser-pages 40] [--json FILE]

The site (aiohttp on 127.0.0.1, in this process's event loop like the crawler — so the
figures include serving it): ``--pages`` HTML pages in a 5-ary tree (page ``i`` links to its
parent, to ``/``, to its children ``5i+1 .. 5i+5``), every tenth page also to a missing page
(404), and a robots.txt. Each page is about 1 KiB. Every page is reachable within depth 4 for
200 pages; ``max_depth`` is 20, ``max_pages`` the site's size plus its 404 targets.

Phases, each run ``--repeat`` times (the median is printed):

1. **crawler**: ``qa.crawler.Crawl`` alone (no Redis), per-host concurrency from
   ``--concurrency``, no rate limit (``per_host_rate_per_s=0``; the default of 5 a second is
   a politeness bound, not a capacity).
2. **task**: the ``crawl.session`` task function with a real TaskContext on Redis (embedded
   redis-server, or REDIS_URL): the same crawl plus, per page, the task's progress, the
   session hash, and a ``qa.bug_found`` event per 404. Browser off.
3. **browser** (when /usr/bin/chromium and Playwright are there; ``--browser-pages 0`` skips
   it): the task with Chromium loading every page (console errors; screenshots of the 404
   pages, not stored: no bucket), on the first ``--browser-pages`` pages of the site.

uvloop, as the ``streamproc`` CLI runs task runners.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop
from aiohttp import web

from qa.browser import availability
from qa.crawl import CrawlRequest, crawl_session
from qa.crawler import Crawl
from qa.settings import QaSettings, use_settings
from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, ProducerSettings, RedisSettings, connect
from streamproc.embedded import EmbeddedRedis
from streamproc.logs import configure_logging
from streamproc.tasks import TaskContext, TaskStore

Browser = Literal["auto", "off", "required"]
FILLER = "<p>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 14 + "</p>"


def site(n: int) -> web.Application:
    async def robots(_: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /admin/\n")

    async def page(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        if not 0 <= i < n:
            raise web.HTTPNotFound()
        links = {"/p/0", f"/p/{max(i - 1, 0) // 5}"}
        links |= {f"/p/{c}" for c in range(5 * i + 1, 5 * i + 6)}
        if i % 10 == 9:
            links.add(f"/gone/{i}")
        body = "".join(f'<a href="{h}">{h}</a>' for h in sorted(links) if _exists(h, n))
        html = f"<!doctype html><title>Page {i}</title><h1>Page {i}</h1>{FILLER}{body}"
        return web.Response(text=html, content_type="text/html")

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPFound("/p/0")

    app = web.Application()
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/", root)
    app.router.add_get("/p/{i}", page)
    return app


def _exists(href: str, n: int) -> bool:
    return not href.startswith("/p/") or int(href.removeprefix("/p/")) < n


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def settings(concurrency: int, browser: Browser = "off") -> QaSettings:
    return QaSettings(
        per_host_concurrency=concurrency,
        per_host_rate_per_s=0.0,
        browser=browser,
        allow_private_networks=True,  # the site is on 127.0.0.1
    )


async def crawler_only(url: str, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    s = settings(concurrency)
    crawl = Crawl([url + "/p/0"], max_pages=args.max_pages, max_depth=20, s=s)
    started = time.perf_counter()
    pages = await crawl.run()
    wall = time.perf_counter() - started
    return {"pages": len(pages), "wall_s": wall, "pages_per_s": len(pages) / wall}


async def task(
    url: str, client: Any, keys: Keys, producer: Producer, *, pages: int, browser: Browser
) -> dict[str, Any]:
    use_settings(settings(4, browser))
    task_id = f"bench-{uuid.uuid4().hex[:8]}"
    await TaskStore(client, keys).create(
        task_id, type="crawl.session", priority="normal", submitted_by="bench"
    )
    ctx = TaskContext(
        task_id=task_id,
        task_type="crawl.session",
        attempt=0,
        store=TaskStore(client, keys),
        redis=client,
        keys=keys,
        producer=producer,
    )
    p = CrawlRequest(session_id=task_id, base_url=url + "/p/0", max_pages=pages, max_depth=20)
    started = time.perf_counter()
    result = await crawl_session(p, ctx)
    wall = time.perf_counter() - started
    n = result["pages_crawled"]
    return {"pages": n, "bugs": result["bugs_found"], "wall_s": wall, "pages_per_s": n / wall}


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["pages_per_s"] for r in runs]
    return {
        "pages": runs[0]["pages"],
        "pages_per_s": round(statistics.median(rates), 1),
        "min": round(min(rates), 1),
        "max": round(max(rates), 1),
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
        **({"bugs": runs[0]["bugs"]} if "bugs" in runs[0] else {}),
    }


async def bench(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    runner, url = await serve(site(args.pages))
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(RedisSettings(url=redis_url, key_prefix=keys.prefix))
    producer = Producer(client, Codec(REGISTRY), keys, ProducerSettings())
    out: dict[str, Any] = {"crawler": {}, "task": {}, "browser": None}
    try:
        for c in args.concurrency:
            runs = [await crawler_only(url, args, c) for _ in range(args.repeat)]
            out["crawler"][c] = median(runs)
        runs = [
            await task(url, client, keys, producer, pages=args.max_pages, browser="off")
            for _ in range(args.repeat)
        ]
        out["task"] = median(runs)
        usable, note = availability(QaSettings(browser="auto"))
        out["browser_note"] = note
        if usable and args.browser_pages:
            runs = [
                await task(url, client, keys, producer, pages=args.browser_pages, browser="auto")
                for _ in range(args.repeat)
            ]
            out["browser"] = median(runs)
    finally:
        use_settings(None)
        async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            await client.delete(key)
        await client.aclose()
        await runner.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pages", type=int, default=200, help="pages of the generated site")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8", help="per-host concurrencies to try")
    ap.add_argument("--browser-pages", type=int, default=40, help="0: no browser phase")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not 1 <= args.pages <= 10_000 or args.repeat < 1 or not args.concurrency:
        ap.error("--pages within 1..10000, --repeat >= 1, --concurrency a list of 1..64")
    # Every page, the redirect at / is not followed (the crawl starts at /p/0), and the 404s.
    args.max_pages = args.pages + args.pages // 10
    configure_logging("warning")
    server = None
    tmp = tempfile.TemporaryDirectory(prefix="qa-bench-")
    url = os.environ.get("REDIS_URL")
    if not url:
        server = EmbeddedRedis(Path(tmp.name) / "redis", appendonly=False).start()
        url = server.url
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(bench(url, args))
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    out["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "at": datetime.now(UTC).isoformat(timespec="minutes"),
    }
    print(f"site: {args.pages} pages + {args.pages // 10} missing; {os.cpu_count()} CPUs; "
          f"median of {args.repeat}")  # fmt: skip
    for c, r in out["crawler"].items():
        print(f"crawler, per-host concurrency {c}: {r['pages']} pages, {r['pages_per_s']} pages/s "
              f"(min {r['min']}, max {r['max']})")  # fmt: skip
    t = out["task"]
    print(f"crawl.session task (Redis progress + events, concurrency 4): {t['pages']} pages, "
          f"{t['bugs']} bugs, {t['pages_per_s']} pages/s "
          f"(min {t['min']}, max {t['max']})")  # fmt: skip
    if out["browser"]:
        b = out["browser"]
        print(f"with Chromium: {b['pages']} pages, {b['pages_per_s']} pages/s "
              f"(min {b['min']}, max {b['max']})")  # fmt: skip
    else:
        print(f"with Chromium: not measured ({out['browser_note']})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
