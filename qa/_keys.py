"""Every Redis key and object-store key of the QA tasks, built here (under ``<p>:state:qa``).

| key | type | what |
|---|---|---|
| ``<p>:state:qa:session:<id>`` | hash, ``session_ttl_s`` | a crawl session's status and counters |
| ``<p>:state:qa:sessions`` | zset | finished session id → finished at (epoch ms), for cleanup |
| ``<p>:state:qa:shots:<id>`` | hash, retention | a session's screenshots: sha256 → URL |
| ``<p>:state:qa:png:<sha256>`` | string, ``staged_ttl_s`` | a PNG waiting for its upload |
| ``<p>:state:qa:ticket:<bug id>`` | hash, retention | a bug's ticket: claim, issue id, URL |

Object keys (S3): ``<s3_prefix>/<session id>/<sha256>.png``.
"""

from __future__ import annotations

from streamproc.keys import Keys

__all__ = (
    "object_key",
    "screenshots",
    "session",
    "session_objects",
    "sessions",
    "staged_png",
    "ticket",
)


def session(keys: Keys, session_id: str) -> str:
    return keys.state("qa", "session", session_id)


def sessions(keys: Keys) -> str:
    return keys.state("qa", "sessions")


def screenshots(keys: Keys, session_id: str) -> str:
    return keys.state("qa", "shots", session_id)


def staged_png(keys: Keys, sha256: str) -> str:
    return keys.state("qa", "png", sha256)


def ticket(keys: Keys, bug_id: str) -> str:
    return keys.state("qa", "ticket", bug_id)


def object_key(prefix: str, session_id: str, sha256: str) -> str:
    """The S3 key of a session's screenshot."""
    return "/".join(p for p in (prefix.strip("/"), session_id, f"{sha256}.png") if p)


def session_objects(prefix: str, session_id: str) -> str:
    """The S3 prefix under which a session's screenshots are."""
    return "/".join(p for p in (prefix.strip("/"), session_id, "") if p) + "/"
