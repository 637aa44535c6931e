"""Schema compatibility: the registry's event types against a committed snapshot of them.

``describe`` writes down every event type of a registry: its class, topic and version, each
field (by wire name) with its type as JSON Schema (``msgspec.json.schema_components``, nested
types inlined, titles and docstrings left out) and whether it is required or has a default,
and one sample entry, encoded by the real ``Codec`` from a minimal valid instance.

``compare(old, new)`` lists what would break stored entries or code still running the old
version:

* a type removed, or its tag changed (stored entries name the old tag); its topic changed;
* a field removed that had no default (the previous version cannot decode new entries), or
  one removed from a nested type that forbids unknown fields (stored entries carry it);
* a new field without a default, or a default removed (stored entries lack the field);
* a type narrowed or changed: another JSON type, a bound tightened or added (``maxLength``,
  ``minimum``, ``pattern`` ...), a literal value or union alternative dropped.

Accepted: new types, new fields with a default, removing a field that has a default, union
alternatives and literal values added, bounds loosened or removed, ``integer`` widened to
``number``, a changed default value (every entry stores every field, so stored ones keep
theirs), renamed Python classes and attributes whose wire names stay. ``decode_samples``
then decodes each stored sample with the current code: the proof for what JSON Schema does
not express (a datetime's ``tz``, a custom ``dec_hook``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import msgspec
import msgspec.inspect as mi

from streamproc._schema_sample import SampleError, example
from streamproc.codec import Codec, Registry
from streamproc.errors import ConfigError, DecodeError
from streamproc.printable import NO_CONTROL_PATTERN

__all__ = (
    "DEFAULT_SNAPSHOT",
    "FieldDoc",
    "Problem",
    "Snapshot",
    "TypeDoc",
    "compare",
    "decode_samples",
    "describe",
    "load",
    "render",
)

#: Where ``streamproc schema snapshot`` writes and ``check`` reads, from the current directory.
DEFAULT_SNAPSHOT = Path("schemas/snapshot.json")
FORMAT = 1
#: A snapshot file larger than this is refused unread (this repository's is about 100 KiB).
MAX_SNAPSHOT_BYTES = 8 << 20
#: Deeper type schemas are refused (the comparison recurses once per level).
MAX_SCHEMA_DEPTH = 64

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NO_CONTROL_PATTERN)]
_WireField = Annotated[str, msgspec.Meta(pattern="^(type|id|ts|key|v|data)$")]
#: Schema keys that document rather than constrain: left out of descriptions, never compared.
_DOC_KEYS = frozenset({"title", "description", "examples", "discriminator", "default"})
#: Bounds that a new version may lower (or drop), and bounds it may raise (or drop).
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"})


class FieldDoc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One field: its type as JSON Schema, and required, or its default (value or factory)."""

    type: dict[str, Any]
    required: bool
    default: Any = msgspec.UNSET
    default_factory: str | msgspec.UnsetType = msgspec.UNSET


class TypeDoc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One event type: where it is published, its fields by wire name, one stored entry."""

    cls: str = msgspec.field(name="class")
    topic: str
    version: int
    fields: dict[_Name, FieldDoc]
    sample: dict[_WireField, str]


class Snapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    types: dict[_Name, TypeDoc]

    def field_count(self) -> int:
        return sum(len(t.fields) for t in self.types.values())


class _Head(msgspec.Struct):
    format: int


class Problem(NamedTuple):
    """An incompatible change at ``path`` (``type``, ``type.field``, ``type.field.sub``)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ---------------------------------------------------------------------- describe


def describe(registry: Registry[Any]) -> Snapshot:
    """The snapshot of ``registry``; raises ConfigError when a type has no sample."""
    codec = Codec(registry)
    types: dict[str, TypeDoc] = {}
    for tag, cls in sorted(registry.by_name.items()):
        fields = {f.encode_name: _field_doc(f) for f in msgspec.structs.fields(cls)}
        try:
            instance = msgspec.convert(example(mi.type_info(cls), tag), cls)
        except (SampleError, msgspec.ValidationError) as e:
            raise ConfigError(f"schema: no sample entry of {tag} can be built: {e}") from None
        sample = {k.decode(): v.decode() for k, v in codec.encode(instance).items()}
        types[tag] = TypeDoc(
            f"{cls.__module__}.{cls.__qualname__}", cls.topic, cls.version, fields, sample
        )
    return Snapshot(FORMAT, types)


def _field_doc(f: msgspec.structs.FieldInfo) -> FieldDoc:
    (schema,), defs = msgspec.json.schema_components([f.type], ref_template="#/$defs/{name}")
    doc = FieldDoc(_inline(schema, defs, ()), f.required)
    if f.default is not msgspec.NODEFAULT:
        as_json = msgspec.json.decode(msgspec.json.encode(f.default))  # a tuple as a list
        return msgspec.structs.replace(doc, default=as_json)
    if f.default_factory is not msgspec.NODEFAULT:
        name = getattr(f.default_factory, "__qualname__", repr(f.default_factory))
        return msgspec.structs.replace(doc, default_factory=name)
    return doc


