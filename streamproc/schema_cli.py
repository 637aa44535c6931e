"""``streamproc schema snapshot`` and ``streamproc schema check``: event schema compatibility.

``snapshot`` writes the application's registry (types, fields, defaults, one sample entry per
type) to a file meant to be committed; ``check`` compares the registry with it and decodes its
samples (``streamproc.schema_check``). Neither needs Redis.

Exit codes of ``check``: 0 compatible, 1 incompatible (one line per problem on stderr), 2 the
snapshot file is missing or not a snapshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from streamproc import schema_check
from streamproc.app import App
from streamproc.config import Config
from streamproc.errors import ConfigError
from streamproc.printable import printable

__all__ = ("register",)


def register(sub: Any) -> None:
    s = sub.add_parser(
        "schema", help="event schema compatibility: snapshot the registry, check against it"
    )
    actions = s.add_subparsers(dest="schema_action", required=True, metavar="ACTION")
    default = schema_check.DEFAULT_SNAPSHOT
    snap = actions.add_parser("snapshot", help="write the registry's snapshot (to commit)")
    snap.add_argument("--out", type=Path, default=default, help="default: %(default)s")
    snap.set_defaults(func=_cmd_snapshot)
    check = actions.add_parser(
        "check", help="fail on changes incompatible with the snapshot (exit 1)"
    )
    check.add_argument("--snapshot", type=Path, default=default, help="default: %(default)s")
    check.set_defaults(func=_cmd_check)


def _cmd_snapshot(args: argparse.Namespace, cfg: Config, app: App) -> int:
    snapshot = schema_check.describe(app.registry)
    out: Path = args.out
    try:
        out.write_text(schema_check.render(snapshot))
    except OSError as e:
        raise ConfigError(f"cannot write the schema snapshot to {out}: {e.strerror or e}") from None
    print(f"wrote {out}: {len(snapshot.types)} types, {snapshot.field_count()} fields")
    return 0


def _cmd_check(args: argparse.Namespace, cfg: Config, app: App) -> int:
    old = schema_check.load(args.snapshot)
    new = schema_check.describe(app.registry)
    problems = schema_check.compare(old, new) + schema_check.decode_samples(old, app.codec)
    for p in sorted(problems):
        print(f"streamproc schema check: {printable(str(p))}", file=sys.stderr)
    if problems:
        return 1
    added_types = len(new.types.keys() - old.types.keys())
    added_fields = sum(
        len(t.fields.keys() - old.types[tag].fields.keys())
        for tag, t in new.types.items()
        if tag in old.types
    )
    note = (
        f" ({added_types} types, {added_fields} fields not in the snapshot yet: "
        "`streamproc schema snapshot` records them)"
        if added_types or added_fields
        else ""
    )
    print(f"ok: {len(new.types)} types, {new.field_count()} fields{note}")
    return 0
