"""The email channel: Amazon SES ``SendRawEmail`` through boto3.

Every email is a MIME message built with the standard library (``email``, ``policy.SMTP``)
and sent raw: From is ``NotifySettings.ses_sender`` (a verified SES identity), To is the
subscription's address. Bodies are quoted-printable and headers RFC 2047-encoded, so the
message is 7-bit ASCII with lines under SES's 1,000-character limit.

**Headers.** ``Message-ID`` is ``<delivery id@streamproc>``, the same on every resend of a
delivery so a relay or mailbox that keeps it can drop copies; SES itself replaces
``Message-ID`` (and ``Date``) with its own (SES developer guide, "Amazon SES header fields"),
so for mail sent through SES the ids to dedupe or trace by are ``X-Streamproc-Delivery-Id``
and ``X-Streamproc-Notification-Id``, which SES keeps. ``Auto-Submitted: auto-generated``
tells auto-responders not to answer. The subject and every header value are one line: CR,
LF and other control characters become spaces and a subject is cut at
``SUBJECT_MAX_CHARS``; the policy folds what is long.

**Alerts** (every type but ``report.ready``): subject ``[severity] cluster: title`` (no
cluster part without one), a text part and an HTML part (escaped title and body, severity,
cluster, a link to the message's http(s) link or else ``base_url``).

**The weekly report** (``report.ready``): the HTML body is the report's ``index.html`` (read
from ``report_location``) with each ``<img src="NAME.png">`` that names a file next to it
rewritten to ``cid:`` and the PNG attached inline (multipart/related, ``Content-ID``), so the
charts show without fetching anything; a text part carries the title, body and link. If the
message would exceed ``MAX_RAW_BYTES`` (SES's 10 MB, counted on the MIME message as sent),
the email instead links the report and its charts: presigned S3 GET URLs valid
``PRESIGN_EXPIRES_S`` (7 days, the SigV4 maximum; less when the process runs on temporary
credentials, which end first) when they are on S3, else the dashboard link.

**Artefacts** are read with ``read_artefact(location) -> bytes``; the default is this
process's render store (``consumers.renders.runtime().store.read``, from the same
``STREAMPROC_RENDER_*`` settings as the render concern): ``file://`` URIs under its folder,
``s3://`` objects under its bucket and prefix, and nothing else, so a forged location cannot
mail out an arbitrary file. ``presign_artefact(location) -> URL | None`` gives the links of the
large-report fallback; the default presigns with an S3 client of the render settings' endpoint
and region, in SigV4 (boto3 presigns SigV2 unless told, which buckets made since 2020 refuse),
and gives ``None`` for files on disk. A missing artefact, or one outside the store, is a
``CallPermanent``.

**Failures.** The SES client is built once (lazily) with the settings' connect/read timeouts
and a single attempt (``total_max_attempts=1``: botocore's ``max_attempts`` counts retries, so
1 there would mean two tries); the engine retries by error class. Every boto3/botocore error
becomes ``outbound.aws_failure(e, "SES")``: throttling, 5xx and network errors are
``CallTransient``, MessageRejected (an unverified sender), AccessDenied and missing
credentials ``CallPermanent``. The blocking calls run in ``asyncio.to_thread``; a cancelled
send may still complete in its thread (the delivery is then at least once).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import html
import re
import threading
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import structlog

from consumers import renders
from notifications.settings import NotifySettings
from notifications.subscriptions import Subscription
from schemas.notify import Message
from streamproc.outbound import CallPermanent, CallTransient, aws_failure

__all__ = ("MAX_RAW_BYTES", "PRESIGN_EXPIRES_S", "SUBJECT_MAX_CHARS", "EmailSender")

log = structlog.get_logger("notifications.email")

#: SES's limit on a message (10 MB with its attachments), in decimal bytes to keep a margin.
MAX_RAW_BYTES = 10_000_000
#: Lifetime of the presigned links of a report too large to email (the SigV4 maximum).
PRESIGN_EXPIRES_S = 7 * 86400
#: A longer subject is cut (with an ellipsis).
SUBJECT_MAX_CHARS = 200
_REPORT_TYPE = "report.ready"
_DOMAIN = "streamproc"
_ID_RE = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: ``<img ... src="...">``: group 1 up to the value, 2 the quote, 3 the value.
_IMG_SRC_RE = re.compile(r"""(<img\b[^>]*?\bsrc\s*=\s*)(["'])([^"'<>]*)\2""", re.IGNORECASE)

ReadArtefact = Callable[[str], bytes]
PresignArtefact = Callable[[str], str | None]


class EmailSender:
    """Sends notifications by email through SES. Its boto3 clients (SES; S3 to presign the links
    of a report too large to email) are built on first use and closed by ``close``."""

    def __init__(
        self,
        settings: NotifySettings,
        *,
        read_artefact: ReadArtefact | None = None,
        presign_artefact: PresignArtefact | None = None,
    ) -> None:
        self.settings = settings
        self._read_artefact = read_artefact
        self._presign_artefact = presign_artefact
        self._ses_client: Any = None
        self._s3_client: tuple[tuple[str, str], Any] | None = None  # (endpoint, region), client
        self._client_lock = threading.Lock()

    async def send(self, sub: Subscription, message: Message, *, delivery_id: str) -> str:
        """Send one email; return SES's MessageId. Raises CallTransient / CallPermanent."""
        headers = _headers(self.settings.ses_sender, sub.destination, message, delivery_id)
        if message.type == _REPORT_TYPE:
            rt = renders.runtime()  # here, not in a thread: runtime() is not locked
            read = self._read_artefact or rt.store.read
            presign = self._presign_artefact or functools.partial(self._presign, rt.settings)
            raw, kind = await asyncio.to_thread(
                _report_raw, message, headers, self.settings.base_url, read, presign
            )
        else:
            raw, kind = _serialise(_alert_email(message, self.settings.base_url), headers), "alert"
        message_id = await asyncio.to_thread(self._send_raw, sub.destination, raw)
        log.info(
            "email sent",
            delivery_id=delivery_id,
            notification_id=message.notification_id,
            ses_message_id=message_id,
            kind=kind,
            size_bytes=len(raw),
        )
        return message_id

    def close(self) -> None:
        with self._client_lock:
            ses, self._ses_client = self._ses_client, None
            s3, self._s3_client = self._s3_client, None
        for client in (ses, s3[1] if s3 else None):
            if client is not None:
                client.close()

    def _ses(self) -> Any:
        with self._client_lock:
            if self._ses_client is None:
                from botocore.config import Config  # type: ignore[import-untyped]

                config = Config(
                    connect_timeout=self.settings.connect_timeout_s,
                    read_timeout=self.settings.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                )
                s = self.settings
                self._ses_client = _client("ses", s.ses_endpoint_url, s.ses_region, config)
            return self._ses_client

    def _presign(self, rs: renders.RenderSettings, location: str) -> str | None:
        """A presigned GET URL of an object on S3; None for anything else."""
        if not location.startswith("s3://"):
            return None
        with self._client_lock:
            where = (rs.s3_endpoint_url, rs.s3_region)
            if self._s3_client is None or self._s3_client[0] != where:
                from botocore.config import Config

                config = Config(signature_version="s3v4")
                old, self._s3_client = self._s3_client, (where, _client("s3", *where, config))
                if old is not None:
                    old[1].close()
            s3 = self._s3_client[1]
        bucket, _, key = location.removeprefix("s3://").partition("/")
        url = s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRES_S
        )
        return str(url)

    def _send_raw(self, destination: str, raw: bytes) -> str:
        import botocore.exceptions as bx  # type: ignore[import-untyped]

        try:
            reply = self._ses().send_raw_email(
                Source=self.settings.ses_sender,
                Destinations=[destination],
                RawMessage={"Data": raw},
            )
        except (bx.BotoCoreError, bx.ClientError) as e:
            raise aws_failure(e, "SES") from e
        return str(reply["MessageId"])


def _client(service: str, endpoint_url: str, region: str, config: Any) -> Any:
    """A boto3 client with credentials from the standard chain (a session per client: boto3's
    default session is not thread-safe)."""
    import boto3  # type: ignore[import-untyped]

    try:
        return boto3.session.Session().client(
            service, region_name=region, endpoint_url=endpoint_url or None, config=config
        )
    except ValueError as e:  # an invalid endpoint URL
        raise CallPermanent(f"{service.upper()}: {e}") from e


# ---------------------------------------------------------------------- headers


def _one_line(text: str, limit: int) -> str:
    """``text`` fit for a header: control characters and line breaks as single spaces."""
    flat = " ".join(_CONTROL_RE.sub(" ", text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _id_part(value: str) -> str:
    """``value`` if it is a valid msg-id left part, else a digest of it (stable per value)."""
    if len(value) <= 200 and _ID_RE.fullmatch(value):
        return value
    return hashlib.sha256(value.encode()).hexdigest()[:40]


def _subject(message: Message) -> str:
    if message.type == _REPORT_TYPE:
        subject = message.title
    elif message.cluster_id:
        subject = f"[{message.severity}] {message.cluster_id}: {message.title}"
    else:
        subject = f"[{message.severity}] {message.title}"
    return _one_line(subject, SUBJECT_MAX_CHARS)


def _headers(sender: str, recipient: str, message: Message, delivery_id: str) -> dict[str, str]:
    try:
        Address(addr_spec=recipient)
    except (ValueError, IndexError) as e:  # IndexError: the parser's answer to ""
        raise CallPermanent(f"invalid email destination {recipient[:100]!r}: {e}") from None
    return {
        "From": sender,
        "To": recipient,
        "Subject": _subject(message),
        "Date": format_datetime(datetime.now(UTC)),
        "Message-ID": f"<{_id_part(delivery_id)}@{_DOMAIN}>",
        "Auto-Submitted": "auto-generated",
        "X-Streamproc-Notification-Id": _one_line(message.notification_id, 200),
        "X-Streamproc-Delivery-Id": _one_line(delivery_id, 200),
    }


def _serialise(msg: EmailMessage, headers: dict[str, str]) -> bytes:
    try:
        for name, value in headers.items():
            msg[name] = value
    except ValueError as e:  # e.g. a sender that is not an address
        raise CallPermanent(f"cannot build the email: {e}") from e
    return msg.as_bytes(policy=policy.SMTP)


# ---------------------------------------------------------------------- alerts


def _link(message: Message, base_url: str) -> str:
    return message.link if message.link.startswith(("http://", "https://")) else base_url


def _alert_email(message: Message, base_url: str) -> EmailMessage:
    e = html.escape
    link = _link(message, base_url)
    facts: list[tuple[str, str]] = [("Severity", message.severity)]
    if message.cluster_id:
        facts.append(("Cluster", message.cluster_id))
    text = "\n".join(
        [
            message.title,
            "",
            *(f"{k}: {v}" for k, v in facts),
            *(["", message.body] if message.body else []),
            "",
            f"More: {link}",
            "",
        ]
    )
    rows = "".join(f"<tr><th align='left'>{k}</th><td>{e(v)}</td></tr>" for k, v in facts)
    body = f"<div style='white-space:pre-wrap'>{e(message.body)}</div>" if message.body else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'></head><body>"
        f"<h2>{e(message.title)}</h2><table>{rows}</table>{body}"
        f'<p><a href="{e(link)}">Open in streamproc</a></p></body></html>'
    )
    msg = EmailMessage(policy=policy.SMTP)
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(page, subtype="html", cte="quoted-printable")
    return msg


# ---------------------------------------------------------------------- reports


def _chart_name(src: str) -> str | None:
    """The file an ``img src`` names next to the report (``NAME.png``, maybe in a subfolder),
    or None for anything else (a URL, ``data:``, an absolute path, a way up)."""
    name = urllib.parse.unquote(html.unescape(src).strip())
    parts = name.split("/")
    if not name.lower().endswith(".png") or ":" in name or "\\" in name or "?" in name:
        return None
    if "" in parts or "." in parts or ".." in parts:
        return None
    return name


def _sibling(location: str, name: str) -> str:
    """The location of ``name`` next to ``location`` (file URIs are percent-encoded)."""
    folder = location.rsplit("/", 1)[0]
    return f"{folder}/{urllib.parse.quote(name) if location.startswith('file:') else name}"


def _read(read: ReadArtefact, location: str) -> bytes:
    import botocore.exceptions as bx

    try:
        return read(location)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise CallPermanent(f"report artefact missing: {location}") from e
    except ValueError as e:  # not in the render store
        raise CallPermanent(f"report artefact not readable: {e}") from e
    except PermissionError as e:
        raise CallPermanent(f"report artefact {location}: {e}") from e
    except OSError as e:
        raise CallTransient(f"report artefact {location}: {e}") from e
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise aws_failure(e, "S3") from e


def _report_raw(
    message: Message,
    headers: dict[str, str],
    base_url: str,
    read: ReadArtefact,
    presign: PresignArtefact,
) -> tuple[bytes, str]:
    """The report's raw email and its kind: ``report`` (charts inline) or ``report-links``."""
    location = message.report_location
    if not location:
        raise CallPermanent("report.ready without a report location")
    page = _read(read, location).decode("utf-8", "replace")
    names = list(dict.fromkeys(n for m in _IMG_SRC_RE.finditer(page) if (n := _chart_name(m[3]))))
    charts = {name: _read(read, _sibling(location, name)) for name in names}
    token = hashlib.sha256(headers["Message-ID"].encode()).hexdigest()[:16]
    cids = {name: f"chart{i}.{token}@{_DOMAIN}" for i, name in enumerate(names)}

    def to_cid(m: re.Match[str]) -> str:
        name = _chart_name(m[3])
        return f"{m[1]}{m[2]}cid:{cids[name]}{m[2]}" if name else m[0]

    link = _link(message, base_url)
    text = f"{message.title}\n\n{message.body}\n\nThe report is in the HTML part; online: {link}\n"
    msg = EmailMessage(policy=policy.SMTP)
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(_IMG_SRC_RE.sub(to_cid, page), subtype="html", cte="quoted-printable")
    html_part = msg.get_body(("html",))
    assert html_part is not None  # just added
    for name in names:
        html_part.add_related(
            charts[name],
            maintype="image",
            subtype="png",
            cid=f"<{cids[name]}>",
            disposition="inline",
            filename=name.rsplit("/", 1)[-1],
        )
    raw = _serialise(msg, headers)
    if len(raw) <= MAX_RAW_BYTES:
        return raw, "report"
    log.warning(
        "report too large to email with its charts: sending links",
        notification_id=message.notification_id,
        size_bytes=len(raw),
        limit_bytes=MAX_RAW_BYTES,
    )
    links = _report_links(location, names, presign)
    return _serialise(_links_email(message, link, links, len(raw)), headers), "report-links"


def _report_links(
    location: str, names: list[str], presign: PresignArtefact
) -> list[tuple[str, str]]:
    import botocore.exceptions as bx

    try:
        index = presign(location)
        if index is None:
            return []
        out = [("The report", index)]
        for name in names:
            url = presign(_sibling(location, name))
            if url is not None:
                out.append((name, url))
        return out
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise aws_failure(e, "S3") from e


def _links_email(
    message: Message, link: str, links: list[tuple[str, str]], size_bytes: int
) -> EmailMessage:
    e = html.escape
    why = (
        f"The report with its charts is {size_bytes / 1e6:.1f} MB, over the "
        f"{MAX_RAW_BYTES / 1e6:.0f} MB an email may carry"
    )
    if links:
        days = PRESIGN_EXPIRES_S // 86400
        lines = [f"{why}; these links open it for {days} days:", *(f"{n}: {u}" for n, u in links)]
        items = "".join(f'<li><a href="{e(u)}">{e(n)}</a></li>' for n, u in links)
        more = f"<p>{e(lines[0])}</p><ul>{items}</ul>"
    else:
        lines = [f"{why}; open it on the dashboard: {link}"]
        more = f'<p>{e(why)}; <a href="{e(link)}">open it on the dashboard</a>.</p>'
    msg = EmailMessage(policy=policy.SMTP)
    msg.set_content(
        "\n".join([message.title, "", message.body, "", *lines, ""]), cte="quoted-printable"
    )
    msg.add_alternative(
        "<!doctype html><html><head><meta charset='utf-8'></head><body>"
        f"<h2>{e(message.title)}</h2><p>{e(message.body)}</p>{more}</body></html>",
        subtype="html",
        cte="quoted-printable",
    )
    return msg
