"""``streamproc schema check``: the registry against its committed snapshot.

Incompatible changes (a type or a required field removed, a type narrowed or changed, a new
field without a default, a default removed, a tag changed) fail with their path; compatible
ones (new types, new fields with defaults, widened unions, looser bounds) pass; a stored sample
that no longer decodes fails; a snapshot file that is not one exits 2 with the reason. None of
it needs Redis: every CLI run here points REDIS_URL at a closed port.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast

import msgspec
import pytest

from schemas import REGISTRY
from streamproc import schema_check
from streamproc.codec import Codec, Registry
from streamproc.event import Event
from tests.helpers import CliRun, cli_in_process

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "schemas" / "snapshot.json"
NO_REDIS = {"REDIS_URL": "redis://127.0.0.1:1/0"}
TINY = "tests.tiny_app:app"


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    def go(*args: str) -> CliRun:
        return cli_in_process(monkeypatch, capsys, NO_REDIS, *args)

    return go


# ---------------------------------------------------------------------- test-local event types


class Inner(msgspec.Struct, frozen=True):
    x: int
    y: str = ""


# Types of nested fields are module-level: msgspec resolves annotations in the module's globals.
class InnerWithZ(msgspec.Struct, frozen=True, kw_only=True):
    x: int
    y: str = ""
    z: int


class InnerWidened(msgspec.Struct, frozen=True):
    x: int | str
    y: str = ""
    w: int = 0


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    x: int = 0
    y: int = 0


class StrictNow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    x: int = 0


class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
    topic: ClassVar[str] = "things"
    name: str
    count: int = 0
    level: Literal["a", "b"] = "a"
    label: Annotated[str, msgspec.Meta(max_length=64)] = ""
    size: int | None = None
    inner: Inner | None = None
    at: dt.datetime | None = None


class Other(Event, frozen=True, kw_only=True, tag="test.other"):
    topic: ClassVar[str] = "things"


class _InThings(Event, frozen=True, kw_only=True):
    topic: ClassVar[str] = "things"


def snap(*types: type[Event]) -> schema_check.Snapshot:
    return schema_check.describe(Registry(types))


def problems(old: schema_check.Snapshot, *types: type[Event]) -> list[str]:
    """What ``check`` says about the registry of ``types`` against ``old``."""
    registry = Registry(types)
    found = schema_check.compare(old, schema_check.describe(registry))
    return [str(p) for p in found + schema_check.decode_samples(old, Codec(registry))]


OLD = snap(Thing, Other)


# ---------------------------------------------------------------------- the committed snapshot


def test_the_current_registry_is_compatible_with_the_committed_snapshot(run: Any) -> None:
    result = run("schema", "check", "--snapshot", str(COMMITTED))
    assert result.returncode == 0, result.stderr
    current = schema_check.describe(REGISTRY)
    assert result.stdout.startswith(
        f"ok: {len(current.types)} types, {current.field_count()} fields"
    )


def test_check_reads_schemas_snapshot_json_from_the_current_directory_by_default(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert run("schema", "check").returncode == 0


def test_snapshot_is_the_same_on_every_run_and_reads_back(run: Any, tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert run("schema", "snapshot", "--out", str(first)).returncode == 0
    assert run("schema", "snapshot", "--out", str(second)).returncode == 0
    assert first.read_bytes() == second.read_bytes()
    assert schema_check.load(first) == schema_check.describe(REGISTRY)
    assert json.loads(first.read_text())["format"] == 1


def test_every_committed_sample_decodes_to_its_type() -> None:
    committed = schema_check.load(COMMITTED)
    codec = Codec(REGISTRY)
    for tag, t in committed.types.items():
        if tag in REGISTRY:
            event = codec.decode({k.encode(): v.encode() for k, v in t.sample.items()})
            assert type(event).type_name() == tag


# ---------------------------------------------------------------------- incompatible changes


def test_a_removed_field_without_default_fails() -> None:
    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        count: int = 0

    assert problems(snap(Thing), Thing) == []
    assert problems(OLD, Thing, Other) == [
        "test.thing.name: field without a default removed: the previous version cannot decode "
        "new entries (give it a default first)"
    ]


def test_a_changed_type_fails() -> None:
    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str
        count: str = ""

    assert problems(snap(Thing), Thing) == []
    found = problems(OLD, Thing, Other)
    assert found[0] == (
        'test.thing.count: type narrowed or changed from {"type":"integer"} to {"type":"string"}'
    )
    # The stored sample (count 0) fails too: the proof by decoding.
    assert found[1].startswith("test.thing: stored sample entry no longer decodes: invalid: ")
    assert "`$.count`" in found[1]
    assert len(found) == 2


@pytest.mark.parametrize(
    ("name", "annotation", "default", "was", "now"),
    [
        (
            "label",
            Annotated[str, msgspec.Meta(max_length=8)],
            "",
            '{"maxLength":64,"type":"string"}',
            '{"maxLength":8,"type":"string"}',
        ),
        (
            "label",
            Annotated[str, msgspec.Meta(max_length=64, pattern="^[a-z]*$")],
            "",
            '{"maxLength":64,"type":"string"}',
            '{"maxLength":64,"pattern":"^[a-z]*$","type":"string"}',
        ),
        ("level", Literal["a"], "a", '{"enum":["a","b"]}', '{"enum":["a"]}'),
        ("size", int, 0, '{"anyOf":[{"type":"integer"},{"type":"null"}]}', '{"type":"integer"}'),
    ],
)
def test_a_narrowed_type_fails(
    name: str, annotation: Any, default: Any, was: str, now: str
) -> None:
    narrowed = cast(
        type[Event],
        msgspec.defstruct(
            "Thing",
            [("name", str), (name, annotation, default)],
            bases=(_InThings,),
            frozen=True,
            kw_only=True,
            tag="test.thing",
        ),
    )
    found = problems(OLD, narrowed, Other)
    assert found[0] == f"test.thing.{name}: type narrowed or changed from {was} to {now}"
    # Only the narrowed union fails the sample too (it stored size null).
    assert len(found) == (2 if name == "size" else 1)


def test_a_new_required_field_and_a_removed_default_fail() -> None:
    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str
        count: int
        region: str

    found = problems(OLD, Thing, Other)
    assert "test.thing.count: default removed: stored entries without the field fail" in found
    assert "test.thing.region: new field without a default: stored entries lack it" in found
    assert any(p.startswith("test.thing: stored sample entry no longer decodes") for p in found)


def test_a_new_required_field_in_a_nested_type_fails_with_its_path() -> None:
    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str
        inner: InnerWithZ | None = None

    assert problems(OLD, Thing, Other) == [
        "test.thing.inner.z: new field without a default: stored entries lack it"
    ]


def _other(tag: str) -> type[Event]:
    """A class of the same module and qualified name each call: only its tag differs."""

    class Other(Event, frozen=True, kw_only=True, tag=tag):
        topic: ClassVar[str] = "things"

    return Other


def test_a_removed_type_and_a_changed_tag_fail() -> None:
    assert problems(OLD, Thing) == ["test.other: type removed: stored entries no longer decode"]
    assert problems(snap(Thing, _other("test.other")), Thing, _other("test.other2")) == [
        "test.other: tag changed to 'test.other2': stored entries no longer decode"
    ]


def test_a_changed_topic_fails() -> None:
    class Other(Event, frozen=True, kw_only=True, tag="test.other"):
        topic: ClassVar[str] = "elsewhere"

    assert problems(OLD, Thing, Other) == [
        "test.other: topic changed from 'things' to 'elsewhere': stored entries are left on the "
        "old stream"
    ]


def test_a_sample_that_no_longer_decodes_fails_even_when_the_schema_looks_the_same() -> None:
    """A datetime's ``tz`` is not in JSON Schema; the stored sample (UTC) proves the change."""

    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str
        when: dt.datetime

    class NaiveThing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str
        when: Annotated[dt.datetime, msgspec.Meta(tz=False)]

    old = snap(Thing)
    assert schema_check.compare(old, snap(NaiveThing)) == []
    found = problems(old, NaiveThing)
    assert len(found) == 1
    assert found[0].startswith("test.thing: stored sample entry no longer decodes: invalid: ")
    assert "`$.when`" in found[0]


