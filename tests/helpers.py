"""Small helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import socket
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Consumer, Keys

__all__ = (
    "CliRun",
    "MakeConsumer",
    "cli_in_process",
    "entries",
    "free_port",
    "moto_server",
    "pending",
    "spot",
)

MakeConsumer = Callable[..., Consumer]


def spot(i: int, **kw: Any) -> SpotInterruption:
    """A spot interruption with instance id ``i-<i>``."""
    return SpotInterruption(
        cluster_id="c1",
        key="c1",
        instance_id=f"i-{i}",
        instance_type="m5.large",
        availability_zone="eu-west-1a",
        **kw,
    )


async def pending(client: aioredis.Redis, keys: Keys, group: str = "g") -> int:
    """Entries of topic ``cluster`` that ``group`` read and did not ack."""
    return int((await client.xpending(keys.stream("cluster"), group))["pending"])


async def entries(client: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE of a whole stream, typed (redis-py's own reply type is a loose union)."""
    rows: Any = await client.xrange(key)
    return [(i, f) for i, f in rows]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto server on a free 127.0.0.1 port; its URL.

    moto keeps its accounts, instances and mail in memory shared by every moto server of the
    process, so each use starts from empty state (``POST /moto-api/reset``) and leaves it
    empty: one test module's instances never show up in another's scan or outbox.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"

    def reset() -> None:
        req = urllib.request.Request(f"{url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30):
            pass

    try:
        reset()
        yield url
    finally:
        with contextlib.suppress(OSError):
            reset()
        server.stop()


@dataclasses.dataclass(frozen=True)
class CliRun:
    """What a ``streamproc`` command did: exit code, standard output, standard error."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: Mapping[str, str],
    *args: str,
    stdin: str = "",
) -> CliRun:
    """``streamproc ARGS`` run by ``streamproc.cli.main`` in this process, with ``env`` added.

    For cases about argument checking and exit codes, where a ``python -m streamproc`` process
    each (about a second of imports on a 2-core machine) proves nothing more; every command keeps
    a real-subprocess test too. Logging is left as the session has it: ``main`` would configure
    structlog for the whole process (and cache loggers at the command's level).
    """
    import streamproc.cli as cli

    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        m.setattr(cli, "configure_logging", lambda *_a, **_k: None)
        m.setattr(sys, "stdin", io.StringIO(stdin))
        m.setattr(sys, "path", list(sys.path))  # main makes the current directory importable
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        out, err = capsys.readouterr()
    return CliRun(code, out, err)


async def dedup_records(client: aioredis.Redis, keys: Keys, topic: str = "cluster") -> set[bytes]:
    """The digests the producer recorded on ``topic`` (every generation's shard hashes)."""
    prefix = keys.published_prefix(topic)
    found: set[bytes] = set()
    async for k in client.scan_iter(match=prefix + "[0-9]*", count=1000):
        fields: Any = await client.hkeys(k)
        found |= set(fields)
    return found


def digests(*names: str) -> set[bytes]:
    """The record digests of these event ids or idempotency keys."""
    from streamproc.producer import record_digest

    return {record_digest(n) for n in names}
