"""Logging set-up for the entry point (the library itself only logs).

JSON lines when stderr is not a terminal, readable colourless key=value lines when it is.
``plain``: one line per message for people, ``streamproc: warning: waiting for redis
(url=…)``, what one-shot commands (``inspect``, ``tail``, ...) use unless ``--verbose``.
Handlers and the runtime bind topic, group, entry id and event id with structlog's
contextvars, so every line of one event carries them.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Protocol

import structlog

from streamproc.printable import printable

__all__ = (
    "EVENT_CONTEXT",
    "EventContext",
    "configure_logging",
    "merge_event_context",
    "render_plain",
)


#: The event being handled in this task: (topic, group, entry id, event id, deliveries, attempt).
class EventContext(Protocol):
    """What a handled event's log lines carry (``streamproc.concern.Context`` has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> str: ...

    entry_id: str
    event_id: str
    deliveries: int
    attempt: int


#: The event being handled in this task (its Context), or None.
EVENT_CONTEXT: ContextVar[EventContext | None] = ContextVar("streamproc_event", default=None)


def merge_event_context(
    _logger: object, _name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Processor: add the handled event's topic, group, entry id, event id, deliveries."""
    c = EVENT_CONTEXT.get()
    if c is not None:
        setdefault = event_dict.setdefault
        setdefault("topic", c.topic)
        setdefault("group", c.group)
        setdefault("entry_id", c.entry_id)
        setdefault("event_id", c.event_id)
        setdefault("deliveries", c.deliveries)
        setdefault("attempt", c.attempt)
    return event_dict


def render_plain(_logger: object, _name: str, event_dict: structlog.typing.EventDict) -> str:
    """Processor: ``streamproc: LEVEL: event words (key=value, ...)`` on one line; an
    exception as its last line only (``--verbose`` shows the whole traceback)."""
    level = event_dict.pop("level", "info")
    event = str(event_dict.pop("event", "")).replace("_", " ")
    event_dict.pop("timestamp", None)
    exc = str(event_dict.pop("exception", "")).strip().splitlines()
    if exc:
        event_dict["error"] = exc[-1]
    fields = ", ".join(f"{k}={v}" for k, v in event_dict.items())
    line = f"streamproc: {level}: {event}" + (f" ({fields})" if fields else "")
    return printable(line)  # one line, whatever a value holds


def configure_logging(
    level: str = "info", *, json: bool | None = None, plain: bool = False
) -> None:
    """Structlog for the whole process: ``level`` and above, to stderr; ``plain`` (for
    one-shot commands) one line per message, else JSON (``json``, default: unless a TTY)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        render_plain
        if plain
        else structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            merge_event_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
