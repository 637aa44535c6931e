"""The crawler: breadth-first over one origin, within a page and a depth budget, politely.

- **Scope**: only URLs of the start URL's origin (scheme, host, port) are fetched; links
  elsewhere are counted, never requested. A redirect is a page (its 3xx status) whose one
  link is its target, so the target is fetched once, at the next depth, if it is on the
  origin and allowed; a redirect elsewhere is ``redirected off-site`` and goes no further.
- **Budget**: level by level (depth 0 = the start URLs), in the order links were found, until
  ``max_pages`` pages were fetched; links found at ``max_depth`` are not followed. What was
  left out is counted in ``Crawl.skipped`` (``beyond_depth``, ``beyond_max_pages``,
  ``robots``, ``off_site``).
- **robots.txt** (RFC 9309, read with ``urllib.robotparser``): a disallowed URL is never
  fetched; a robots.txt that answers 4xx allows everything, one that fails or answers 5xx
  disallows everything; ``Crawl-delay`` slows the host down (never speeds it up).
- **Per host**: at most ``per_host_concurrency`` requests in flight, started at most
  ``per_host_rate_per_s`` a second (``HostLimiter``). Connect, read and total timeouts.

Each page's outcome is a ``Page`` (status, load time, links, the error when it did not
answer); ``on_page`` is awaited for each as it completes (the task finds problems there). The
crawl stops starting pages once ``deadline`` (a ``time.monotonic()`` value) passed, and what
it did is in ``Crawl.pages`` whenever it stops, also when it is cancelled.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import urllib.robotparser
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import aiohttp

from qa.settings import QaSettings

__all__ = ("Crawl", "HostLimiter", "Page", "Robots", "normalize", "origin_of")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: RFC 9309: crawlers must read at least 500 KiB of a robots.txt.
_MAX_ROBOTS_BYTES = 512 * 1024


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ValueError for anything else."""
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not u.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url[:200]!r}")
    return scheme, u.hostname.lower(), u.port or _DEFAULT_PORTS[scheme]


def normalize(url: str) -> str | None:
    """``url`` without fragment, default port and with a path; None if not http(s)."""
    try:
        u = urllib.parse.urlsplit(url.strip())
        scheme, host, port = origin_of(url.strip())
    except ValueError:
        return None
    if u.username or u.password:
        return None
    netloc = host if port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]" if port == _DEFAULT_PORTS[scheme] else f"[{host}]:{port}"
    return urllib.parse.urlunsplit((scheme, netloc, u.path or "/", u.query, ""))


@dataclass
class Page:
    """One fetched URL."""

    url: str
    depth: int
    #: HTTP status of the last answer; 0 when there was none (``error`` says why).
    status: int = 0
    load_ms: float = 0.0
    content_type: str = ""
    error: str = ""
    #: Links of the page, absolute and normalized, in order, each once (all origins).
    links: list[str] = field(default_factory=list)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href")


def extract_links(html: str, page_url: str) -> list[str]:
    parser = _Links()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # HTMLParser is lenient; keep what was read before anything odd
        pass
    base = urllib.parse.urljoin(page_url, parser.base) if parser.base else page_url
    out: dict[str, None] = {}
    for href in parser.hrefs:
        if href.strip().lower().startswith(("javascript:", "mailto:", "tel:", "data:")):
            continue
        n = normalize(urllib.parse.urljoin(base, href.strip()))
        if n is not None:
            out[n] = None
    return list(out)


class HostLimiter:
    """At most ``concurrency`` holders at once, starting at most ``rate_per_s`` a second."""

    def __init__(self, concurrency: int, rate_per_s: float) -> None:
        self._sem = asyncio.Semaphore(concurrency)
        self.interval_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    def slow_to(self, interval_s: float) -> None:
        self.interval_s = max(self.interval_s, interval_s)

    async def __aenter__(self) -> None:
        await self._sem.acquire()
        try:
            if self.interval_s:
                async with self._lock:
                    now = time.monotonic()
                    wait = self._next - now
                    self._next = max(now, self._next) + self.interval_s
                if wait > 0:
                    await asyncio.sleep(wait)
        except BaseException:
            self._sem.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._sem.release()


class Robots:
    """A site's robots.txt rules for our user agent."""

    def __init__(
        self, parser: urllib.robotparser.RobotFileParser, user_agent: str, how: str
    ) -> None:
        self.parser, self.user_agent, self.how = parser, user_agent, how
        #: False when robots.txt could not be read at all (no answer, or 5xx): the site is
        #: down, and nothing is fetched (RFC 9309: "unreachable" means disallow).
        self.reachable = not how.startswith(("robots.txt unreachable", "robots.txt answered 5"))

    def allowed(self, url: str) -> bool:
        return self.parser.can_fetch(self.user_agent, url)

    def crawl_delay_s(self) -> float:
        delay = self.parser.crawl_delay(self.user_agent)
        return float(delay) if delay else 0.0

    @classmethod
    async def load(
        cls,
        session: aiohttp.ClientSession,
        origin_url: str,
        s: QaSettings,
        limiter: HostLimiter,
    ) -> Robots:
        url = urllib.parse.urljoin(origin_url, "/robots.txt")
        # typeshed lacks the parser's allow_all/disallow_all flags: set them through Any.
        parser: Any = urllib.robotparser.RobotFileParser(url)
        try:
            async with (
                limiter,
                session.get(url, allow_redirects=True, max_redirects=s.max_redirects) as r,
            ):
                if r.status >= 500:
                    parser.disallow_all, how = True, f"robots.txt answered {r.status}: disallow"
                elif r.status >= 400:
                    parser.allow_all, how = True, f"robots.txt answered {r.status}: allow"
                else:
                    body = bytearray()
                    async for chunk in r.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) >= _MAX_ROBOTS_BYTES:
                            break
                    text = bytes(body[:_MAX_ROBOTS_BYTES]).decode("utf-8", "replace")
                    parser.parse(text.splitlines())
                    how = "robots.txt read"
        except (aiohttp.ClientError, TimeoutError) as e:
            parser.disallow_all = True
            how = f"robots.txt unreachable ({type(e).__name__}: {e}): disallow"[:300]
        return cls(parser, s.user_agent, how)


