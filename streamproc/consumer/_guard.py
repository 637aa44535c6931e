"""One view of Redis' health for a consumer: ready or not, since when, and what to do.

Every Redis step of the consumer runs through ``RedisGuard.until_up``. Errors that mean "not
now" make the step back off and try again, never crash the consumer:

- the connection is down or timed out (``REDIS_DOWN``);
- Redis answers but refuses for the moment: OOM (maxmemory under ``noeviction``), READONLY
  (a replica after failover), LOADING, BUSY (a long script), MASTERDOWN, TRYAGAIN;
- NOGROUP / UNBLOCKED / "no such key" (XINFO in a script): the group or stream is gone
  (FLUSHALL, restart without persistence): the guard's ``on_nogroup`` callback recreates them.

Anything else is a bug or a misconfiguration and propagates. While steps fail the consumer
reports not-ready; other steps keep doing what Redis still allows (XACK, XTRIM under OOM).
``may_reclaim`` tells the reclaimer whether owners have had a renewal period since start and
since the last unavailable→available transition.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from streamproc._backoff import Backoff
from streamproc.connection import REDIS_DOWN

__all__ = ("GaveUp", "RedisGuard", "error_text", "is_not_now")

log = structlog.get_logger("streamproc.consumer")

T = TypeVar("T")

_NOT_NOW_CLASSES = (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
_NOT_NOW_PREFIXES = ("OOM ", "READONLY", "LOADING", "BUSY ", "MASTERDOWN", "TRYAGAIN")


def is_not_now(e: BaseException) -> bool:
    """True for replies that mean Redis cannot do this now but will later (not a bug)."""
    if isinstance(e, _NOT_NOW_CLASSES):
        return True
    if isinstance(e, ResponseError):
        text = str(e)
        # Errors raised inside a script keep their code; redis-py strips known codes.
        return text.startswith(_NOT_NOW_PREFIXES) or "command not allowed when used memory" in text
    return False


_CODES = {
    OutOfMemoryError: "OOM",
    ReadOnlyError: "READONLY",
    BusyLoadingError: "LOADING",
    MasterDownError: "MASTERDOWN",
    TryAgainError: "TRYAGAIN",
}


def error_text(e: BaseException) -> str:
    """The error as Redis said it (redis-py strips the code of the errors it knows)."""
    code = _CODES.get(type(e), "")
    text = str(e)[:300]
    if code and not text.startswith(code):
        return f"{code} {text}"
    return text if isinstance(e, ResponseError) else f"{type(e).__name__}: {text}"


class GaveUp(Exception):
    """``until_up`` stopped trying because ``give_up()`` said so (stopping while Redis is down)."""


class RedisGuard:
    """Ready flag, down-since, and the retry loop every Redis step of a consumer runs in.

    Readiness is per step: the consumer is ready while no step is failing (under OOM the
    reader may still read while the settler cannot write: that is not ready).
    """

    def __init__(self, *, group: str, consumer: str, settle_period_s: float) -> None:
        self.group, self.consumer = group, consumer
        self.down_since: float | None = time.monotonic()
        #: When Redis became available (start, or the end of the last outage), monotonic.
        self.available_since = time.monotonic()
        self.reason = "starting"
        self._failing: set[str] = {"start"}
        self._period_s = settle_period_s
        #: Called on NOGROUP / UNBLOCKED before the next try (recreate groups, re-read).
        self.on_nogroup: Callable[[], None] = lambda: None

    @property
    def ready(self) -> bool:
        """Redis answers every step and the groups exist."""
        return not self._failing

    def may_reclaim(self) -> bool:
        """Owners had one renewal period since start or since the last outage ended."""
        return self.ready and time.monotonic() - self.available_since >= self._period_s

    def up(self, step: str) -> None:
        self._failing.discard(step)
        if not self._failing and self.down_since is not None:
            if self.reason != "starting":
                log.info(
                    "redis_available",
                    group=self.group,
                    down_s=round(time.monotonic() - self.down_since, 3),
                )
            self.down_since, self.reason = None, ""
            self.available_since = time.monotonic()

    def down(self, step: str, e: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("redis_unavailable", group=self.group, step=step, error=error_text(e))
        self._failing.add(step)
        self.reason = f"{step}: {error_text(e)}"

    async def until_up(
        self,
        step: str,
        call: Callable[[], Awaitable[T]],
        *,
        give_up: Callable[[], bool] | None = None,
        cap_s: float = 5.0,
        once: bool = False,
    ) -> T:
        """Run ``call`` until it succeeds, backing off (at most ``cap_s``) on outages; raise
        GaveUp when ``give_up()`` turns true during an outage, or after one outage with
        ``once`` (the step counts as down for that moment, then as not failing)."""
        backoff = Backoff(base_s=min(0.05, cap_s), cap_s=cap_s)
        while True:
            try:
                result = await call()
            except REDIS_DOWN as e:
                self.down(step, e)
            except ResponseError as e:
                if is_not_now(e):
                    self.down(step, e)
                elif str(e).startswith(("NOGROUP", "UNBLOCKED", "no such key")):
                    log.error("group_missing_recreating", group=self.group, error=str(e))
                    self.on_nogroup()
                else:
                    raise
            else:
                self.up(step)
                return result
            if once:  # a periodic step tried again next round: a blip, not a failing step
                self._failing.discard(step)
                raise GaveUp
            if give_up is not None and give_up():
                raise GaveUp
            await backoff.sleep()
