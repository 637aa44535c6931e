"""``crawl.session``: crawl a site, record every page, and report each problem once.

Per page (``PageRecord``): URL, depth, HTTP status, load time, the problems found, the
screenshot's URL. Problems (``schemas.qa.BugFound``, one event each, id
``bug_id(session, url, kind)``):

- ``http_error``: the page answered 5xx (the start page: any status >= 400);
- ``broken_link``: a linked page answered 4xx or did not answer (refused, timed out);
- ``console_error``: in Chromium the page logged errors to its console or threw.

Chromium (``qa.browser``) loads each HTML page after the HTTP fetch, for its console, and
screenshots the pages with a problem; the PNG is staged in Redis and a ``screenshot.upload``
task stores it (``qa.screenshots``), whose URL — known in advance, the key is the content's
hash — is in the bug. Without Chromium the crawl goes on and its result says why
(``browser``).

**Progress**: ``ctx.progress`` (``pages_crawled``, ``bugs_found``) and the session's hash
(``qa.session``), after each page. **Time**: at the soft limit (or the payload's
``time_budget_s``) the crawl stops starting pages and returns what it found, ``status``
``partial``. **Retries**: a retried crawl starts over; its events and upload tasks have the
same ids as the first attempt's, so nothing is reported twice. A start page that does not
answer at all is a transient error (retried); bad payloads fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from qa import _keys, _submit
from qa.browser import Browser, availability
from qa.crawler import Crawl, Page, normalize, origin_of
from qa.screenshots import ScreenshotUpload, object_url, stage
from qa.session import SessionStore
from qa.settings import QaSettings, settings
from schemas.qa import BugFound, BugKind, SessionId, bug_id
from streamproc.errors import Permanent
from streamproc.outbound import CallTransient
from streamproc.tasks import SoftTimeLimit, TaskContext

__all__ = ("MAX_DEPTH", "MAX_PAGES", "MAX_RETRIES", "CrawlRequest", "check_host", "crawl_session")

#: Bounds of a payload (the settings' ``max_pages_limit``/``max_depth_limit`` may be lower).
MAX_PAGES = 10_000
MAX_DEPTH = 20
#: ``crawl.session``'s retries (its TaskType's ``max_retries``).
MAX_RETRIES = 3
#: Pages listed in a task's result (the counters cover them all).
MAX_LISTED_PAGES = 1_000

_Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048, pattern=r"^https?://")]


class CrawlRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``crawl.session``."""

    session_id: SessionId
    #: Where the crawl starts; it stays on this URL's origin (scheme, host and port).
    base_url: _Url
    max_pages: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGES)] = 50
    #: Links are followed this many steps from the start pages (0: the start pages only).
    max_depth: Annotated[int, msgspec.Meta(ge=0, le=MAX_DEPTH)] = 3
    #: More start pages (pages nothing links to), on ``base_url``'s origin.
    start_urls: Annotated[list[_Url], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )
    #: Load pages in Chromium when the settings allow it (console errors, screenshots).
    browser: bool = True
    #: Stop starting pages after this many seconds and return what was found (``partial``).
    time_budget_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None

    def __post_init__(self) -> None:
        try:
            origin = origin_of(self.base_url)
        except ValueError as e:
            raise ValueError(f"base_url: {e}") from None
        if normalize(self.base_url) is None:
            raise ValueError("base_url: user names and passwords in the URL are not accepted")
        for i, u in enumerate(self.start_urls):
            try:
                same = origin_of(u) == origin and normalize(u) is not None
            except ValueError:
                same = False
            if not same:
                raise ValueError(
                    f"start_urls[{i}]: {u[:200]!r} is not on the origin of base_url "
                    f"({origin[0]}://{origin[1]}:{origin[2]})"
                )


@dataclass
class PageRecord:
    url: str
    depth: int
    status: int
    load_ms: float
    content_type: str = ""
    error: str = ""
    problems: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    screenshot_url: str = ""


def _path(url: str) -> str:
    """The path and query of ``url`` (what a title shows)."""
    u = urllib.parse.urlsplit(url)
    return (u.path or "/") + (f"?{u.query}" if u.query else "")


