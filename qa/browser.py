"""Headless Chromium for a crawl session: each page's console errors, and its screenshot.

Debian's ``/usr/bin/chromium`` (``chromium_path``) driven by Playwright by its executable
path; Playwright's own browser downloads are never used. ``availability`` says whether it can
be used here and, when not, why (the crawl goes on without it and says so in its result).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from qa.settings import QaSettings

__all__ = ("Browser", "Visit", "availability")

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
#: Console errors kept per page.
MAX_CONSOLE = 20


def availability(s: QaSettings, wanted: bool = True) -> tuple[bool, str]:
    """(usable, what the session's result says about the browser)."""
    if s.browser == "off" or not wanted:
        return False, "off"
    if not os.access(s.chromium_path, os.X_OK):
        return False, f"unavailable: no executable {s.chromium_path}"
    if importlib.util.find_spec("playwright") is None:
        return False, "unavailable: the playwright package is not installed"
    return True, f"chromium ({s.chromium_path})"


@dataclass
class Visit:
    console_errors: list[str] = field(default_factory=list)
    png: bytes = b""
    error: str = ""


class Browser:
    """One Chromium for one session; ``visit`` pages with it (at most ``concurrency`` at once)."""

    def __init__(self, s: QaSettings) -> None:
        self.s = s
        self._sem = asyncio.Semaphore(s.per_host_concurrency)
        self._pw: Any = None
        self._browser: Any = None
        self._context: Any = None

    async def __aenter__(self) -> Browser:
        from playwright.async_api import async_playwright

        self._pw = await async_playwright().start()
        try:
            self._browser = await self._pw.chromium.launch(
                executable_path=self.s.chromium_path, headless=True, args=_ARGS
            )
            self._context = await self._browser.new_context(
                viewport={"width": 1280, "height": 800}, user_agent=self.s.user_agent
            )
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for closing in (self._context, self._browser):
            if closing is not None:
                with contextlib.suppress(Exception):  # already gone (crashed)
                    await closing.close()
        if self._pw is not None:
            await self._pw.stop()
        self._pw = self._browser = self._context = None

    async def visit(self, url: str, *, screenshot_if: bool) -> Visit:
        """Load ``url``; its console errors and uncaught exceptions, and a PNG of the viewport
        when ``screenshot_if`` or when it logged errors. A page that fails to load in the
        browser is ``Visit.error`` (the HTTP fetch already judged the page)."""
        out = Visit()

        def on_console(msg: Any) -> None:
            if msg.type != "error" or len(out.console_errors) >= MAX_CONSOLE:
                return
            where = (msg.location or {}).get("url", "")
            # The page's own HTTP status is reported by the crawl, not as a console error;
            # the favicon is the browser's own request, not the page's.
            if msg.text.startswith("Failed to load resource") and (
                where == url or urllib.parse.urlsplit(where).path == "/favicon.ico"
            ):
                return
            out.console_errors.append(f"{msg.text[:500]}" + (f" ({where})" if where else ""))

        def on_page_error(err: Any) -> None:
            if len(out.console_errors) < MAX_CONSOLE:
                out.console_errors.append(f"uncaught: {str(err)[:500]}")

        async with self._sem:
            page = await self._context.new_page()
            try:
                page.on("console", on_console)
                page.on("pageerror", on_page_error)
                await page.goto(url, wait_until="load", timeout=self.s.browser_timeout_s * 1000)
                if screenshot_if or out.console_errors:
                    out.png = await page.screenshot(
                        type="png", timeout=self.s.browser_timeout_s * 1000
                    )
            except Exception as e:  # Playwright's TimeoutError/Error: the page, not the session
                out.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            finally:
                with contextlib.suppress(Exception):  # the browser went away meanwhile
                    await page.close()
        return out
