"""Calls to outside systems (webhooks, Slack, AWS), classified the way handlers need them.

Every outside call made from a handler goes through here so it has connect and read
timeouts, and its failure is one of three exceptions the engine already understands:

- ``CallTransient`` (a ``Retry``): timeouts, refused/reset connections, HTTP 5xx and 408,
  AWS throttling and server errors. Retried with the concern's backoff, then dead-lettered.
- ``CallRateLimited`` (a ``Defer``): HTTP 429. The destination's breaker is held for its
  Retry-After (seconds or an HTTP date; 1 s when absent, at most ``MAX_RETRY_AFTER_S``) and the
  event waits that long without using a retry attempt.
- ``CallPermanent`` (a ``Permanent``): any other 4xx, an invalid destination, AWS errors such
  as AccessDenied or MessageRejected. Dead-lettered at once with the status and an excerpt of
  the body.

Use it with a ``streamproc.breaker.Breaker`` per destination: ``guarded`` admits the call,
reports the outcome (transient failures count; permanent ones and 429s do not, since the
destination answered) and re-raises.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from streamproc.breaker import CLEAN, PROBE, Breaker, BreakerOpen
from streamproc.errors import Defer, Permanent, Retry

__all__ = (
    "MAX_RETRY_AFTER_S",
    "CallPermanent",
    "CallRateLimited",
    "CallTransient",
    "HttpResult",
    "Timeouts",
    "aws_failure",
    "check_status",
    "guarded",
    "http_post",
    "retry_after_s",
)

T = TypeVar("T")

#: The longest Retry-After honoured; a destination asking for more is waited on this long.
MAX_RETRY_AFTER_S = 3600.0
#: How much of a refusing response's body is kept (for the DLQ and the delivery log).
BODY_EXCERPT = 300


class CallTransient(Retry):
    """The call failed in a way that may pass: retry with backoff."""

    def __init__(self, reason: str, *, status: int = 0, body: str = "") -> None:
        self.status, self.body = status, body
        super().__init__(reason)


class CallRateLimited(Defer):
    """The destination asked to slow down (429): wait ``delay_s`` without using an attempt."""

    def __init__(self, reason: str, *, delay_s: float, status: int = 429, body: str = "") -> None:
        self.status, self.body = status, body
        super().__init__(reason, delay_s=delay_s)


class CallPermanent(Permanent):
    """The call can never succeed as it is (4xx, invalid destination): dead-letter it."""

    def __init__(self, reason: str, *, status: int = 0, body: str = "") -> None:
        self.status, self.body = status, body
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Connect and read timeouts, and a bound on the whole call."""

    connect_s: float = 3.0
    read_s: float = 10.0
    total_s: float = 30.0

    def aiohttp(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self.total_s, sock_connect=self.connect_s, sock_read=self.read_s
        )


@dataclass(frozen=True, slots=True)
class HttpResult:
    status: int
    body: str
    latency_s: float
    retry_after_s: float | None


def retry_after_s(value: str | None, *, default: float = 1.0) -> float:
    """A Retry-After header (delta seconds or an HTTP date) in seconds, within 0..MAX."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return default
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


async def http_post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeouts: Timeouts,
) -> HttpResult:
    """POST and read up to ``BODY_EXCERPT`` bytes of the answer.

    Network failures raise ``CallTransient``; an invalid URL raises ``CallPermanent``. Any
    HTTP status is returned: ``check_status`` says what it means.
    """
    started = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers=dict(headers), timeout=timeouts.aiohttp(), allow_redirects=False
        ) as resp:
            text = (await resp.content.read(BODY_EXCERPT)).decode("utf-8", "replace")
            retry = resp.headers.get("Retry-After")
            return HttpResult(
                status=resp.status,
                body=text,
                latency_s=time.perf_counter() - started,
                retry_after_s=retry_after_s(retry) if retry is not None else None,
            )
    except (aiohttp.InvalidURL, ValueError) as e:
        raise CallPermanent(f"invalid destination: {e}") from e
    except TimeoutError as e:
        raise CallTransient(f"timed out after {time.perf_counter() - started:.1f}s") from e
    except aiohttp.ClientError as e:
        raise CallTransient(f"{type(e).__name__}: {e}") from e


def check_status(result: HttpResult, what: str = "destination") -> None:
    """Raise the exception a status means; return for 2xx."""
    status = result.status
    if 200 <= status < 300:
        return
    detail = f"{what} answered {status}: {result.body[:BODY_EXCERPT]!r}"
    if status == 429:
        delay = result.retry_after_s if result.retry_after_s is not None else 1.0
        raise CallRateLimited(detail, delay_s=delay, body=result.body)
    if status >= 500 or status == 408:
        raise CallTransient(detail, status=status, body=result.body)
    raise CallPermanent(detail, status=status, body=result.body)


# botocore error codes that are worth retrying (throttling and server-side trouble).
_AWS_TRANSIENT = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)


def aws_failure(e: BaseException, what: str = "AWS") -> CallTransient | CallPermanent:
    """The engine's view of a boto3/botocore exception: transient or permanent."""
    import botocore.exceptions as bx  # type: ignore[import-untyped]

    if isinstance(e, bx.ClientError):
        err: dict[str, Any] = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{what}: {code}: {err.get('Message', '')}"[:BODY_EXCERPT]
        if code in _AWS_TRANSIENT or status >= 500 or status == 429:
            return CallTransient(detail, status=status, body=code)
        return CallPermanent(detail, status=status, body=code)
    if isinstance(
        e,
        bx.EndpointConnectionError
        | bx.ConnectTimeoutError
        | bx.ReadTimeoutError
        | bx.ConnectionClosedError,
    ):
        return CallTransient(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, bx.NoCredentialsError | bx.NoRegionError | bx.ParamValidationError):
        return CallPermanent(f"{what}: {type(e).__name__}: {e}")
    return CallTransient(f"{what}: {type(e).__name__}: {e}")


async def guarded(
    breaker: Breaker, call: Callable[[], Awaitable[T]], *, admitted: int | None = None
) -> T:
    """Run ``call`` behind ``breaker``: refused while open (``BreakerOpen``), and its outcome
    recorded. Transient failures count toward opening; a 429 holds the destination for its
    Retry-After; permanent failures leave the breaker as it was (the destination answered).

    A failed half-open probe raises ``BreakerOpen`` (a deferral, naming the error), not
    ``CallTransient``: the destination is down again, which says nothing about this event,
    so it uses none of the event's attempts. ``admitted``: the admission the caller already
    got (``Breaker.ask_with`` + ``verdict``, to share the round trip); asked here otherwise.
    """
    if admitted is None:
        admitted = await breaker.admit()
    try:
        result = await call()
    except CallRateLimited as e:
        await breaker.hold(e.delay_s or 1.0, str(e))
        if admitted != CLEAN:
            await breaker.success()  # it answered: a probe that got 429 closes the breaker
        raise
    except Exception as e:
        if isinstance(e, CallPermanent):
            if admitted != CLEAN:
                await breaker.success()
            raise
        error = str(e) if isinstance(e, CallTransient) else f"{type(e).__name__}: {e}"
        await breaker.failure(error)
        if admitted == PROBE:
            raise BreakerOpen(breaker.name, "open", breaker.cooldown_s, why=error) from e
        raise
    if admitted != CLEAN:
        await breaker.success()
    return result