# ---------------------------------------------------------------------- compatible changes


def test_compatible_changes_pass() -> None:
    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str | None  # widened union
        count: float = 1.5  # integer widened to number; another default value
        level: Literal["a", "b", "c"] = "a"  # a literal value added
        label: str = ""  # maxLength dropped
        size: int | str | None = None  # an alternative added
        inner: InnerWidened | None = None  # nested: widened, a field with a default added
        at: dt.datetime | None = None
        note: str = ""  # a new field with a default

    class Renamed(Event, frozen=True, kw_only=True, tag="test.other"):  # another class name
        topic: ClassVar[str] = "things"

    class Brand(Event, frozen=True, kw_only=True, tag="test.brand_new"):
        topic: ClassVar[str] = "things"
        required_from_the_start: str

    assert problems(OLD, Thing, Renamed, Brand) == []


def test_removing_a_field_that_has_a_default_passes() -> None:
    class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
        topic: ClassVar[str] = "things"
        name: str

    assert problems(OLD, Thing, Other) == []


def test_removing_a_field_of_a_nested_type_that_forbids_unknown_fields_fails() -> None:
    class Holder(Event, frozen=True, kw_only=True, tag="test.holder"):
        strict: Strict = Strict()

    class HolderNow(Event, frozen=True, kw_only=True, tag="test.holder"):
        strict: StrictNow = StrictNow()

    assert problems(snap(Holder), HolderNow) == [
        "test.holder.strict.y: field removed from a type that forbids unknown fields: stored "
        "entries carrying it no longer decode",
        "test.holder: stored sample entry no longer decodes: invalid: Object contains unknown "
        "field `y` - at `$.strict`",
    ]


# ---------------------------------------------------------------------- the command's exit codes


