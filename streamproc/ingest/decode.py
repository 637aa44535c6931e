"""Request bodies → typed events, or a precise refusal.

Formats: JSON (one object or an array), NDJSON (one object a line) and msgpack (a map or an
array). Validation is all-or-nothing: every item is checked, and if any is invalid the answer
is 422 listing each bad item's index, JSON path and reason, and nothing is published.

The happy path decodes the whole body with one typed msgspec decoder. Only when it fails, or
when items must be changed before validation (the cluster id of the path, ids derived from an
``Idempotency-Key``), are items decoded one by one.

The batch limit is checked before items become Python objects (a 2 MiB body of ``1\n`` is a
million lines): a msgpack array's header says its length; NDJSON lines are found by one
regular expression that stops at ``max_batch + 1``; a JSON array that could hold more than
``max_batch`` items (as many commas) is counted by a decoder whose items are empty structs
and scalars (at most ~8 bytes of memory per byte of body) before the per-item ``Raw`` decode.
A typed decode that succeeds builds only valid events (~4x the body, bounded by
``max_body_bytes``) before its count is checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from streamproc.event import Event
from streamproc.ingest._http import Problem

__all__ = ("CONTENT_TYPES", "EventDecoder", "validation_problem")

#: Accepted Content-Type values → format.
CONTENT_TYPES = {
    "application/json": "json",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
    "application/vnd.msgpack": "msgpack",
}
#: At most this many item errors are listed in a 422.
MAX_LISTED_ERRORS = 100

_AT = re.compile(r" - at `\$(.*)`$", re.S)
_BYTE = re.compile(r"\(byte (\d+)\)")
_MP_MAP = {0xDE, 0xDF, *range(0x80, 0x90)}
_MP_ARRAY = {0xDC, 0xDD, *range(0x90, 0xA0)}
#: A line with something other than whitespace on it (``bytes.strip``'s whitespace).
_NDJSON_LINE = re.compile(rb"^[ \t\r\f\v]*+[^\s].*", re.M)

#: Called on each item (its index and the decoded object) before validation.
Prepare = Callable[[int, dict[str, Any]], None]


class _IdProbe(msgspec.Struct):
    """Only whether an item carries ``id`` (every other field is skipped)."""

    id: Any = msgspec.UNSET


class _Counted(msgspec.Struct, gc=False):
    """Any JSON object, fields skipped: what counting a batch costs per object item."""


def _mp_array_len(body: bytes) -> int | None:
    """The length a msgpack array's header declares (None when the header is cut short)."""
    first = body[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    size = 2 if first == 0xDC else 4
    return int.from_bytes(body[1 : 1 + size], "big") if len(body) > size else None


class ItemError(Exception):
    """One invalid item: raised by ``Prepare`` callbacks too."""

    def __init__(self, reason: str, sub_path: str = "", code: str = "invalid") -> None:
        super().__init__(reason)
        self.reason, self.sub_path, self.code = reason, sub_path, code


def _float_fields(cls: type[Event]) -> tuple[str, ...]:
    info = msgspec.inspect.type_info(cls)
    out = []
    for f in info.fields:  # type: ignore[attr-defined]
        t = f.type
        types = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
        if any(isinstance(x, msgspec.inspect.FloatType) for x in types):
            out.append(f.name)
    return tuple(out)


def validation_problem(
    errors: list[dict[str, Any]], total: int, known: Sequence[str], *, what: str = "event"
) -> Problem:
    """The 422 for a list of item errors (each ``{index, path, error, reason}``)."""
    first = errors[0]
    extra: dict[str, Any] = {"errors": errors[:MAX_LISTED_ERRORS]}
    if any(e["error"] == "unknown_type" for e in errors):
        extra["known_types"] = list(known)
    prefix = f"{len(errors)} of {total} {what}s invalid, nothing published: " if total > 1 else ""
    p = Problem(422, first["error"], prefix + first["reason"], path=first["path"], **extra)
    p.items = total
    return p


class EventDecoder:
    """Decodes bodies against a tagged union of event types; built once per app."""

    def __init__(self, types: Sequence[type[Event]], *, max_batch: int) -> None:
        union: Any = None
        for t in types:
            union = t if union is None else union | t
        self.union, self.max_batch = union, max_batch
        self.known = sorted(t.type_name() for t in types)
        self._floats = {t: _float_fields(t) for t in types}
        self._json_one = msgspec.json.Decoder(union)
        self._json_many = msgspec.json.Decoder(list[union])
        self._json_raws = msgspec.json.Decoder(list[msgspec.Raw])
        self._json_any = msgspec.json.Decoder()
        self._mp_one = msgspec.msgpack.Decoder(union)
        self._mp_many = msgspec.msgpack.Decoder(list[union])
        self._mp_raws = msgspec.msgpack.Decoder(list[msgspec.Raw])
        self._mp_any = msgspec.msgpack.Decoder()
        #: Counts a JSON array's items without keeping them (see the module doc).
        self._json_count = msgspec.json.Decoder(list[_Counted | bool | int | float | str | None])
        self._probe_json = msgspec.json.Decoder(_IdProbe | list[_IdProbe])
        self._probe_mp = msgspec.msgpack.Decoder(_IdProbe | list[_IdProbe])

    # ------------------------------------------------------------------ entry point

    def decode(
        self, body: bytes, fmt: str, *, prepare: Prepare | None = None
    ) -> tuple[list[Event], bool]:
        """Return (events, is_batch) or raise Problem (400, 413, 422)."""
        if not body.strip():
            raise Problem(400, "empty_body", "the request body is empty")
        try:
            if fmt == "ndjson":
                return self._ndjson(body, prepare), True
            if fmt == "msgpack":
                return self._whole(body, prepare, msgpack=True)
            return self._whole(body, prepare, msgpack=False)
        except UnicodeDecodeError as e:
            raise Problem(
                400, "invalid_utf8", f"text is not valid UTF-8: {e.reason}", position=e.start
            ) from None
        except RecursionError:
            raise Problem(400, "too_deep", "the body is nested too deeply") from None

    def ids_given(self, body: bytes, fmt: str, count: int) -> list[bool]:
        """Per item of a body ``decode`` accepted: did the sender give its ``id``?

        An event posted without one gets an id minted here, which no retry can repeat, so
        it needs no producer-side dedup marker. JSON without the text ``"id"`` (and without
        escapes) has none: that test skips the probe for most bodies.
        """
        if fmt == "ndjson":
            lines = [line for _, line in self._lines(body)]
            return [self._probe_json.decode(line).id is not msgspec.UNSET for line in lines]
        if fmt == "json" and b'"id"' not in body and b"\\" not in body:
            probed: Any = None
        else:
            probed = (self._probe_mp if fmt == "msgpack" else self._probe_json).decode(body)
        if probed is None:
            return [False] * count
        items = probed if isinstance(probed, list) else [probed]
        return [p.id is not msgspec.UNSET for p in items]

    # ------------------------------------------------------------------ formats

    def _whole(
        self, body: bytes, prepare: Prepare | None, *, msgpack: bool
    ) -> tuple[list[Event], bool]:
        if msgpack:
            first = body[0]
            if first not in _MP_MAP and first not in _MP_ARRAY:
                raise Problem(400, "malformed", "expected a msgpack map (one event) or array")
            batch = first in _MP_ARRAY
        else:
            head = body.lstrip()[:1]
            if head not in (b"{", b"["):
                raise Problem(
                    400,
                    "malformed_json",
                    "expected a JSON object (one event) or array (a batch)",
                    position=len(body) - len(body.lstrip()),
                )
            batch = head == b"["
        if msgpack and batch:
            declared = _mp_array_len(body)
            if declared is not None:  # else truncated: the decoders say so
                self._check_count(declared)
        if prepare is None:
            try:
                if batch:
                    events: list[Event] = (self._mp_many if msgpack else self._json_many).decode(
                        body
                    )
                else:
                    events = [(self._mp_one if msgpack else self._json_one).decode(body)]
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass  # find every bad item (or the malformed spot) below
            else:
                self._check_count(len(events))
                self._check_finite(events, batch)
                return events, batch
        try:
            if batch and not msgpack and body.count(b",") >= self.max_batch:
                self._check_count(self._count_json(body))
            raws: list[Any] = (
                (self._mp_raws if msgpack else self._json_raws).decode(body) if batch else [body]
            )
        except msgspec.DecodeError as e:
            raise self._malformed(e, msgpack, size=len(body)) from None
        except msgspec.ValidationError as e:  # a single object that is not one (msgpack)
            raise Problem(400, "malformed", str(e)) from None
        self._check_count(len(raws))
        return self._items(raws, batch, prepare, msgpack=msgpack, lines=None), batch

    def _count_json(self, body: bytes) -> int:
        """How many items a JSON array holds, keeping none; 422 for an item that is an array."""
        try:
            return len(self._json_count.decode(body))
        except msgspec.ValidationError as e:
            # An item no event can be (an array): refused at the first, the rest uncounted.
            m = _AT.search(str(e))
            path = "$" + (m.group(1) if m else "")
            index = int(path[2:-1]) if path.startswith("$[") and path.endswith("]") else 0
            reason = "Expected `object`, got `array`"
            error = {"index": index, "path": path, "error": "invalid", "reason": reason}
            raise validation_problem([error], 1, self.known) from None

    def _lines(self, body: bytes) -> list[tuple[int, bytes]]:
        """The non-blank lines (number, text) of an NDJSON body; 413 past ``max_batch``."""
        lines: list[tuple[int, bytes]] = []
        number, at = 1, 0
        for m in _NDJSON_LINE.finditer(body):
            if len(lines) == self.max_batch:
                self._check_count(self.max_batch + 1, exact=False)
            number += body.count(b"\n", at, m.start())
            at = m.start()
            lines.append((number, m.group()))
        return lines

    def _ndjson(self, body: bytes, prepare: Prepare | None) -> list[Event]:
        lines = self._lines(body)
        self._check_count(len(lines))
        return self._items(
            [line for _, line in lines], True, prepare, msgpack=False, lines=[n for n, _ in lines]
        )

    # ------------------------------------------------------------------ items

    def _items(
        self,
        raws: Sequence[Any],
        batch: bool,
        prepare: Prepare | None,
        *,
        msgpack: bool,
        lines: list[int] | None,
    ) -> list[Event]:
        one = self._mp_one if msgpack else self._json_one
        anyd = self._mp_any if msgpack else self._json_any
        events: list[Event] = []
        errors: list[dict[str, Any]] = []
        for i, raw in enumerate(raws):
            where = f"$[{i}]" if batch else "$"
            try:
                if prepare is None:
                    events.append(one.decode(raw))
                    continue
                obj = anyd.decode(raw)
                if not isinstance(obj, dict):
                    raise ItemError(f"Expected `object`, got `{type(obj).__name__}`")
                prepare(i, obj)
                events.append(msgspec.convert(obj, self.union))
            except msgspec.ValidationError as e:
                errors.append(self._item_error(i, where, str(e)))
            except ItemError as e:
                errors.append(
                    {"index": i, "path": where + e.sub_path, "error": e.code, "reason": e.reason}
                )
            except msgspec.DecodeError as e:
                line = None if lines is None else lines[i]
                raise self._malformed(e, msgpack, size=len(raw), line=line) from None
        if errors:
            raise validation_problem(errors, len(raws), self.known)
        self._check_finite(events, batch)
        return events

    def _item_error(self, index: int, where: str, message: str) -> dict[str, Any]:
        m = _AT.search(message)
        reason, sub = (message[: m.start()], m.group(1)) if m else (message, "")
        code = "invalid"
        if reason == "Object missing required field `type`":
            code, sub = "unknown_type", ".type"
            reason = f"the event has no `type`; known types: {', '.join(self.known)}"
        elif sub == ".type" and reason.startswith("Invalid value"):
            code = "unknown_type"
            reason = f"unknown event type {reason[len('Invalid value ') :]}; known types: " + (
                ", ".join(self.known)
            )
        return {"index": index, "path": where + sub, "error": code, "reason": reason}

    # ------------------------------------------------------------------ checks

    def _check_count(self, n: int, *, exact: bool = True) -> None:
        if n > self.max_batch:
            count = f"{n}" if exact else f"more than {self.max_batch}"
            p = Problem(
                413,
                "batch_too_large",
                f"{count} events in one request, over the limit of {self.max_batch}",
                limit=self.max_batch,
            )
            p.items = n
            raise p
        if n == 0:
            raise Problem(400, "empty_batch", "the batch holds no events")

    def _check_finite(self, events: list[Event], batch: bool) -> None:
        """msgpack can carry NaN and infinities, which JSON (the wire format) cannot."""
        errors = []
        for i, ev in enumerate(events):
            for name in self._floats.get(type(ev), ()):
                value = getattr(ev, name)
                if value is not None and not math.isfinite(value):
                    path = (f"$[{i}]" if batch else "$") + f".{name}"
                    reason = f"Expected a finite number, got {value}"
                    errors.append({"index": i, "path": path, "error": "invalid", "reason": reason})
        if errors:
            raise validation_problem(errors, len(events), self.known)

    @staticmethod
    def _malformed(
        e: msgspec.DecodeError, msgpack: bool, *, size: int, line: int | None = None
    ) -> Problem:
        extra: dict[str, Any] = {}
        m = _BYTE.search(str(e))
        if m:
            extra["position"] = int(m.group(1))
        elif "truncated" in str(e):
            extra["position"] = size  # it ended too early: the error is at the end
        if line is not None:
            extra["line"] = line
        code = "malformed" if msgpack else "malformed_json"
        where = f"line {line}: " if line is not None else ""
        return Problem(400, code, where + str(e), **extra)
