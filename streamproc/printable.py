"""Text that came from streams or clients, made safe to show on a terminal.

An event id, key or type (or any field) is chosen by whoever posted it. Printed as is, an ESC
sequence in it would move the cursor, recolour or rewrite earlier lines, set the window title
or, on some terminals, answer back into the operator's shell. ``printable`` writes every such
character as an escape (``\\x1b``, ``\\u202e``); ``NO_CONTROL_PATTERN`` is what event ids, keys
and sources must match at ingest, so they do not carry any in the first place.
"""

from __future__ import annotations

import re

__all__ = ("CONTROL_CHARS", "NO_CONTROL_PATTERN", "printable", "printable_json")

#: A regex character class (without brackets): the C0 controls (ESC included), DEL, the C1
#: controls (U+0080-U+009F; U+009B is a one-character CSI on some terminals), the line and
#: paragraph separators, and the bidirectional overrides and isolates that reorder what a
#: line shows.
CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
#: A msgspec/``re`` pattern: a string without any of ``CONTROL_CHARS``. ``(?!\n)``: Python's
#: ``$`` also matches before a final newline; ECMAScript's (the OpenAPI document's) does not,
#: and ``\Z`` is Python's only.
NO_CONTROL_PATTERN = f"^[^{CONTROL_CHARS}]*$(?!\\n)"

_CONTROL_RE = re.compile(f"[{CONTROL_CHARS}]")
#: What JSON leaves raw in its strings (it escapes the C0 controls itself; a newline outside
#: a string is indentation).
_JSON_RAW_RE = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``)."""
    return _CONTROL_RE.sub(_escape, text)


def printable_json(text: str) -> str:
    """JSON text with the control characters JSON leaves raw (DEL, C1, bidi) as ``\\u``
    escapes: still the same JSON (a control character is only ever inside a string)."""
    return _JSON_RAW_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
