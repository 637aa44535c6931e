#!/usr/bin/env python3
"""A tiny webhook receiver for trying notifications out: prints what arrives, answers 200.

    .venv/bin/python scripts/webhook_receiver.py --port 9000 --secret whsec_...

With ``--secret`` (the key ``streamproc subscriptions add`` printed) it verifies each
Standard Webhooks signature with the reference ``standardwebhooks`` package and answers 401
to a bad one. It keeps the webhook ids it accepted and says ``duplicate`` for a copy (what a
real receiver does with a redelivery). Listens on 127.0.0.1 only; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

_MAX_BODY = 1 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--secret", default="", help="the subscription's whsec_ signing key")
    args = p.parse_args(argv)
    verifier = Webhook(args.secret) if args.secret else None
    seen: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= _MAX_BODY:
                self.send_response(413)
                self.end_headers()
                return
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            webhook_id = headers.get("webhook-id", "")
            verdict = "unsigned check"
            if verifier is not None:
                try:
                    verifier.verify(body, headers)
                    verdict = "signature ok"
                except WebhookVerificationError as e:
                    print(f"REFUSED {webhook_id}: {e}", flush=True)
                    self.send_response(401)
                    self.end_headers()
                    return
            copy = webhook_id in seen
            seen.add(webhook_id)
            try:
                msg = json.loads(body)
                data = msg.get("data", {})
                what = f"{msg.get('type')} [{data.get('severity')}] {data.get('title')}"
            except (ValueError, AttributeError):
                what = body[:200].decode(errors="replace")
            label = "duplicate" if copy else "received"
            print(f"{label} {webhook_id} ({verdict}): {what}", flush=True)
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"webhook receiver on http://127.0.0.1:{args.port}/hook", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
