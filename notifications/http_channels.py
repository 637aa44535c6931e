"""The HTTP channels: signed webhooks (Standard Webhooks) and Slack incoming webhooks.

**Webhooks** get a JSON body ``{"type", "timestamp", "data"}`` and the three Standard Webhooks
headers: ``webhook-id`` is the notification id (the same on every retry and every redelivery,
so a receiver drops copies by it), ``webhook-timestamp`` the send time (Unix seconds), and
``webhook-signature`` ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` made with the
subscription's ``whsec_`` key by the ``standardwebhooks`` package, which receivers use to
verify (``Webhook(secret).verify(body, headers)``).

**Slack** gets an incoming-webhook payload: a ``text`` fallback and ``blocks`` (a header with
the title, the severity and cluster as fields, the body, a link button). Slack answers 429 with
Retry-After when a webhook is over its rate (about one message a second); that holds the
destination for every replica (``streamproc.outbound``).

Both use one aiohttp session per process with connect/read/total timeouts from the settings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from standardwebhooks.webhooks import Webhook

from notifications.settings import NotifySettings
from notifications.subscriptions import Subscription
from schemas.notify import Message
from streamproc.outbound import HttpResult, Timeouts, http_post

__all__ = ("HttpChannels", "slack_payload", "webhook_body")

_USER_AGENT = "streamproc-notify/1"
_EMOJI = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}


def webhook_body(message: Message, subscription_id: str, sent_at: datetime) -> bytes:
    data: dict[str, Any] = {
        "notification_id": message.notification_id,
        "subscription_id": subscription_id,
        "cluster_id": message.cluster_id,
        "severity": message.severity,
        "title": message.title,
        "body": message.body,
        "link": message.link,
        "occurred_at": message.occurred_at,
    }
    if message.report_location:
        data["report"] = {"location": message.report_location, "files": message.report_files}
    return orjson.dumps({"type": message.type, "timestamp": sent_at, "data": data})


def slack_payload(message: Message) -> bytes:
    title = message.title if len(message.title) <= 150 else message.title[:149] + "…"
    fields = [{"type": "mrkdwn", "text": f"*Severity*\n{message.severity}"}]
    if message.cluster_id:
        fields.append({"type": "mrkdwn", "text": f"*Cluster*\n{_escape(message.cluster_id)}"})
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title}},
        {"type": "section", "fields": fields},
    ]
    if message.body:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": _escape(message.body[:2900])}}
        )
    if message.link.startswith(("http://", "https://")):
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open"},
                        "url": message.link[:3000],
                    }
                ],
            }
        )
    where = f" ({message.cluster_id})" if message.cluster_id else ""
    text = f"{_EMOJI.get(message.severity, '')} [{message.severity}]{where} {message.title}"
    return orjson.dumps({"text": _escape(text), "blocks": blocks})


def _escape(text: str) -> str:
    """Slack's three control characters in mrkdwn text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class HttpChannels:
    """Sends webhooks and Slack messages; one session (connection pool) per process."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self.timeouts = Timeouts(
            connect_s=settings.connect_timeout_s,
            read_s=settings.read_timeout_s,
            total_s=settings.total_timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, limit_per_host=128),
                headers={"User-Agent": _USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def webhook(self, sub: Subscription, message: Message) -> HttpResult:
        now = datetime.now(UTC).replace(microsecond=0)
        body = webhook_body(message, sub.id, now)
        signature = Webhook(sub.secret).sign(message.notification_id, now, body.decode())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message.notification_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        return await http_post(self.session(), sub.destination, body, headers, self.timeouts)

    async def slack(self, sub: Subscription, message: Message) -> HttpResult:
        headers = {"Content-Type": "application/json"}
        return await http_post(
            self.session(), sub.destination, slack_payload(message), headers, self.timeouts
        )
