"""The QA agent's workers (WORKLOADS §5, seed 004 "BugHive"; docs/qa.md).

Task types (submitted with ``POST /v1/tasks``, run by the task runner of their queue):

=====================  ==========  ===========  ===========================================
type                   queue       concurrency  what
=====================  ==========  ===========  ===========================================
``crawl.session``      ``crawl``   2            crawl a site, report each problem once
``ticket.create``      ``tickets`` 4            file one issue per bug (Linear's GraphQL API)
``screenshot.upload``  ``media``   8            a page's PNG into S3
=====================  ==========  ===========  ===========================================

Concerns: ``qa-tickets`` (a ``qa.bug_found`` event → its ``ticket.create`` task) and
``qa-cleanup`` (``tick.cleanup_qa``, daily 03:00: finished sessions' screenshots and state
after ``retention_days``). Events: ``schemas.qa`` (``qa.bug_found``). Settings:
``STREAMPROC_QA_<FIELD>`` (``QaSettings``).

Modules: ``crawler`` (breadth-first, robots.txt, per-host limits), ``browser`` (Chromium:
console errors, screenshots), ``crawl`` (the task), ``session`` (its state in Redis),
``tickets``, ``screenshots``, ``cleanup``, ``settings``; ``_keys`` names every key.
"""

from __future__ import annotations

from collections.abc import Mapping

from qa import cleanup, crawl, tickets
from qa.crawl import CrawlRequest, crawl_session
from qa.screenshots import ScreenshotUpload, upload_screenshot
from qa.session import SessionStore
from qa.settings import QaSettings, settings, use_settings
from qa.tickets import TicketRequest, create_ticket
from schemas.qa import TYPES as EVENTS
from schemas.qa import BugFound, bug_id
from streamproc.concern import Concern
from streamproc.config import settings_from_env
from streamproc.errors import ConfigError
from streamproc.tasks import TaskType

__all__ = (
    "CONCERNS",
    "EVENTS",
    "TASK_TYPES",
    "BugFound",
    "CrawlRequest",
    "QaSettings",
    "ScreenshotUpload",
    "SessionStore",
    "TicketRequest",
    "bug_id",
    "configure_from_env",
    "settings",
    "use_settings",
)

#: The QA task types, for ``consumers.tasks.TASK_TYPES``.
TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType(
            name="crawl.session",
            run=crawl_session,
            payload_type=CrawlRequest,
            queue="crawl",
            concurrency=2,
            max_retries=crawl.MAX_RETRIES,
            retry_base_s=60.0,  # 60 s, 120 s, 240 s, each scaled by U(0.5, 1) (jitter)
            retry_cap_s=600.0,
            soft_time_limit_s=3000.0,  # 50 min: the crawl returns what it found
            time_limit_s=3600.0,
            retry_on_timeout=True,
        ),
        TaskType(
            name="ticket.create",
            run=create_ticket,
            payload_type=TicketRequest,
            queue="tickets",
            concurrency=4,
            max_retries=5,
            retry_base_s=30.0,
            retry_cap_s=600.0,
            time_limit_s=300.0,
        ),
        TaskType(
            name="screenshot.upload",
            run=upload_screenshot,
            payload_type=ScreenshotUpload,
            queue="media",
            concurrency=8,
            max_retries=3,
            retry_base_s=5.0,
            retry_cap_s=120.0,
            time_limit_s=300.0,
        ),
    )
}

#: ``qa-tickets`` and ``qa-cleanup``.
CONCERNS: tuple[Concern, ...] = (tickets.CONCERN, cleanup.CONCERN)


def configure_from_env(env: Mapping[str, str]) -> None:
    """``STREAMPROC_QA_<FIELD>`` (``LINEAR_URL``, ``LINEAR_API_KEY``, ``LINEAR_TEAM_ID``,
    ``S3_BUCKET``, ``S3_ENDPOINT_URL``, ``RETENTION_DAYS``, …); an unknown one is an error."""
    known = {f"STREAMPROC_QA_{f.upper()}" for f in QaSettings.__struct_fields__}
    if unknown := sorted(k for k in env if k.startswith("STREAMPROC_QA_") and k not in known):
        raise ConfigError(f"{', '.join(unknown)}: no such QA setting (docs/qa.md)")
    use_settings(settings_from_env(QaSettings, "STREAMPROC_QA_", env))