class _Session:
    """One attempt of one crawl session: what it found so far."""

    def __init__(
        self, p: CrawlRequest, ctx: TaskContext, s: QaSettings, browser_note: str, crawl: Crawl
    ) -> None:
        self.p, self.ctx, self.s, self.crawl = p, ctx, s, crawl
        self.store = SessionStore(ctx.redis, ctx.keys, p.session_id)
        self.browser: Browser | None = None
        self.browser_note = browser_note
        self.records: list[PageRecord] = []
        self.bugs: dict[str, BugFound] = {}
        self.screenshots: set[str] = set()

    async def on_page(self, page: Page) -> None:
        rec = PageRecord(
            url=page.url,
            depth=page.depth,
            status=page.status,
            load_ms=page.load_ms,
            content_type=page.content_type.split(";")[0],
            error=page.error,
        )
        self.records.append(rec)
        referrers = self.crawl.linked_from.get(page.url, [])
        found: list[tuple[BugKind, str, str]] = []  # kind, title, detail
        path = _path(page.url)
        if page.status >= 500 or (page.status >= 400 and not referrers):
            found.append(("http_error", f"{path} answers HTTP {page.status}", ""))
        elif page.status >= 400:
            found.append(("broken_link", f"Broken link: {path} answers HTTP {page.status}", ""))
        elif page.status == 0 and referrers:
            found.append(("broken_link", f"Broken link: {path} does not load", page.error))
        html = rec.content_type in ("text/html", "application/xhtml+xml")
        # Error pages are loaded too (for their screenshot), when they are text of any kind.
        shown = html or (page.status >= 400 and rec.content_type.startswith("text/"))
        if self.browser is not None and shown:
            visit = await self.browser.visit(page.url, screenshot_if=bool(found))
            if visit.error:
                await self.store.error(f"{page.url}: browser: {visit.error}")
            rec.console_errors = visit.console_errors
            if visit.console_errors:
                n = len(visit.console_errors)
                title = f"{path}: {n} console error{'s' * (n > 1)}: {visit.console_errors[0]}"
                found.append(("console_error", title[:300], "\n".join(visit.console_errors)))
            if visit.png:
                rec.screenshot_url = await self._store_screenshot(visit.png)
        for kind, title, detail in found:
            rec.problems.append(kind)
            await self._report(page, kind, title, detail, referrers, rec.screenshot_url)
        done = len(self.records)
        await self.ctx.progress(
            min(done / self.p.max_pages, 0.99), pages_crawled=done, bugs_found=len(self.bugs)
        )
        await self.store.progress(pages_crawled=done, bugs_found=len(self.bugs))

    async def _report(
        self, page: Page, kind: BugKind, title: str, detail: str, referrers: list[str], shot: str
    ) -> None:
        event = BugFound(
            id=bug_id(self.p.session_id, page.url, kind),
            key=self.p.session_id,
            source="qa.crawl",
            session_id=self.p.session_id,
            kind=kind,
            url=page.url,
            status=page.status,
            title=title[:300],
            detail=detail[:8000],
            linked_from=referrers[:20],
            screenshot_url=shot,
            task_id=self.ctx.task_id,
        )
        self.bugs[event.id] = event
        await self.ctx.producer.publish(event)

    async def _store_screenshot(self, png: bytes) -> str:
        s = self.s
        if not s.s3_bucket:
            return ""
        sha = await stage(self.ctx.redis, self.ctx.keys, png)
        url = object_url(s, _keys.object_key(s.s3_prefix, self.p.session_id, sha))
        if sha not in self.screenshots:
            self.screenshots.add(sha)
            await _submit.submit(
                self.ctx,
                "screenshot.upload",
                ScreenshotUpload(session_id=self.p.session_id, sha256=sha),
                task_id=_submit.derived_task_id(self.p.session_id, f"screenshot {sha}"),
            )
        return url

    def result(self, status: str, reason: str, started: float) -> dict[str, Any]:
        crawl = self.crawl
        listed = sorted(self.records, key=lambda r: (r.depth, r.url))[:MAX_LISTED_PAGES]
        return {
            "session_id": self.p.session_id,
            "base_url": self.p.base_url,
            "status": status,
            "reason": reason,
            "pages_crawled": len(self.records),
            "bugs_found": len(self.bugs),
            "browser": self.browser_note,
            "robots": crawl.robots.how if crawl.robots else "",
            "skipped": dict(crawl.skipped),
            "screenshots": len(self.screenshots),
            "elapsed_s": round(time.monotonic() - started, 3),
            "pages": [dataclasses.asdict(r) for r in listed],
            "pages_listed": len(listed),
            "bugs": [
                {"id": b.id, "kind": b.kind, "url": b.url, "status": b.status, "title": b.title}
                for b in self.bugs.values()
            ],
        }


