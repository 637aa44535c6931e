"""Settings of the delivery side, from ``STREAMPROC_NOTIFY_<FIELD>``."""

from __future__ import annotations

import msgspec

__all__ = ("NotifySettings",)


class NotifySettings(msgspec.Struct, frozen=True, kw_only=True):
    #: Timeouts of every webhook / Slack call (connect, read, whole call).
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    #: Consecutive transient failures that open a destination's breaker, and its cool-down.
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    #: Where links in Slack messages and emails point (the dashboard).
    base_url: str = "http://127.0.0.1:8080"
    #: SES: region, endpoint (moto, a VPC endpoint; empty = AWS) and the From address.
    ses_region: str = "us-east-1"
    ses_endpoint_url: str = ""
    ses_sender: str = "streamproc@example.com"
    #: Delivery log: entries kept in the log stream (approximately), and per notification.
    log_maxlen: int = 100_000
    log_ttl_s: int = 7 * 86400
    #: How long a delivery is remembered as sent (redelivery after this may send again).
    sent_ttl_s: int = 7 * 86400
    #: Entries kept in each cluster's live feed (approximately).
    feed_maxlen: int = 10_000

    def __post_init__(self) -> None:
        for name, low, high in _BOUNDS:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be within {low:g}..{high:g}")


#: (field, lowest, highest): past these a value is a mistake (and Redis would refuse some).
_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("connect_timeout_s", 0.001, 3600),
    ("read_timeout_s", 0.001, 3600),
    ("total_timeout_s", 0.001, 3600),
    ("breaker_threshold", 1, 1_000_000),
    ("breaker_cooldown_s", 0.001, 86_400),
    ("log_maxlen", 1, 1_000_000_000),
    ("log_ttl_s", 1, 10 * 365 * 86_400),
    ("sent_ttl_s", 1, 10 * 365 * 86_400),
    ("feed_maxlen", 1, 100_000_000),
)