OnPage = Callable[[Page], Awaitable[None]]


class Crawl:
    """One breadth-first crawl (see the module's docstring)."""

    def __init__(
        self,
        start_urls: list[str],
        *,
        max_pages: int,
        max_depth: int,
        s: QaSettings,
        on_page: OnPage | None = None,
        deadline: float | None = None,
    ) -> None:
        self.start_urls = [u for u in (normalize(x) for x in start_urls) if u]
        if not self.start_urls:
            raise ValueError("no http(s) start URL")
        self.origin = origin_of(self.start_urls[0])
        self.max_pages, self.max_depth, self.s = max_pages, max_depth, s
        self.on_page, self.deadline = on_page, deadline
        self.pages: dict[str, Page] = {}
        #: target URL → pages linking to it (first 20), for every URL of the origin.
        self.linked_from: dict[str, list[str]] = {}
        self.skipped = {"beyond_depth": 0, "beyond_max_pages": 0, "robots": 0, "off_site": 0}
        self.stopped_early = False
        self.robots: Robots | None = None
        self.limiter = HostLimiter(s.per_host_concurrency, s.per_host_rate_per_s)

    def same_origin(self, url: str) -> bool:
        try:
            return origin_of(url) == self.origin
        except ValueError:
            return False

    async def run(self) -> dict[str, Page]:
        s = self.s
        timeout = aiohttp.ClientTimeout(
            total=s.page_timeout_s, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
        )
        connector = aiohttp.TCPConnector(limit_per_host=s.per_host_concurrency, limit=100)
        async with aiohttp.ClientSession(
            timeout=timeout,
            connector=connector,
            headers={"User-Agent": s.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            self.robots = await Robots.load(session, self.start_urls[0], s, self.limiter)
            if not self.robots.reachable:
                return self.pages
            if delay := self.robots.crawl_delay_s():
                self.limiter.slow_to(delay)
            frontier: list[str] = []
            for u in self.start_urls:
                if self.same_origin(u) and self.robots.allowed(u) and u not in frontier:
                    frontier.append(u)
                elif not self.same_origin(u):
                    self.skipped["off_site"] += 1
                else:
                    self.skipped["robots"] += 1
            seen = set(frontier)
            for depth in range(self.max_depth + 1):
                room = self.max_pages - len(self.pages)
                batch, rest = frontier[:room], frontier[room:]
                self.skipped["beyond_max_pages"] += len(rest)
                await self._level(session, batch, depth)
                if self.stopped_early or not batch:
                    break
                frontier = []
                for url in batch:
                    for link in self.pages[url].links:
                        if not self.same_origin(link):
                            self.skipped["off_site"] += 1
                            continue
                        refs = self.linked_from.setdefault(link, [])
                        if len(refs) < 20 and url not in refs:
                            refs.append(url)
                        if link in seen:
                            continue
                        seen.add(link)
                        if depth + 1 > self.max_depth:
                            self.skipped["beyond_depth"] += 1
                        elif not self.robots.allowed(link):
                            self.skipped["robots"] += 1
                        else:
                            frontier.append(link)
        return self.pages

    async def _level(self, session: aiohttp.ClientSession, batch: list[str], depth: int) -> None:
        queue = list(reversed(batch))

        async def worker() -> None:
            while queue:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.stopped_early = True
                    return
                url = queue.pop()
                page = Page(url=url, depth=depth)
                self.pages[url] = page
                async with self.limiter:
                    await self._fetch(session, page)
                if self.on_page is not None:
                    await self.on_page(page)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.s.per_host_concurrency, len(batch))):
                    tg.create_task(worker())
        except ExceptionGroup as eg:
            # The first failure as itself (a Permanent, a Defer keep their meaning for the
            # task runner); the others were cancelled with it or failed the same way.
            raise eg.exceptions[0] from eg

    async def _fetch(self, session: aiohttp.ClientSession, page: Page) -> None:
        """GET the page; a redirect is a page whose one link is its target (fetched once,
        like any link, if it is on the origin and allowed)."""
        s = self.s
        started = time.perf_counter()
        try:
            async with session.get(page.url, allow_redirects=False) as resp:
                page.status = resp.status
                page.content_type = resp.headers.get("Content-Type", "")
                location = resp.headers.get("Location")
                if resp.status in _REDIRECTS and location:
                    target = normalize(urllib.parse.urljoin(page.url, location))
                    if target is None or not self.same_origin(target):
                        page.error = f"redirected off-site to {location[:200]}"
                    else:
                        page.links = [target]
                    return
                if resp.status < 400 and page.content_type.startswith(_HTML_TYPES):
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) >= s.max_page_bytes:
                            break
                    text = bytes(body[: s.max_page_bytes]).decode(
                        resp.charset or "utf-8", "replace"
                    )
                    page.links = extract_links(text, page.url)
        except TimeoutError:
            page.status, page.error = 0, f"timed out after {time.perf_counter() - started:.1f}s"
        except (aiohttp.ClientError, ValueError, LookupError) as e:
            page.status, page.error = 0, f"{type(e).__name__}: {e}"[:300]
        finally:
            page.load_ms = round((time.perf_counter() - started) * 1000, 1)