def _inline(node: Any, defs: Mapping[str, Any], seen: tuple[str, ...]) -> Any:
    """``node`` with each ``$ref`` replaced by its definition (kept where a type recurses)."""
    if isinstance(node, list):
        return [_inline(x, defs, seen) for x in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        return node if name in seen else _inline(defs[name], defs, (*seen, name))
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DOC_KEYS:
            continue
        if key == "properties":  # field names, not schema keywords
            out[key] = {name: _inline(s, defs, seen) for name, s in value.items()}
        elif key in ("enum", "const"):
            out[key] = value
        else:
            out[key] = _inline(value, defs, seen)
    return out


# ---------------------------------------------------------------------- compare


def compare(old: Snapshot, new: Snapshot) -> list[Problem]:
    """Every incompatible change from ``old`` to ``new``, sorted by path."""
    problems: list[Problem] = []
    retagged = {t.cls: tag for tag, t in new.types.items() if tag not in old.types}
    for tag, was in sorted(old.types.items()):
        now = new.types.get(tag)
        if now is None:
            moved = retagged.get(was.cls)
            problems.append(
                Problem(tag, f"tag changed to {moved!r}: stored entries no longer decode")
                if moved
                else Problem(tag, "type removed: stored entries no longer decode")
            )
            continue
        if now.topic != was.topic:
            problems.append(
                Problem(
                    tag,
                    f"topic changed from {was.topic!r} to {now.topic!r}: stored entries are left "
                    "on the old stream",
                )
            )
        problems += _fields(tag, _as_object(was.fields), _as_object(now.fields))
    return problems


def _as_object(fields: Mapping[str, FieldDoc]) -> dict[str, Any]:
    """An event's fields as the JSON Schema of an object, like a nested type's."""
    return {
        "properties": {name: f.type for name, f in fields.items()},
        "required": sorted(name for name, f in fields.items() if f.required),
    }


def _fields(path: str, old: dict[str, Any], new: dict[str, Any]) -> list[Problem]:
    """The fields of an object (event or nested type) whose ``properties`` both have."""
    was, now = old["properties"], new["properties"]
    was_required, now_required = _names(old.get("required")), _names(new.get("required"))
    forbids_unknown = new.get("additionalProperties") is False
    problems: list[Problem] = []
    for name in sorted(was.keys() | now.keys()):
        at = f"{path}.{name}"
        if name not in now:
            if name in was_required:
                problems.append(
                    Problem(
                        at,
                        "field without a default removed: the previous version cannot decode "
                        "new entries (give it a default first)",
                    )
                )
            elif forbids_unknown:
                problems.append(
                    Problem(
                        at,
                        "field removed from a type that forbids unknown fields: stored entries "
                        "carrying it no longer decode",
                    )
                )
        elif name not in was:
            if name in now_required:
                problems.append(Problem(at, "new field without a default: stored entries lack it"))
        else:
            if name in now_required and name not in was_required:
                problems.append(
                    Problem(at, "default removed: stored entries without the field fail")
                )
            problems += _type(at, was[name], now[name])
    return problems


def _names(value: Any) -> set[str]:
    return {x for x in value if isinstance(x, str)} if isinstance(value, list) else set()


def _type(path: str, old: Any, new: Any) -> list[Problem]:
    """Problems when type ``new`` does not accept every value of type ``old``."""
    if old == new:
        return []
    changed = Problem(path, f"type narrowed or changed from {_show(old)} to {_show(new)}")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [changed]
    if "anyOf" in old or "anyOf" in new:
        olds = old.get("anyOf", [old])
        news = new.get("anyOf", [new])
        if not isinstance(olds, list) or not isinstance(news, list):
            return [changed]
        return _union(path, olds, news, changed)
    problems: list[Problem] = []
    structs = isinstance(old.get("properties"), dict) and isinstance(new.get("properties"), dict)
    if structs:
        problems += _fields(path, old, new)
    narrowed = False
    for key in sorted(old.keys() | new.keys()):
        was, now = old.get(key), new.get(key)
        if was == now or key in _DOC_KEYS or (structs and key in ("properties", "required")):
            continue
        if key in ("items", "additionalProperties") and isinstance(was, dict | list):
            if isinstance(now, dict) and isinstance(was, dict):
                problems += _type(f"{path}[]", was, now)
            else:
                narrowed = narrowed or now is not None
        elif key == "prefixItems" and isinstance(was, list) and isinstance(now, list):
            narrowed = narrowed or len(was) != len(now)
            for i, (o, n) in enumerate(zip(was, now, strict=False)):
                problems += _type(f"{path}[{i}]", o, n)
        else:
            narrowed = narrowed or not _loosened(key, was, now)
    return [changed, *problems] if narrowed else problems


def _union(path: str, olds: list[Any], news: list[Any], changed: Problem) -> list[Problem]:
    """Every old alternative must be accepted by a new one. One that is not is reported in
    detail against the one new alternative of the same JSON type (a nested object's fields),
    else as ``changed``."""
    problems: list[Problem] = []
    for o in olds:
        found = [(n, _type(path, o, n)) for n in news]
        if any(not p for _, p in found):
            continue
        kind = o.get("type") if isinstance(o, dict) else None
        same = [p for n, p in found if isinstance(n, dict) and kind and n.get("type") == kind]
        problems += same[0] if len(same) == 1 else [changed]
    return list(dict.fromkeys(problems))


def _loosened(key: str, was: Any, now: Any) -> bool:
    """Whether one keyword's change from ``was`` to ``now`` (None: absent) accepts more."""
    if now is None:  # a bound or restriction dropped
        return key in _LOWER_BOUNDS | _UPPER_BOUNDS | {"pattern", "format", "multipleOf"}
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (was, now))
    if key in _LOWER_BOUNDS:
        return numbers and bool(now <= was)
    if key in _UPPER_BOUNDS:
        return numbers and bool(now >= was)
    if key == "type":
        return (was, now) == ("integer", "number")
    if key == "enum" and isinstance(was, list) and isinstance(now, list):
        return all(v in now for v in was)
    return False