def test_check_exits_1_with_one_line_per_problem(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    assert run("--app", TINY, "schema", "snapshot", "--out", str(path)).returncode == 0
    doc = json.loads(path.read_text())
    ping = doc["types"]["tiny.ping"]
    ping["fields"]["legacy"] = {"required": True, "type": {"type": "string"}}
    ping["sample"]["data"] = ping["sample"]["data"].replace('"n":0', '"n":"zero"')
    path.write_text(json.dumps(doc))

    result = run("--app", TINY, "schema", "check", "--snapshot", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("streamproc schema check: tiny.ping: stored sample entry no longer")
    assert lines[1] == (
        "streamproc schema check: tiny.ping.legacy: field without a default removed: the previous "
        "version cannot decode new entries (give it a default first)"
    )
    assert result.stdout == ""


def test_check_says_what_is_newer_than_the_snapshot(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    assert run("--app", TINY, "schema", "snapshot", "--out", str(path)).returncode == 0
    doc = json.loads(path.read_text())
    del doc["types"]["tiny.tick"]
    del doc["types"]["tiny.ping"]["fields"]["n"]
    path.write_text(json.dumps(doc))
    result = run("--app", TINY, "schema", "check", "--snapshot", str(path))
    assert result.returncode == 0, result.stderr
    assert "(1 types, 1 fields not in the snapshot yet" in result.stdout


def _tiny_snapshot(run: Any, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "good.json"
    assert run("--app", TINY, "schema", "snapshot", "--out", str(path)).returncode == 0
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _nested(depth: int) -> Any:
    node: Any = {"type": "string"}
    for _ in range(depth):
        node = {"anyOf": [node]}
    return node


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist (write one with `streamproc schema snapshot`)"),
        ("directory", "cannot be read: Is a directory"),
        ("not json", "is not JSON: JSON is malformed: invalid character (byte 4)"),
        ("array", "is not a snapshot: Expected `object`, got `array`"),
        ("format 2", "has format 2; this streamproc reads format 1"),
        ("no types", "is not a snapshot: Object missing required field `types`"),
        ("huge", f"is over {schema_check.MAX_SNAPSHOT_BYTES} bytes: not a snapshot"),
        ("deep json", "is nested too deeply to be one"),
        ("deep type", "the type of tiny.ping.n is nested over 64 levels deep"),
        ("control char", "is not a snapshot: Expected `str` matching regex"),
        ("other sample", "the sample of tiny.ping is not of that type"),
        ("unknown key", "is not a snapshot: Object contains unknown field `extra`"),
    ],
)
def test_a_bad_snapshot_file_exits_2_with_the_reason(
    run: Any, tmp_path: Path, case: str, message: str
) -> None:
    path = tmp_path / "snapshot.json"
    doc = _tiny_snapshot(run, tmp_path)
    if case == "directory":
        path.mkdir()
    elif case == "not json":
        path.write_text("not json")
    elif case == "array":
        path.write_text("[]")
    elif case == "format 2":
        path.write_text(json.dumps({**doc, "format": 2}))
    elif case == "no types":
        path.write_text('{"format": 1}')
    elif case == "huge":
        path.write_bytes(b" " * (schema_check.MAX_SNAPSHOT_BYTES + 1))
    elif case == "deep json":
        doc["types"]["tiny.ping"]["fields"]["n"]["type"] = "DEEP"
        deep = "[" * 100_000 + "]" * 100_000
        path.write_text(json.dumps(doc).replace('"DEEP"', '{"a": ' + deep + "}"))
    elif case == "deep type":
        doc["types"]["tiny.ping"]["fields"]["n"]["type"] = _nested(100)
        path.write_text(json.dumps(doc))
    elif case == "control char":
        doc["types"]["tiny.ping\x1b[2J"] = doc["types"].pop("tiny.ping")
        path.write_text(json.dumps(doc))
    elif case == "other sample":
        doc["types"]["tiny.ping"]["sample"]["type"] = "tiny.tick"
        path.write_text(json.dumps(doc))
    elif case == "unknown key":
        doc["types"]["tiny.ping"]["extra"] = 1
        path.write_text(json.dumps(doc))
    result = run("--app", TINY, "schema", "check", "--snapshot", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"streamproc: error: schema snapshot {path} ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "\x1b" not in result.stderr


@pytest.mark.parametrize(
    "hostile",
    [
        {"anyOf": 5},
        {"anyOf": [{"anyOf": "x"}, 3]},
        {"properties": [1], "required": 7, "type": "object"},
        {"properties": {"a": 5}, "required": [{"x": 1}], "type": "object"},
        {"type": ["integer"], "maximum": "big", "items": 4, "additionalProperties": 1},
        {"prefixItems": [1, {"type": "integer"}], "type": "array"},
    ],
)
def test_a_strange_type_in_the_snapshot_is_a_change_not_a_crash(
    run: Any, tmp_path: Path, hostile: dict[str, Any]
) -> None:
    path = tmp_path / "snapshot.json"
    doc = _tiny_snapshot(run, tmp_path)
    doc["types"]["tiny.ping"]["fields"]["n"]["type"] = hostile
    path.write_text(json.dumps(doc))
    result = run("--app", TINY, "schema", "check", "--snapshot", str(path))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        "streamproc schema check: tiny.ping.n: type narrowed or changed from "
    )
    assert len(result.stderr.splitlines()) == 1
