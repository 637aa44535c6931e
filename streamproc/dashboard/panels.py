"""Application panels on the dashboard: a table an application adds without the engine
knowing what it shows.

An application passes ``App(panels=[Panel("workers", "Workers", read_workers)])``; ``read`` is
``async (redis, keys) -> PanelData``, called once per snapshot (about every second, whatever
the number of open pages). Its table is sent with the snapshot and drawn as plain text (never
HTML: the values are whatever others wrote to Redis).

The engine keeps one panel from hurting the page: a read that raises or takes longer than
``timeout_s`` shows its error in its own panel (logged once per new error) and the rest of the
snapshot is sent as usual; at most ``MAX_ROWS`` rows and ``MAX_COLUMNS`` columns are kept, and
text cells are cut at ``MAX_CELL_CHARS``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import structlog

from streamproc.errors import ConfigError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streamproc.keys import Keys

__all__ = (
    "MAX_CELL_CHARS",
    "MAX_COLUMNS",
    "MAX_ROWS",
    "Cell",
    "Panel",
    "PanelData",
    "PanelReader",
    "PanelView",
    "check_panels",
)

log = structlog.get_logger("streamproc.dashboard")

#: Rows sent per panel (``PanelData.total`` says how many there are).
MAX_ROWS = 200
MAX_COLUMNS = 32
#: Longer text cells are cut (with "…").
MAX_CELL_CHARS = 1000
_MAX_ERROR_CHARS = 500
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

#: One table cell: text, a number, or None (shown as a dash).
Cell = str | int | float | None


class PanelData(msgspec.Struct, kw_only=True):
    """What a panel's ``read`` returns: the first rows of a table and how many there are."""

    columns: list[str]
    #: At most ``MAX_ROWS`` (more are dropped), each with one cell per column.
    rows: list[list[Cell]]
    #: All rows there are (``len(rows)`` or more).
    total: int
    #: A line shown under the table (what is left out, where the figures come from).
    note: str = ""


#: ``read(redis, keys)``: the panel's table now.
PanelRead = Callable[["aioredis.Redis", "Keys"], Awaitable[PanelData]]


@dataclass(frozen=True, slots=True)
class Panel:
    """A table on the dashboard: ``name`` (its id: lowercase letters, digits, ``_``, ``-``),
    ``title`` (its heading) and ``read`` (``async (redis, keys) -> PanelData``)."""

    name: str
    title: str
    read: PanelRead

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigError(
                f"invalid panel name {self.name!r}: 1-63 lowercase letters, digits, '_', '-'"
            )
        if not isinstance(self.title, str) or not self.title.strip():
            raise ConfigError(f"panel {self.name!r} needs a title")
        if not callable(self.read):
            raise ConfigError(f"panel {self.name!r}: read must be an async callable")


def check_panels(panels: Sequence[object]) -> tuple[Panel, ...]:
    """``panels`` as a tuple of Panel objects with distinct names, else a ConfigError."""
    out: dict[str, Panel] = {}
    for p in panels:
        if not isinstance(p, Panel):
            raise ConfigError(f"App(panels=...) takes streamproc Panel objects, not {p!r}")
        if p.name in out:
            raise ConfigError(f"two panels are named {p.name!r}")
        out[p.name] = p
    return tuple(out.values())


class PanelView(msgspec.Struct, kw_only=True):
    """A panel as the snapshot carries it; ``error`` set (and no rows) when its read failed."""

    name: str
    title: str
    columns: list[str] = []
    rows: list[list[Cell]] = []
    total: int = 0
    note: str = ""
    error: str | None = None


def _clip(text: str, n: int = MAX_CELL_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(value: object) -> Cell:
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return _clip(value)
    raise TypeError(f"a cell is {type(value).__name__}, not text, a number or None")


def _view(panel: Panel, data: object) -> PanelView:
    """The checked, bounded table; TypeError/ValueError when ``data`` is not one."""
    if not isinstance(data, PanelData):
        raise TypeError(f"read returned {type(data).__name__}, not PanelData")
    columns = [_clip(str(c), 100) for c in data.columns]
    if not columns or len(columns) > MAX_COLUMNS:
        raise ValueError(f"{len(columns)} columns (1 to {MAX_COLUMNS})")
    rows: list[list[Cell]] = []
    for i, row in enumerate(data.rows[:MAX_ROWS]):
        if not isinstance(row, list | tuple) or len(row) != len(columns):
            raise ValueError(f"row {i} does not have one cell per column ({len(columns)})")
        rows.append([_cell(v) for v in row])
    return PanelView(
        name=panel.name,
        title=panel.title,
        columns=columns,
        rows=rows,
        total=max(int(data.total), len(rows)),
        note=_clip(str(data.note)),
    )


class PanelReader:
    """Reads every panel for one snapshot, each within ``timeout_s``, concurrently; a failure
    becomes that panel's ``error``. Logs an error when it first appears, not every second."""

    def __init__(self, panels: Sequence[Panel], *, timeout_s: float = 2.0) -> None:
        self.panels = check_panels(panels)
        self.timeout_s = timeout_s
        self._errors: dict[str, str] = {}  # panel → the error last logged

    async def read(self, client: aioredis.Redis, keys: Keys) -> list[PanelView]:
        if not self.panels:
            return []
        return list(await asyncio.gather(*(self._one(p, client, keys) for p in self.panels)))

    async def _one(self, panel: Panel, client: aioredis.Redis, keys: Keys) -> PanelView:
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await panel.read(client, keys)
            view = _view(panel, data)
        except TimeoutError:
            return self._failed(panel, f"no answer within {self.timeout_s:g} s")
        except Exception as e:  # the application's code: shown in its panel, never raised
            return self._failed(panel, f"{type(e).__name__}: {e}", exc=e)
        if self._errors.pop(panel.name, None) is not None:
            log.info("dashboard_panel_recovered", panel=panel.name)
        return view

    def _failed(self, panel: Panel, error: str, exc: Exception | None = None) -> PanelView:
        error = _clip(error, _MAX_ERROR_CHARS)
        if self._errors.get(panel.name) != error:
            self._errors[panel.name] = error
            log.warning("dashboard_panel_failed", panel=panel.name, error=error, exc_info=exc)
        return PanelView(name=panel.name, title=panel.title, error=error)
