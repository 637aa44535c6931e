"""Every Redis key and object-store key of the QA tasks, built here (under ``<p>:state:``).

| key | type | what |
|---|---|---|
| ``<p>:state:{qa}:session:<id>`` | hash, ``session_ttl_s`` | a crawl session's status, counters |
| ``<p>:state:{qa}:sessions`` | zset | finished session id → finished at (epoch ms), for cleanup |
| ``<p>:state:{qa}:shots:<id>`` | hash, retention | a session's screenshots: sha256 → URL |
| ``<p>:state:{qa}:png:<sha256>`` | string, ``staged_ttl_s`` | a PNG waiting for its upload |
| ``<p>:state:qa:ticket:<bug id>`` | hash, retention | a bug's ticket: claim, issue id, URL |
| ``<p>:state:qa:bug:<fingerprint>`` | hash, dedup days | a bug across sessions: issue, sightings |

The first four share the hash tag ``{qa}``: a session's MULTI (its hash and the finished
index), the cleanup's (both hashes and the index) and the screenshot's (its hash and the
staged PNG) run on Redis Cluster, on one slot (QA's volume is a few sessions a day). A ticket
and a bug record (``ticket_dedup_days``) are each written alone and keep their names. Before
2026-12 they were ``<p>:state:qa:…``: on one Redis,
``RENAME <p>:state:qa:sessions <p>:state:{qa}:sessions`` so the cleanup still finds the
sessions finished before (the rest expires by itself).

Object keys (S3): ``<s3_prefix>/<session id>/<sha256>.png``.
"""

from __future__ import annotations

from streamproc.keys import Keys

#: The hash tag of the keys QA's MULTIs touch together.
_TAG = "{qa}"

__all__ = (
    "bug",
    "object_key",
    "screenshots",
    "session",
    "session_objects",
    "sessions",
    "staged_png",
    "ticket",
)


def session(keys: Keys, session_id: str) -> str:
    return keys.state(_TAG, "session", session_id)


def sessions(keys: Keys) -> str:
    return keys.state(_TAG, "sessions")


def screenshots(keys: Keys, session_id: str) -> str:
    return keys.state(_TAG, "shots", session_id)


def staged_png(keys: Keys, sha256: str) -> str:
    return keys.state(_TAG, "png", sha256)


def ticket(keys: Keys, bug_id: str) -> str:
    return keys.state("qa", "ticket", bug_id)


def bug(keys: Keys, fingerprint: str) -> str:
    """A bug across sessions (``qa.tickets.fingerprint``: 32 hex digits, no page text)."""
    return keys.state("qa", "bug", fingerprint)


def object_key(prefix: str, session_id: str, sha256: str) -> str:
    """The S3 key of a session's screenshot."""
    return "/".join(p for p in (prefix.strip("/"), session_id, f"{sha256}.png") if p)


def session_objects(prefix: str, session_id: str) -> str:
    """The S3 prefix under which a session's screenshots are."""
    return "/".join(p for p in (prefix.strip("/"), session_id, "") if p) + "/"
