"""Logging set-up for the entry point (the library itself only logs).

JSON lines when stderr is not a terminal, readable colourless key=value lines when it is.
Handlers and the runtime bind topic, group, entry id and event id with structlog's
contextvars, so every line of one event carries them.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

import structlog

__all__ = ("EVENT_CONTEXT", "configure_logging", "merge_event_context")

#: The event being handled in this task: (topic, group, entry id, event id, deliveries, attempt).
EVENT_CONTEXT: ContextVar[tuple[str, str, str, str, int, int] | None] = ContextVar(
    "streamproc_event", default=None
)
_EVENT_FIELDS = ("topic", "group", "entry_id", "event_id", "deliveries", "attempt")


def merge_event_context(
    _logger: object, _name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Processor: add the handled event's topic, group, entry id, event id, deliveries."""
    current = EVENT_CONTEXT.get()
    if current is not None:
        for name, value in zip(_EVENT_FIELDS, current, strict=True):
            event_dict.setdefault(name, value)
    return event_dict


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
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
