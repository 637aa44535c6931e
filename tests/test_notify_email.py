"""The email channel against SES and S3 served by moto on 127.0.0.1: what arrives (read back
from moto's ``/moto-api/data.json``), the weekly report with its charts inline, the fallback to
links over SES's 10 MB, and how each failure is classified."""

from __future__ import annotations

import asyncio
import email
import http.server
import json
import os
import re
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from consumers import renders
from consumers.render_jobs import DayMetrics, ReportInput, report_job, unpack_files
from notifications.email import MAX_RAW_BYTES, SUBJECT_MAX_CHARS, EmailSender
from notifications.settings import NotifySettings
from notifications.subscriptions import Subscription
from schemas.notify import Message
from streamproc.offload import WorkerContext
from streamproc.outbound import CallPermanent, CallTransient
from tests.helpers import free_port, moto_server

SENDER = "streamproc@example.com"
DASHBOARD = "https://streamproc.example.net/dashboard"
PNG = b"\x89PNG\r\n\x1a\n"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto (SES and S3) on a free 127.0.0.1 port, for this module."""
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the environment only: no profile, no config file, no instance metadata."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def aws(service: str, endpoint: str) -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def settings(endpoint: str) -> NotifySettings:
    """Notify settings on moto, the sender verified (as SES requires)."""
    ses = aws("ses", endpoint)
    ses.verify_email_identity(EmailAddress=SENDER)
    ses.close()
    return NotifySettings(
        ses_endpoint_url=endpoint, ses_sender=SENDER, base_url="https://streamproc.example.net"
    )


@pytest.fixture
def sender(settings: NotifySettings) -> Iterator[EmailSender]:
    s = EmailSender(settings)
    yield s
    s.close()


@pytest.fixture
async def local_store(tmp_path: Path) -> AsyncIterator[renders.Store]:
    """The render store in a folder of this test's own (restored afterwards)."""
    await renders.configure(renders.RenderSettings(store=str(tmp_path / "artefacts")))
    yield renders.runtime().store
    await renders.configure(renders.RenderSettings())