def _show(schema: Any) -> str:
    text = msgspec.json.encode(schema, order="sorted").decode()
    return text if len(text) <= 160 else f"{text[:157]}..."


# ---------------------------------------------------------------------- samples


def decode_samples(snapshot: Snapshot, codec: Codec[Any]) -> list[Problem]:
    """Each stored sample whose type still exists, decoded by ``codec`` (the current code)."""
    problems: list[Problem] = []
    for tag, t in sorted(snapshot.types.items()):
        if tag not in codec.registry:
            continue  # compare reports the type removed
        try:
            codec.decode({k.encode(): v.encode() for k, v in t.sample.items()})
        except DecodeError as e:
            problems.append(Problem(tag, f"stored sample entry no longer decodes: {e}"))
    return problems


# ---------------------------------------------------------------------- the file


def render(snapshot: Snapshot) -> str:
    """The snapshot as sorted JSON, one line per field and per sample wire field."""
    return _render(msgspec.to_builtins(snapshot), 0) + "\n"


def _render(value: Any, depth: int) -> str:
    if not isinstance(value, dict) or not value or depth >= 4:
        return msgspec.json.encode(value, order="sorted").decode()
    pad = "  " * (depth + 1)
    lines = [f'{pad}"{k}": {_render(v, depth + 1)}' for k, v in sorted(value.items())]
    return "{\n" + ",\n".join(lines) + "\n" + "  " * depth + "}"


def load(path: Path) -> Snapshot:
    """The snapshot in ``path``; ConfigError saying precisely why when it is not one."""
    hint = "(write one with `streamproc schema snapshot`)"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"schema snapshot {path} does not exist {hint}") from None
    except OSError as e:
        raise ConfigError(f"schema snapshot {path} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise ConfigError(
            f"schema snapshot {path} is over {MAX_SNAPSHOT_BYTES} bytes: not a snapshot {hint}"
        )
    try:
        head = msgspec.json.decode(data, type=_Head)
        if head.format != FORMAT:
            raise ConfigError(
                f"schema snapshot {path} has format {head.format}; this streamproc reads "
                f"format {FORMAT} {hint}"
            )
        snapshot = msgspec.json.decode(data, type=Snapshot)
    except msgspec.ValidationError as e:
        raise ConfigError(f"schema snapshot {path} is not a snapshot: {e}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"schema snapshot {path} is not JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"schema snapshot {path} is nested too deeply to be one") from None
    for tag, t in snapshot.types.items():
        if t.sample.get("type") != tag:
            raise ConfigError(
                f"schema snapshot {path} is not a snapshot: the sample of {tag} is not of "
                f"that type - at `$.types.{tag}.sample.type`"
            )
        for name, field in t.fields.items():
            if _depth(field.type) > MAX_SCHEMA_DEPTH:
                raise ConfigError(
                    f"schema snapshot {path} is not a snapshot: the type of {tag}.{name} is "
                    f"nested over {MAX_SCHEMA_DEPTH} levels deep"
                )
    return snapshot


def _depth(node: Any) -> int:
    """How deeply lists and objects nest in ``node`` (iterative: any depth is safe)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, level)
            stack += [(child, level + 1) for child in value]
    return deepest
