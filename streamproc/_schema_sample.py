"""A minimal valid value of any type msgspec can decode, for ``schema snapshot``'s samples.

``example(type_info)`` walks ``msgspec.inspect``'s description of a type and builds the
smallest value that satisfies it: required fields only (plus fields whose default comes from a
factory, so that the sample is the same on every run), empty containers, the lowest number
within bounds, the first literal. Strings with a ``pattern`` are the first of a few candidates
that matches (a regex is not turned into text); a field none fits makes the sample fail with
its path, so that it can be given a default or a pattern one of the candidates matches.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
from typing import Any

import msgspec
import msgspec.inspect as mi

__all__ = ("SampleError", "example")

#: A fixed instant: samples are the same on every run, so the snapshot only changes with the code.
SAMPLE_TIME = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
#: Strings tried in order against a field's length bounds and pattern.
_STRINGS = ("sample", "i-0123456789abcdef0", "eu-west-1", "a", "0", "sample@example.com")


class SampleError(Exception):
    """No sample value satisfies the type at ``path``."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")


def example(t: mi.Type, path: str) -> Any:
    """A minimal value of type ``t`` as msgspec.convert takes it (``path`` names it in errors)."""
    if isinstance(t, mi.StrType):
        return _string(t, path)
    if isinstance(t, mi.IntType | mi.FloatType):
        return _number(t, path)
    if isinstance(t, mi.StructType | mi.DataclassType | mi.TypedDictType):
        return _record(t, path)
    if isinstance(t, mi.UnionType):
        return _union(t, path)
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        count = t.min_length or 0
        if count > 1 and isinstance(t, mi.SetType | mi.FrozenSetType):
            raise SampleError(path, f"a set of at least {count} distinct items")
        return [example(t.item_type, f"{path}[]")] * count
    if isinstance(t, mi.DictType):
        if t.min_length:
            raise SampleError(path, f"a mapping of at least {t.min_length} distinct keys")
        return {}
    if isinstance(t, mi.TupleType):
        return [example(item, f"{path}[{i}]") for i, item in enumerate(t.item_types)]
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
        return b"x" * (t.min_length or 0)
    return _scalar(t, path)


def _scalar(t: mi.Type, path: str) -> Any:
    if isinstance(t, mi.NoneType | mi.AnyType):
        return None
    if isinstance(t, mi.BoolType):
        return False
    if isinstance(t, mi.DateTimeType):
        return SAMPLE_TIME.replace(tzinfo=None) if t.tz is False else SAMPLE_TIME
    if isinstance(t, mi.DateType):
        return SAMPLE_TIME.date()
    if isinstance(t, mi.TimeType):
        return dt.time(0, 0) if t.tz is False else dt.time(0, 0, tzinfo=dt.UTC)
    if isinstance(t, mi.TimeDeltaType):
        return dt.timedelta(0)
    if isinstance(t, mi.UUIDType):
        return uuid.UUID(int=0)
    if isinstance(t, mi.DecimalType):
        return decimal.Decimal(0)
    raise SampleError(path, f"no sample value for {type(t).__name__}")


def _string(t: mi.StrType, path: str) -> str:
    low, high = t.min_length or 0, t.max_length
    for text in (*_STRINGS, "x" * low):
        if len(text) < low or (high is not None and len(text) > high):
            continue
        if t.pattern is None or re.search(t.pattern, text):
            return text
    raise SampleError(
        path,
        f"none of {list(_STRINGS)} has {low} to {high} characters and matches {t.pattern!r}",
    )


def _number(t: mi.IntType | mi.FloatType, path: str) -> int | float:
    one: int | float = 1 if isinstance(t, mi.IntType) else 1.0
    candidates = [one * 0, t.ge, t.le]
    candidates += [
        t.gt + one if t.gt is not None else None,
        t.lt - one if t.lt is not None else None,
    ]
    for value in candidates:
        if value is not None and _within(t, value):
            return value
    raise SampleError(path, f"no number satisfies {t}")


def _within(t: mi.IntType | mi.FloatType, value: float) -> bool:
    return (
        (t.ge is None or value >= t.ge)
        and (t.gt is None or value > t.gt)
        and (t.le is None or value <= t.le)
        and (t.lt is None or value < t.lt)
        and (t.multiple_of is None or value % t.multiple_of == 0)
    )


def _record(t: mi.StructType | mi.DataclassType | mi.TypedDictType, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(t, mi.StructType) and t.tag_field is not None:
        out[t.tag_field] = t.tag
    for f in t.fields:
        if f.required or f.default_factory is not msgspec.NODEFAULT:
            out[f.encode_name] = example(f.type, f"{path}.{f.encode_name}")
    return out


def _union(t: mi.UnionType, path: str) -> Any:
    errors: list[str] = []
    for alternative in t.types:
        try:
            return example(alternative, path)
        except SampleError as e:
            errors.append(str(e))
    raise SampleError(path, f"no alternative of the union has a sample: {'; '.join(errors)}")