@contextlib.asynccontextmanager
async def _maybe_browser(run: _Session, usable: bool) -> AsyncIterator[None]:
    if not usable:
        yield
        return
    try:
        browser = await Browser(run.s).__aenter__()
    except Exception as e:  # Chromium would not start: crawl without it (or fail if required)
        run.browser_note = f"unavailable: Chromium did not start: {str(e).splitlines()[0][:200]}"
        if run.s.browser == "required":
            raise CallTransient(run.browser_note) from e
        yield
        return
    run.browser = browser
    try:
        yield
    finally:
        run.browser = None
        await browser.__aexit__()


async def check_host(url: str, s: QaSettings) -> None:
    """Refuse (``Permanent``) a site whose host resolves to a private, loopback, link-local
    or otherwise special address, unless ``allow_private_networks``. A name that does not
    resolve now is ``CallTransient``."""
    if s.allow_private_networks:
        return
    _, host, port = origin_of(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise CallTransient(f"base_url: {host} does not resolve: {e}") from e
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise Permanent(
                f"base_url: {host} is {ip}, not a public address "
                "(STREAMPROC_QA_ALLOW_PRIVATE_NETWORKS=1 allows crawling it)"
            )


async def crawl_session(p: CrawlRequest, ctx: TaskContext) -> dict[str, Any]:
    s = settings()
    if p.max_pages > s.max_pages_limit or p.max_depth > s.max_depth_limit:
        raise Permanent(
            f"max_pages {p.max_pages} / max_depth {p.max_depth}: this service allows at most "
            f"{s.max_pages_limit} pages and depth {s.max_depth_limit}"
        )
    await check_host(p.base_url, s)
    usable, note = availability(s, p.browser)
    if s.browser == "required" and not usable and p.browser:
        raise Permanent(f"STREAMPROC_QA_BROWSER=required but Chromium is {note}")
    started = time.monotonic()
    crawl = Crawl(
        [p.base_url, *p.start_urls],
        max_pages=p.max_pages,
        max_depth=p.max_depth,
        s=s,
        deadline=started + p.time_budget_s if p.time_budget_s else None,
    )
    run = _Session(p, ctx, s, note, crawl)
    crawl.on_page = run.on_page
    await run.store.start(task_id=ctx.task_id, base_url=p.base_url, attempt=ctx.attempt)
    status, reason = "completed", ""
    try:
        async with _maybe_browser(run, usable):
            job = asyncio.create_task(crawl.run(), name=f"qa-crawl-{p.session_id}")
            try:
                # Shielded: the soft limit arrives here as SoftTimeLimit; the crawl is then
                # cancelled below and its pages so far are kept.
                await asyncio.shield(job)
            except SoftTimeLimit:
                status, reason = "partial", "the soft time limit was reached"
            finally:
                if not job.done():
                    job.cancel()
                    await asyncio.wait([job])  # its pages so far stay in crawl.pages
        if status == "completed" and crawl.stopped_early:
            status, reason = "partial", f"time_budget_s ({p.time_budget_s:g} s) was reached"
        if status == "partial":
            pass  # what was found in time is the answer, whatever it is
        elif crawl.robots is not None and not crawl.robots.reachable:
            raise CallTransient(f"{p.base_url} does not answer: {crawl.robots.how}")
        elif (first := crawl.pages.get(crawl.start_urls[0])) is not None and first.status == 0:
            raise CallTransient(f"{p.base_url} does not answer: {first.error}")
    except asyncio.CancelledError:
        why = "cancelled" if ctx.cancel_requested else "interrupted"
        with contextlib.suppress(Exception):
            await asyncio.shield(
                run.store.finish(why, pages_crawled=len(run.records), bugs_found=len(run.bugs))
            )
        raise
    except Exception as e:
        final = isinstance(e, Permanent) or ctx.attempt >= MAX_RETRIES
        await run.store.finish(
            "failed" if final else "retrying",
            pages_crawled=len(run.records),
            bugs_found=len(run.bugs),
            error=f"attempt {ctx.attempt + 1}: {type(e).__name__}: {e}",
        )
        raise
    await run.store.finish(status, pages_crawled=len(run.records), bugs_found=len(run.bugs))
    ctx.log.info(
        "qa_crawl_done",
        session_id=p.session_id,
        status=status,
        pages=len(run.records),
        bugs=len(run.bugs),
    )
    return run.result(status, reason, started)
