"""The QA tasks' settings: ``STREAMPROC_QA_<FIELD>``, read once by ``qa.configure_from_env``.

Frozen and checked at construction (an unknown field is an error); the tasks read them with
``settings()``. Tests install their own with ``use_settings``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ("QaSettings", "settings", "use_settings")

_DAY_S = 86_400


class QaSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``STREAMPROC_QA_<FIELD>``."""

    # ------------------------------------------------------------------ crawl
    #: The most pages (and the deepest level) any session may ask for.
    max_pages_limit: int = 2_000
    max_depth_limit: int = 20
    #: Requests in flight to one host at once, and requests started per second (0 = no limit;
    #: a robots.txt ``Crawl-delay`` slows this further, never the reverse).
    per_host_concurrency: int = 4
    per_host_rate_per_s: float = 5.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    #: Bound on one request, redirects included.
    page_timeout_s: float = 30.0
    #: A page's body is read up to this many bytes (links past it are not seen).
    max_page_bytes: int = 5 * 2**20
    max_redirects: int = 5
    user_agent: str = "streamproc-qa/1.0"
    #: ``auto``: load pages in headless Chromium when it is there (console errors,
    #: screenshots); ``off``: never; ``required``: fail the session without it.
    browser: Literal["auto", "off", "required"] = "auto"
    chromium_path: str = "/usr/bin/chromium"
    browser_timeout_s: float = 20.0
    #: Crawl sites whose host resolves to a private, loopback or link-local address (an
    #: intranet, 127.0.0.1, the cloud's metadata service)? Off: such a session fails at once.
    allow_private_networks: bool = False
    #: The session's progress hash lives this long after its last update.
    session_ttl_s: int = _DAY_S
    # ------------------------------------------------------------------ tickets
    linear_url: str = "https://api.linear.app/graphql"
    linear_api_key: str = ""
    linear_team_id: str = ""
    tracker_connect_timeout_s: float = 3.0
    tracker_read_timeout_s: float = 15.0
    #: A bug seen again (the same fingerprint: kind, page URL, console message) within this
    #: many days of its last sighting is not filed again, only counted (docs/qa.md).
    ticket_dedup_days: float = 30.0
    # ------------------------------------------------------------------ screenshots
    #: Empty: screenshots are taken (when Chromium is there) but not stored.
    s3_bucket: str = ""
    s3_prefix: str = "qa"
    #: One endpoint (MinIO, a moto server); empty = AWS.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    #: Base of the URLs people open (a CDN); empty: the bucket's own URL.
    s3_public_url: str = ""
    s3_connect_timeout_s: float = 3.0
    s3_read_timeout_s: float = 20.0
    #: A screenshot waits for its upload in Redis this long.
    staged_ttl_s: int = 6 * 3600
    # ------------------------------------------------------------------ both outside calls
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    # ------------------------------------------------------------------ cleanup
    #: Finished sessions' screenshots, ticket records and state are removed after this.
    retention_days: float = 7.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_pages_limit <= 100_000 or not 0 <= self.max_depth_limit <= 100:
            raise ValueError("max_pages_limit within 1..100000, max_depth_limit within 0..100")
        if not 1 <= self.per_host_concurrency <= 64 or not 0 <= self.per_host_rate_per_s <= 1000:
            raise ValueError("per_host_concurrency within 1..64, per_host_rate_per_s 0..1000")
        for name in (
            "connect_timeout_s",
            "read_timeout_s",
            "page_timeout_s",
            "browser_timeout_s",
            "tracker_connect_timeout_s",
            "tracker_read_timeout_s",
            "s3_connect_timeout_s",
            "s3_read_timeout_s",
        ):
            if not 0 < getattr(self, name) <= 600:
                raise ValueError(f"{name} within 0..600 s")
        if not 1024 <= self.max_page_bytes <= 100 * 2**20 or not 0 <= self.max_redirects <= 20:
            raise ValueError("max_page_bytes within 1 KiB..100 MiB, max_redirects within 0..20")
        if not self.user_agent or not self.user_agent.isprintable() or len(self.user_agent) > 200:
            raise ValueError("user_agent: 1 to 200 printable characters")
        if not 60 <= self.session_ttl_s <= 30 * _DAY_S or not 60 <= self.staged_ttl_s <= _DAY_S:
            raise ValueError("session_ttl_s within 60..2592000, staged_ttl_s within 60..86400")
        if not self.linear_url.startswith(("http://", "https://")):
            raise ValueError("linear_url: an http(s) URL")
        if self.s3_prefix.startswith("/") or ".." in self.s3_prefix.split("/"):
            raise ValueError("s3_prefix: a relative key prefix without '..'")
        if not 1 <= self.breaker_threshold <= 1000 or self.breaker_cooldown_s <= 0:
            raise ValueError("breaker_threshold within 1..1000, breaker_cooldown_s > 0")
        if not 0 < self.retention_days <= 3650:
            raise ValueError("retention_days within 0..3650")
        if not 0 < self.ticket_dedup_days <= 3650:
            raise ValueError("ticket_dedup_days within 0..3650")

    @property
    def tracker_configured(self) -> bool:
        return bool(self.linear_api_key and self.linear_team_id)


_settings: QaSettings | None = None


def use_settings(s: QaSettings | None) -> QaSettings:
    """Use ``s`` from now on (None: the defaults); returns what is in use."""
    global _settings
    _settings = s
    return settings()


def settings() -> QaSettings:
    return _settings or QaSettings()
