"""A subcommand of the tiny app: ``streamproc --app tests.tiny_app:with_commands tiny-hello X``."""

from __future__ import annotations

import argparse
from typing import Any

from streamproc.app import App
from streamproc.config import Config


def _hello(args: argparse.Namespace, cfg: Config, app: App) -> int:
    print(f"hello {args.name} from {app!r}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("tiny-hello", help="say hello (the tiny app's own command)")
    p.add_argument("name")
    p.set_defaults(func=_hello)
