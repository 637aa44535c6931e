"""The QA agent's events (WORKLOADS §5, docs/qa.md): what a crawl session found.

``qa.bug_found`` (topic ``qa``) is published by the ``crawl.session`` task, one per problem;
its id is ``qa.bug_id(session, url, kind)``, so a crawl that runs again publishes the same
ids and the producer's dedup drops the copies. The ``qa-tickets`` concern files one ticket
per bug from it. Only the application publishes it (not ``external``).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from streamproc.event import Event, derived_id

__all__ = ("SESSION_ID_PATTERN", "TYPES", "BugFound", "BugKind", "SessionId", "bug_id")

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SessionId = Annotated[str, msgspec.Meta(pattern=SESSION_ID_PATTERN)]
#: ``http_error``: a page answered 5xx (or the start page >= 400); ``broken_link``: a linked
#: page answered 4xx or could not be loaded; ``console_error``: the page logged errors in
#: Chromium's console (or threw).
BugKind = Literal["http_error", "broken_link", "console_error"]
_Url = Annotated[str, msgspec.Meta(max_length=2048)]


def bug_id(session_id: str, url: str, kind: str) -> str:
    """The deterministic id of a problem: the same session, URL and kind give the same id."""
    return derived_id(f"qa:{session_id}", f"{kind} {url}")


class BugFound(Event, frozen=True, kw_only=True, tag="qa.bug_found"):
    """One problem a crawl session found on one URL. ``key`` is the session id."""

    topic: ClassVar[str] = "qa"
    external: ClassVar[bool] = False

    session_id: SessionId
    kind: BugKind
    #: The page the problem is on (for a broken link: the link's target).
    url: _Url
    #: Its HTTP status; 0 when it did not answer or for console errors.
    status: Annotated[int, msgspec.Meta(ge=0, le=999)] = 0
    title: Annotated[str, msgspec.Meta(max_length=300)] = ""
    detail: Annotated[str, msgspec.Meta(max_length=8000)] = ""
    #: Pages that link to ``url`` (the first found, at most 20).
    linked_from: Annotated[list[_Url], msgspec.Meta(max_length=20)] = msgspec.field(
        default_factory=list
    )
    #: Where the page's screenshot is (or will be once uploaded); empty when none.
    screenshot_url: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    #: The crawl task that found it.
    task_id: Annotated[str, msgspec.Meta(max_length=128)] = ""


TYPES: tuple[type[Event], ...] = (BugFound,)