@pytest.fixture
async def s3_store(endpoint: str) -> AsyncIterator[renders.Store]:
    """The render store in a bucket of this test's own on moto (restored afterwards)."""
    bucket = f"reports-{uuid.uuid4().hex[:12]}"
    s3 = aws("s3", endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.close()
    await renders.configure(
        renders.RenderSettings(store=f"s3://{bucket}/weekly", s3_endpoint_url=endpoint)
    )
    yield renders.runtime().store
    await renders.configure(renders.RenderSettings())


def subscription(destination: str = "ops@example.org", cluster: str = "c1") -> Subscription:
    return Subscription(id="sub_1", cluster=cluster, channel="email", destination=destination)


def alert(**kw: Any) -> Message:
    fields: dict[str, Any] = {
        "notification_id": "n-" + uuid.uuid4().hex[:8],
        "type": "notify.notification",
        "cluster_id": "prod-eu",
        "severity": "critical",
        "title": "Node pool out of memory",
        "body": "3 pods were OOM-killed <in> kube-system & default.",
        "link": "https://streamproc.example.net/clusters/prod-eu",
        "occurred_at": NOW,
    }
    return Message(**(fields | kw))


def report_message(location: str, files: list[str]) -> Message:
    return Message(
        notification_id="n-" + uuid.uuid4().hex[:8],
        type="report.ready",
        title="Weekly report 2026-11-16 to 2026-11-23",
        body=f"The report is ready ({len(files)} files).",
        link=DASHBOARD,
        occurred_at=NOW,
        report_location=location,
        report_files=files,
    )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return bytes(r.read())


async def received(endpoint: str, message_id: str) -> tuple[dict[str, Any], EmailMessage]:
    """What moto's SES accepted under ``message_id``, and its raw data parsed."""
    data = await asyncio.to_thread(_get_json, f"{endpoint}/moto-api/data.json")
    [raw] = [m for m in data["ses"]["RawMessage"] if m["id"] == message_id]
    parsed = email.message_from_string(raw["raw_data"], policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def html_of(msg: EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def text_of(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def inline_images(msg: EmailMessage) -> dict[str, tuple[str, bytes]]:
    """Content-ID (without brackets) -> (file name, bytes) of every inline image part."""
    out = {}
    for part in msg.walk():
        if part.get_content_maintype() == "image":
            assert part.get_content_disposition() == "inline"
            out[str(part["Content-ID"]).strip("<>")] = (
                str(part.get_filename()),
                bytes(part.get_content()),
            )
    return out


def weekly_report_files() -> dict[str, bytes]:
    """Real artefacts of the weekly report: two matplotlib charts and the HTML summary."""
    days = [
        DayMetrics(day=f"2026-11-{16 + i:02d}", values={"savings_usd": 10.0 * i, "oom_kills": i})
        for i in range(7)
    ]
    report = ReportInput(
        title="Weekly report", period_start=NOW - timedelta(days=7), period_end=NOW, days=days
    )
    payload = msgspec.msgpack.encode(report)
    return unpack_files(report_job(payload, WorkerContext("j", "report", "cpu")))


def put_all(store: renders.Store, files: dict[str, bytes], job: str = "job-1") -> dict[str, str]:
    return {name: store.put(f"renders/report/{job}/{name}", data) for name, data in files.items()}


# ---------------------------------------------------------------------- alerts


@pytest.mark.parametrize(
    ("cluster", "subject"),
    [
        ("prod-eu", "[critical] prod-eu: Node pool out of memory"),
        ("", "[critical] Node pool out of memory"),
    ],
)
async def test_an_alert_email_reaches_the_subscriber_with_subject_text_and_html(
    sender: EmailSender, endpoint: str, cluster: str, subject: str
) -> None:
    message = alert(cluster_id=cluster)
    message_id = await sender.send(subscription(), message, delivery_id="dlv-1")
    raw, msg = await received(endpoint, message_id)
    assert raw["source"] == SENDER
    assert "ops@example.org" in raw["destinations"]
    assert msg["From"] == SENDER
    assert msg["To"] == "ops@example.org"
    assert msg["Subject"] == subject
    assert msg["Message-ID"] == "<dlv-1@streamproc>"
    assert msg["X-Streamproc-Notification-Id"] == message.notification_id
    assert msg["X-Streamproc-Delivery-Id"] == "dlv-1"
    assert msg.get_content_type() == "multipart/alternative"
    text = text_of(msg)
    assert "3 pods were OOM-killed <in> kube-system & default." in text
    assert "https://streamproc.example.net/clusters/prod-eu" in text
    page = html_of(msg)
    assert "<h2>Node pool out of memory</h2>" in page
    assert "OOM-killed &lt;in&gt; kube-system &amp; default." in page  # escaped
    assert "critical" in page
    assert '<a href="https://streamproc.example.net/clusters/prod-eu">' in page
    assert ("<td>prod-eu</td>" in page) == bool(cluster)


async def test_an_alert_without_an_http_link_points_at_the_dashboard(
    sender: EmailSender, endpoint: str
) -> None:
    message_id = await sender.send(
        subscription(), alert(link="javascript:alert(1)"), delivery_id="dlv-js"
    )
    _, msg = await received(endpoint, message_id)
    assert "javascript:" not in html_of(msg)
    assert '<a href="https://streamproc.example.net">' in html_of(msg)


async def test_a_resend_of_a_delivery_carries_the_same_message_id(
    sender: EmailSender, endpoint: str
) -> None:
    message = alert()
    first = await sender.send(subscription(), message, delivery_id="dlv-again")
    second = await sender.send(subscription(), message, delivery_id="dlv-again")
    assert first != second  # SES's ids are per send...
    ids = {(await received(endpoint, m))[1]["Message-ID"] for m in (first, second)}
    assert ids == {"<dlv-again@streamproc>"}  # ...ours is per delivery
    # A delivery id that is not a valid msg-id part is replaced by a stable digest.
    third = await sender.send(subscription(), message, delivery_id="a b@c\r\n")
    [(_, msg)] = [await received(endpoint, third)]
    assert re.fullmatch(r"<[0-9a-f]{40}@streamproc>", str(msg["Message-ID"]))
    assert msg["X-Streamproc-Delivery-Id"] == "a b@c"


async def test_a_title_with_line_breaks_or_a_huge_length_stays_one_subject_header(
    sender: EmailSender, endpoint: str
) -> None:
    injected = "Disk full\r\nBcc: victim@example.net\r\n\r\nforged body\u2028X-Evil: 1"
    message = alert(title=injected, notification_id="n-1\r\nX-Evil: 2")
    message_id = await sender.send(subscription(), message, delivery_id="dlv-inject")
    raw, msg = await received(endpoint, message_id)
    assert msg.get_all("Subject") is not None
    assert len(msg.get_all("Subject", [])) == 1
    assert msg["Bcc"] is None
    assert msg["X-Evil"] is None
    # (Long enough to be folded onto the next line: RFC 5322 unfolding drops the CRLF.)
    assert str(msg["Subject"]).strip() == (
        "[critical] prod-eu: Disk full Bcc: victim@example.net forged body X-Evil: 1"
    )
    assert msg["X-Streamproc-Notification-Id"] == "n-1 X-Evil: 2"
    assert not any("victim" in d for d in raw["destinations"])
    assert msg.get_content_type() == "multipart/alternative"  # the body was not forged

    huge = alert(title="é" * 500 + " end")
    message_id = await sender.send(subscription(), huge, delivery_id="dlv-huge")
    raw, msg = await received(endpoint, message_id)
    assert len(msg.get_all("Subject", [])) == 1
    assert len(str(msg["Subject"])) == SUBJECT_MAX_CHARS
    assert str(msg["Subject"]).endswith("é…")
    assert raw["raw_data"].isascii()  # RFC 2047 and quoted-printable
    assert max(len(line) for line in raw["raw_data"].splitlines()) <= 78  # folded


# ---------------------------------------------------------------------- weekly report


async def test_the_weekly_report_shows_its_charts_inline(
    sender: EmailSender, endpoint: str, local_store: renders.Store
) -> None:
    files = weekly_report_files()
    locations = put_all(local_store, files)
    message = report_message(locations["index.html"], sorted(locations.values()))
    message_id = await sender.send(subscription(cluster="*"), message, delivery_id="dlv-report")

    _, msg = await received(endpoint, message_id)
    assert msg["Subject"] == "Weekly report 2026-11-16 to 2026-11-23"
    related = msg.get_body(("related",))
    assert related is not None
    assert related.get_content_type() == "multipart/related"
    page = html_of(msg)
    assert "<h1>Weekly report</h1>" in page  # the report's own index.html
    assert 'src="savings_usd.png"' not in page
    refs = re.findall(r'<img src="cid:([^"]+)" alt="([^"]+)">', page)
    assert sorted(alt for _, alt in refs) == ["oom_kills", "savings_usd"]
    images = inline_images(msg)
    assert set(images) == {cid for cid, _ in refs}
    for cid, alt in refs:
        name, data = images[cid]
        assert name == f"{alt}.png"
        assert data == files[name]
        assert data.startswith(PNG)
    assert DASHBOARD in text_of(msg)


async def test_the_weekly_report_is_read_from_s3(
    sender: EmailSender, endpoint: str, s3_store: renders.Store
) -> None:
    files = weekly_report_files()
    locations = put_all(s3_store, files)
    assert locations["index.html"].startswith("s3://")
    message = report_message(locations["index.html"], sorted(locations.values()))
    message_id = await sender.send(subscription(cluster="*"), message, delivery_id="dlv-s3")
    _, msg = await received(endpoint, message_id)
    images = inline_images(msg)
    assert sorted(name for name, _ in images.values()) == ["oom_kills.png", "savings_usd.png"]
    assert all(data == files[name] for name, data in images.values())


async def test_only_charts_next_to_the_report_are_inlined(
    settings: NotifySettings, endpoint: str
) -> None:
    """``read_artefact`` replaces the store; a chart in a subfolder is inlined, other images
    (a URL, data:, a way up) are left as they are and never read."""
    base = "mem://reports/r1"
    stored = {f"{base}/index.html": b"", f"{base}/charts/cpu.png": PNG + b"cpu"}
    stored[f"{base}/index.html"] = (
        b"<html><body><img src='charts/cpu.png'><img src=\"https://cdn.example/logo.png\">"
        b'<IMG alt="x" SRC="../secret.png"><img src="data:image/png;base64,AAAA"></body></html>'
    )
    asked: list[str] = []

    def read(location: str) -> bytes:
        asked.append(location)
        return stored[location]

    sender = EmailSender(settings, read_artefact=read)
    try:
        message = report_message(f"{base}/index.html", sorted(stored))
        message_id = await sender.send(subscription(cluster="*"), message, delivery_id="dlv-m")
    finally:
        sender.close()
    _, msg = await received(endpoint, message_id)
    assert asked == [f"{base}/index.html", f"{base}/charts/cpu.png"]
    [(cid, (name, data))] = inline_images(msg).items()
    assert (name, data) == ("cpu.png", PNG + b"cpu")
    page = html_of(msg)
    assert f"<img src='cid:{cid}'>" in page
    assert '<img src="https://cdn.example/logo.png">' in page
    assert 'SRC="../secret.png"' in page
    assert 'src="data:image/png;base64,AAAA"' in page


def large_report(store: renders.Store) -> tuple[dict[str, str], bytes]:
    """A report whose chart makes the email larger than SES allows (8 MB of incompressible
    bytes after a PNG signature: about 10.7 MB once base64-encoded)."""
    big = PNG + os.urandom(8_000_000)
    page = b'<html><body><h1>Weekly report</h1><img src="big.png" alt="big"></body></html>'
    return put_all(store, {"index.html": page, "big.png": big}, job="job-big"), big


async def test_a_report_too_large_for_ses_on_s3_is_sent_as_presigned_links(
    sender: EmailSender, endpoint: str, s3_store: renders.Store
) -> None:
    locations, big = large_report(s3_store)
    message = report_message(locations["index.html"], sorted(locations.values()))
    message_id = await sender.send(subscription(cluster="*"), message, delivery_id="dlv-big")
    raw, msg = await received(endpoint, message_id)
    assert len(raw["raw_data"]) < 100_000
    assert inline_images(msg) == {}
    links = {
        label: url.replace("&amp;", "&")
        for url, label in re.findall(r'<a href="([^"]+)">([^<]+)</a>', html_of(msg))
    }
    assert set(links) == {"The report", "big.png"}
    assert all("X-Amz-Signature=" in u and "X-Amz-Expires=604800" in u for u in links.values())
    assert all(u.startswith(endpoint) for u in links.values())
    assert await asyncio.to_thread(_get, links["big.png"]) == big  # the links work
    assert b"Weekly report" in await asyncio.to_thread(_get, links["The report"])
    assert "7 days" in text_of(msg)


async def test_a_report_too_large_for_ses_on_disk_links_the_dashboard(
    sender: EmailSender, endpoint: str, local_store: renders.Store
) -> None:
    locations, _ = large_report(local_store)
    message = report_message(locations["index.html"], sorted(locations.values()))
    with capture_logs() as logs:
        message_id = await sender.send(subscription(cluster="*"), message, delivery_id="dlv-bigl")
    raw, msg = await received(endpoint, message_id)
    assert len(raw["raw_data"]) < 100_000
    assert inline_images(msg) == {}
    assert f'<a href="{DASHBOARD}">open it on the dashboard</a>' in html_of(msg)
    assert "file://" not in raw["raw_data"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["size_bytes"] > MAX_RAW_BYTES
    [sent] = [e for e in logs if e["event"] == "email sent"]
    assert sent["kind"] == "report-links"


@pytest.mark.parametrize("missing", ["index.html", "savings_usd.png"])
async def test_a_missing_report_artefact_is_permanent(
    sender: EmailSender, local_store: renders.Store, missing: str
) -> None:
    files = weekly_report_files()
    locations = put_all(local_store, files)
    path = Path(urllib.request.url2pathname(locations[missing].removeprefix("file://")))
    await asyncio.to_thread(path.unlink)
    message = report_message(locations["index.html"], sorted(locations.values()))
    with pytest.raises(CallPermanent, match=f"report artefact missing: .*/{missing}"):
        await sender.send(subscription(cluster="*"), message, delivery_id="dlv-missing")


async def test_a_report_outside_the_render_store_is_permanent_and_not_read(
    sender: EmailSender, local_store: renders.Store, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere" / "index.html"
    elsewhere.parent.mkdir()
    elsewhere.write_text("<html>secret</html>")
    for location in (elsewhere.as_uri(), "s3://bucket/index.html", ""):
        with pytest.raises(CallPermanent, match=r"not readable|outside|without a report location"):
            await sender.send(
                subscription(cluster="*"), report_message(location, []), delivery_id="dlv-out"
            )


async def test_the_s3_store_reads_only_under_its_bucket_and_prefix(
    s3_store: renders.Store,
) -> None:
    location = s3_store.put("renders/report/j/index.html", b"page")
    assert await asyncio.to_thread(s3_store.read, location) == b"page"
    bucket = location.removeprefix("s3://").split("/")[0]
    for outside in (
        f"s3://{bucket}/other/index.html",
        f"s3://{bucket}/weekly/../other/index.html",
        f"s3://another-{bucket}/weekly/index.html",
        f"file:///{bucket}/weekly/index.html",
    ):
        with pytest.raises(ValueError, match="not in the render store"):
            s3_store.read(outside)
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(s3_store.read, location.replace("index.html", "gone.html"))


# ---------------------------------------------------------------------- failures


async def test_an_unverified_sender_is_permanent(settings: NotifySettings) -> None:
    sender = EmailSender(msgspec.structs.replace(settings, ses_sender="nobody@unverified.example"))
    try:
        with pytest.raises(CallPermanent, match="MessageRejected") as err:
            await sender.send(subscription(), alert(), delivery_id="dlv-unverified")
    finally:
        sender.close()
    assert err.value.status == 400


async def test_an_invalid_destination_is_permanent(sender: EmailSender) -> None:
    for destination in ("ops@example.org\r\nBcc: victim@example.net", "a@b.org, c@d.org", ""):
        with pytest.raises(CallPermanent, match="invalid email destination"):
            await sender.send(subscription(destination), alert(), delivery_id="dlv-bad")


async def test_an_endpoint_on_a_closed_port_is_transient() -> None:
    settings = NotifySettings(ses_endpoint_url=f"http://127.0.0.1:{free_port()}")
    sender = EmailSender(settings)
    try:
        with pytest.raises(CallTransient, match="SES: EndpointConnectionError"):
            await sender.send(subscription(), alert(), delivery_id="dlv-closed")
    finally:
        sender.close()


async def test_missing_credentials_are_permanent(
    settings: NotifySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    sender = EmailSender(settings)
    try:
        with pytest.raises(CallPermanent, match="NoCredentialsError"):
            await sender.send(subscription(), alert(), delivery_id="dlv-nocreds")
    finally:
        sender.close()


def failing_ses(status: int, code: str) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    """An SES endpoint that answers every call with one error; the list records the calls."""
    calls: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            calls.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
            body = (
                '<ErrorResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/"><Error>'
                f"<Type>Sender</Type><Code>{code}</Code><Message>try later</Message>"
                "</Error><RequestId>r-1</RequestId></ErrorResponse>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler), calls


@pytest.mark.parametrize(
    ("status", "code"), [(503, "ServiceUnavailable"), (400, "Throttling"), (500, "InternalFailure")]
)
async def test_throttling_and_server_errors_are_transient_and_tried_once(
    status: int, code: str
) -> None:
    """One attempt per send: the engine retries, by error class, with its own backoff."""
    server, calls = failing_ses(status, code)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sender = EmailSender(NotifySettings(ses_endpoint_url=f"http://127.0.0.1:{server.server_port}"))
    try:
        with pytest.raises(CallTransient, match=f"SES: {code}: try later") as err:
            await sender.send(subscription(), alert(), delivery_id="dlv-fail")
    finally:
        sender.close()
        server.shutdown()
        server.server_close()
        thread.join()
    assert err.value.status == status
    assert len(calls) == 1
    assert "Action=SendRawEmail" in calls[0]


# ---------------------------------------------------------------------- end to end


async def test_the_weekly_report_reaches_an_email_subscriber_through_the_concerns(
    settings: NotifySettings,
    endpoint: str,
    local_store: renders.Store,
    client: Any,
    codec: Any,
    keys: Any,
    producer: Any,
) -> None:
    """report.ready -> notify-fanout -> notify-deliver -> SES (moto): the email is in moto's
    outbox with its charts inline, and the delivery log has SES's message id."""
    from notifications import concern as notify
    from notifications.delivery_log import DeliveryLog
    from notifications.subscriptions import SubscriptionStore, new_subscription
    from schemas.renders import ReportReady
    from tests.test_notify_delivery import delivering

    store = SubscriptionStore(client, keys)
    await store.add(
        new_subscription(
            cluster="*", channel="email", destination="finops@example.org", types=["report.*"]
        )
    )
    # Another email subscriber wants alerts only: it gets no report.
    await store.add(
        new_subscription(
            cluster="*", channel="email", destination="oncall@example.org", types=["notify.*"]
        )
    )
    files = weekly_report_files()
    locations = put_all(local_store, files, job="job-e2e")
    ready = ReportReady(
        key="weekly-report",
        source="renders",
        job_id="job-e2e",
        location=locations["index.html"],
        files=sorted(locations.values()),
        period_start=NOW - timedelta(days=7),
        period_end=NOW,
    )
    notify.use_settings(settings)
    try:
        async with delivering(client, codec, keys, producer):
            await producer.publish(ready)
            log = DeliveryLog(client, keys, maxlen=100, ttl_s=60)
            for _ in range(400):
                attempts = await log.for_notification(ready.id)
                if attempts and attempts[-1].status in ("sent", "failed"):
                    break
                await asyncio.sleep(0.05)
    finally:
        notify.use_settings(NotifySettings())
    [attempt] = attempts
    assert attempt.status == "sent", attempt
    assert attempt.destination == "finops@example.org"
    raw, msg = await received(endpoint, attempt.reference)
    assert set(raw["destinations"]) == {"finops@example.org"}
    assert str(msg["To"]) == "finops@example.org"
    assert str(msg["Subject"]).startswith("Weekly report")
    page = html_of(msg)
    cids = re.findall(r'<img src="cid:([^"]+)"', page)
    images = inline_images(msg)
    assert sorted(cids) == sorted(images)
    assert sorted(name for name, _ in images.values()) == ["oom_kills.png", "savings_usd.png"]
    data = await asyncio.to_thread(_get_json, f"{endpoint}/moto-api/data.json")
    to = [m["destinations"] for m in data["ses"]["RawMessage"]]
    assert not [d for d in to if "oncall@example.org" in d]
