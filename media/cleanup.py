"""The ``temp-cleanup`` concern: on ``tick.cleanup_temp`` (daily 02:00), clean every host's
media temp directories and expire the local store's old outputs.

Rules, per host, in this order:

1. **Age**: regular files under the temp roots (``roots``) last modified more than
   ``max_age_days`` ago (7) are deleted.
2. **Size cap**: while the files left under all the temp roots together take more than
   ``size_cap_bytes`` (50 GiB; 0 = no cap), the oldest is deleted.
3. **Retention**: regular files under the output roots (``output_roots``: the local store's
   directory; none by default) older than ``output_retention_days`` (30) are deleted. Objects
   in S3 expire by the bucket's lifecycle rule (an ``Expiration`` of the same days on the
   outputs' prefix), not here: listing a bucket daily to delete what S3 deletes for free
   would be slow and costly.
4. **Empty directories** under any root, older than ``empty_dir_min_age_s`` (1 h, as they
   were before this run deleted anything) are removed, deepest first; the roots stay.

Never deleted: a file an active job uses (below); anything reached through a symlink
(symlinks are neither followed nor deleted); anything whose real path is outside its root
(checked again right before each delete); a root that does not exist is logged and skipped.

**Active files.** A job that reads or writes under a root holds its path (a file, or a
directory: everything under it) while it runs::

    async with active(redis, keys, workdir):
        ...  # nothing under workdir is deleted meanwhile

The path goes into the sorted set ``<p>:state:{media}:active`` (member ``<token>:<real
path>``, score = Redis time + ``active_ttl_s``), renewed every third of the TTL and removed
on exit; a job that dies stops protecting its files one TTL later. Cleanup reads the set just
before it deletes and drops expired members. The set is shared by every host: a path held on
one host is also kept on the others (never the reverse).

**Every host.** The tick is handled by one consumer: that one records the request
(``<p>:state:{media}:cleanup:requested`` = the tick id) and cleans its own host; every
``consume`` process checks every ``check_s`` (60 s, ``ON_STARTUP``) whether its host has
served the latest request (``<p>:state:{media}:cleanup:done:<host>``) and, if not, cleans it.
``<p>:state:{media}:cleanup:lock:<host>`` (``SET NX PX``) keeps it to one run per host.

Each run logs a ``cleanup_done`` summary and counts files, bytes, directories and skips in
Prometheus counters. Settings: ``STREAMPROC_CLEANUP_<FIELD>`` (``CleanupSettings``); the host
name is ``media.resources``' (``STREAMPROC_RESOURCES_HOST``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter

from media._background import background_loop
from media.resources import host_name
from schemas.ticks import TempCleanupTick
from streamproc._lua import Lua
from streamproc.app import AppContext
from streamproc.concern import Concern, Context
from streamproc.config import settings_from_env
from streamproc.keys import Keys
from streamproc.settings import RetryPolicy

__all__ = (
    "CONCERN",
    "ON_SHUTDOWN",
    "ON_STARTUP",
    "CleanupResult",
    "CleanupSettings",
    "active",
    "active_key",
    "active_paths",
    "clean",
    "clean_host",
    "configure_from_env",
    "settings",
    "use_settings",
)

log = structlog.get_logger("media.cleanup")

_STATE_KEY = "media.cleanup.follower"
_DAY_S = 86_400

FILES = Counter("streamproc_cleanup_files", "Files deleted by cleanup", ["reason"])
BYTES = Counter("streamproc_cleanup_bytes", "Bytes freed by cleanup", ["reason"])
DIRS = Counter("streamproc_cleanup_dirs", "Empty directories removed by cleanup")
SKIPPED = Counter("streamproc_cleanup_skipped", "Entries cleanup left alone", ["reason"])
RUNS = Counter("streamproc_cleanup_runs", "Cleanup runs, by trigger", ["via"])


class CleanupSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``STREAMPROC_CLEANUP_<FIELD>``."""

    #: Temp roots (relative ones from the process's working directory). Default: the media
    #: jobs' work folder (``STREAMPROC_MEDIA_WORK_DIR``, else ``<system temp>/streamproc-media``;
    #: set by ``media.configure_from_env``).
    roots: tuple[str, ...] = (str(Path(tempfile.gettempdir()) / "streamproc-media"),)
    max_age_days: float = 7.0
    #: All temp roots together; 0 = no cap.
    size_cap_bytes: int = 50 * 2**30
    #: The local store's directories (none by default; S3 expires by lifecycle rule).
    output_roots: tuple[str, ...] = ()
    output_retention_days: float = 30.0
    empty_dir_min_age_s: float = 3600.0
    #: An ``active()`` path is protected this long after its last renewal.
    active_ttl_s: float = 600.0
    #: How often each ``consume`` process checks whether its host has a cleanup to run.
    check_s: float = 60.0
    #: Run that check (False: only the host that handles the tick is cleaned).
    follow: bool = True
    #: The per-host run lock's lifetime (a run longer than this may overlap the next one).
    lock_s: float = 3600.0

    def __post_init__(self) -> None:
        if not self.roots or len(self.roots) + len(self.output_roots) > 64:
            raise ValueError("roots: 1 to 64 paths (with output_roots)")
        if not all(self.roots) or not all(self.output_roots):
            raise ValueError("roots and output_roots: no empty path")
        if not 0 < self.max_age_days <= 3650 or not 0 < self.output_retention_days <= 36_500:
            raise ValueError("max_age_days within 0..3650, output_retention_days 0..36500")
        if self.size_cap_bytes < 0:
            raise ValueError("size_cap_bytes: 0 (no cap) or more")
        if not 0 <= self.empty_dir_min_age_s <= 30 * _DAY_S:
            raise ValueError("empty_dir_min_age_s within 0..2592000")
        if not 1 <= self.active_ttl_s <= _DAY_S:
            raise ValueError("active_ttl_s within 1..86400")
        if not 1 <= self.check_s <= 3600 or not 10 <= self.lock_s <= _DAY_S:
            raise ValueError("check_s within 1..3600, lock_s within 10..86400")


_settings: CleanupSettings | None = None


def use_settings(s: CleanupSettings | None) -> None:
    """Use these settings from now on (None: the defaults)."""
    global _settings
    _settings = s


def settings() -> CleanupSettings:
    return _settings or CleanupSettings()


def configure_from_env(env: Mapping[str, str], *, work_dir: str = "") -> None:
    """``STREAMPROC_CLEANUP_<FIELD>``; without ``ROOTS``, the media jobs' ``work_dir``."""
    s = settings_from_env(CleanupSettings, "STREAMPROC_CLEANUP_", env)
    if work_dir and "STREAMPROC_CLEANUP_ROOTS" not in env:
        s = msgspec.structs.replace(s, roots=(work_dir,))
    use_settings(s)


# ---------------------------------------------------------------------- keys


def active_key(keys: Keys) -> str:
    """Sorted set: ``<token>:<real path>`` → protected until (Redis time, ms)."""
    return keys.state("{media}", "active")


def _requested_key(keys: Keys) -> str:
    return keys.state("{media}", "cleanup", "requested")


def _done_key(keys: Keys, host: str) -> str:
    return keys.state("{media}", "cleanup", "done", host)


def _lock_key(keys: Keys, host: str) -> str:
    return keys.state("{media}", "cleanup", "lock", host)


# ---------------------------------------------------------------------- active files

_TOKEN_CHARS = 16


async def _redis_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@contextlib.asynccontextmanager
async def active(
    client: aioredis.Redis, keys: Keys, path: str | os.PathLike[str], *, ttl_s: float | None = None
) -> AsyncIterator[str]:
    """Protect ``path`` (and everything under it) from cleanup while the block runs; yields
    its real path. Renewed every third of ``ttl_s`` (``active_ttl_s``), removed on exit."""
    ttl_ms = int((ttl_s or settings().active_ttl_s) * 1000)
    real = await asyncio.to_thread(os.path.realpath, path)
    member = f"{uuid.uuid4().hex[:_TOKEN_CHARS]}:{real}"
    key = active_key(keys)
    await client.zadd(key, {member: await _redis_ms(client) + ttl_ms})

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                await client.zadd(key, {member: await _redis_ms(client) + ttl_ms})
            except Exception as e:  # Redis away: the next renewal tries again
                log.warning("active_renew_failed", path=real, error=str(e))

    renewer = asyncio.create_task(renew(), name="media-active-renew")
    try:
        yield real
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        with contextlib.suppress(Exception):  # expires by itself otherwise
            await asyncio.shield(client.zrem(key, member))


async def active_paths(client: aioredis.Redis, keys: Keys) -> set[str]:
    """The real paths held now (expired members are dropped)."""
    now = await _redis_ms(client)
    pipe = client.pipeline(transaction=True)
    pipe.zremrangebyscore(active_key(keys), "-inf", now)
    pipe.zrangebyscore(active_key(keys), now, "+inf")
    replies: list[Any] = await pipe.execute()
    return {m.decode(errors="surrogateescape")[_TOKEN_CHARS + 1 :] for m in replies[1]}


# ---------------------------------------------------------------------- the rules


@dataclass
class CleanupResult:
    files: dict[str, int] = field(default_factory=dict)  # reason → files deleted
    bytes: dict[str, int] = field(default_factory=dict)  # reason → bytes freed
    dirs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason → entries left alone
    missing_roots: list[str] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def deleted(self, reason: str, size: int) -> None:
        self.files[reason] = self.files.get(reason, 0) + 1
        self.bytes[reason] = self.bytes.get(reason, 0) + size


@dataclass
class _Entry:
    path: str
    size: int
    mtime: float


@dataclass
class _Tree:
    root: str  # real path
    files: list[_Entry] = field(default_factory=list)
    dirs: list[_Entry] = field(default_factory=list)  # mtime as scanned, before deletes


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _scan(root: str, out: CleanupResult) -> _Tree | None:
    """Every regular file and directory under ``root``, no symlink followed."""
    real = os.path.realpath(root)
    if not os.path.isdir(real):
        out.missing_roots.append(root)
        out.skip("missing_root")
        return None
    tree = _Tree(real)
    stack = [real]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_symlink():
                        out.skip("symlink")
                    elif e.is_dir(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        tree.dirs.append(_Entry(e.path, 0, st.st_mtime))
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        tree.files.append(_Entry(e.path, st.st_size, st.st_mtime))
        except OSError as err:  # gone meanwhile, no permission: the rest goes on
            out.skip("error")
            log.warning("cleanup_scan_failed", path=d, error=str(err))
    return tree


def _held(path: str, held: Collection[str]) -> bool:
    """``path`` or a directory above it is held by an active job."""
    p = path
    while True:
        if p in held:
            return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def _delete(f: _Entry, root: str, reason: str, held: Collection[str], out: CleanupResult) -> bool:
    if _held(f.path, held):
        out.skip("active")
        return False
    # Checked again now: a directory on the way may have been swapped for a symlink.
    if not _within(os.path.realpath(os.path.dirname(f.path)), root):
        out.skip("outside")
        log.warning("cleanup_outside_root", path=f.path, root=root)
        return False
    try:
        if not stat.S_ISREG(os.lstat(f.path).st_mode):
            out.skip("not_a_file")
            return False
        os.unlink(f.path)
    except FileNotFoundError:
        return False
    except OSError as e:
        out.skip("error")
        log.warning("cleanup_delete_failed", path=f.path, error=str(e))
        return False
    out.deleted(reason, f.size)
    return True


def _remove_empty_dirs(
    tree: _Tree, min_age_s: float, now: float, held: Collection[str], out: CleanupResult
) -> None:
    keep = {os.path.dirname(p) for p in held}  # parents of held paths, up to /
    for p in list(keep):
        while (parent := os.path.dirname(p)) != p and parent not in keep:
            keep.add(parent)
            p = parent
    for d in sorted(tree.dirs, key=lambda e: e.path.count(os.sep), reverse=True):
        if d.mtime > now - min_age_s or d.path in keep or _held(d.path, held):
            continue
        if not _within(os.path.realpath(os.path.dirname(d.path)), tree.root):
            continue
        try:
            os.rmdir(d.path)  # refuses a directory that is not empty
        except OSError:
            continue
        out.dirs += 1


def clean(s: CleanupSettings, held: Collection[str], now: float | None = None) -> CleanupResult:
    """Apply the rules to this host's roots (blocking: run it in a thread)."""
    now = time.time() if now is None else now
    out = CleanupResult()
    temp = [t for r in s.roots if (t := _scan(r, out)) is not None]
    kept: list[tuple[_Entry, str]] = []
    for tree in temp:
        for f in tree.files:
            if f.mtime < now - s.max_age_days * _DAY_S and _delete(f, tree.root, "age", held, out):
                continue
            kept.append((f, tree.root))
    total = sum(f.size for f, _ in kept)
    if s.size_cap_bytes and total > s.size_cap_bytes:
        for f, root in sorted(kept, key=lambda x: x[0].mtime):
            if total <= s.size_cap_bytes:
                break
            if _delete(f, root, "size_cap", held, out):
                total -= f.size
        if total > s.size_cap_bytes:
            log.warning("cleanup_size_cap_not_met", total_bytes=total, cap=s.size_cap_bytes)
    outputs = [t for r in s.output_roots if (t := _scan(r, out)) is not None]
    for tree in outputs:
        for f in tree.files:
            if f.mtime < now - s.output_retention_days * _DAY_S:
                _delete(f, tree.root, "retention", held, out)
    for tree in (*temp, *outputs):
        _remove_empty_dirs(tree, s.empty_dir_min_age_s, now, held, out)
    return out


# ---------------------------------------------------------------------- per host

_RELEASE = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


async def clean_host(
    client: aioredis.Redis,
    keys: Keys,
    *,
    request: str,
    via: str,
    s: CleanupSettings | None = None,
) -> CleanupResult | None:
    """Clean this host for ``request`` (a tick id) under its lock; None when another process
    of the host runs it. Marks the request served."""
    s = s or settings()
    host = host_name()
    token = uuid.uuid4().hex
    if not await client.set(_lock_key(keys, host), token, nx=True, px=int(s.lock_s * 1000)):
        log.info("cleanup_skipped", host=host, reason="another process of this host runs it")
        return None
    started = time.monotonic()
    try:
        held = await active_paths(client, keys)
        out = await asyncio.to_thread(clean, s, held)
        await client.set(_done_key(keys, host), request, ex=90 * _DAY_S)
    finally:
        with contextlib.suppress(Exception):
            await _RELEASE(client, [_lock_key(keys, host)], [token])
    RUNS.labels(via).inc()
    for reason, n in out.files.items():
        FILES.labels(reason).inc(n)
        BYTES.labels(reason).inc(out.bytes[reason])
    DIRS.inc(out.dirs)
    for reason, n in out.skipped.items():
        SKIPPED.labels(reason).inc(n)
    log.info(
        "cleanup_done",
        host=host,
        via=via,
        request=request,
        files=out.files,
        bytes=out.bytes,
        dirs=out.dirs,
        skipped=out.skipped,
        missing_roots=out.missing_roots,
        duration_s=round(time.monotonic() - started, 3),
    )
    return out


async def run(tick: TempCleanupTick, ctx: Context) -> None:
    """``tick.cleanup_temp``: ask every host to clean, and clean this one."""
    await ctx.redis.set(_requested_key(ctx.keys), tick.id, ex=90 * _DAY_S)
    await clean_host(ctx.redis, ctx.keys, request=tick.id, via="tick")


CONCERN = Concern(
    group="temp-cleanup",
    topics=("ticks",),
    handlers={TempCleanupTick: run},
    concurrency=1,
    retry=RetryPolicy(max_retries=3, base_s=30.0, cap_s=300.0),
)


async def follow_once(client: aioredis.Redis, keys: Keys) -> CleanupResult | None:
    """Clean this host if it has not served the latest request (what each process checks
    every ``check_s``)."""
    request: Any = await client.get(_requested_key(keys))
    if request is None:
        return None
    done: Any = await client.get(_done_key(keys, host_name()))
    if done == request:
        return None
    return await clean_host(client, keys, request=request.decode(), via="follower")


async def _follow(ctx: AppContext) -> None:
    await follow_once(ctx.redis, ctx.keys)


#: In ``consume`` processes: clean this host when a cleanup was asked for and it has not.
on_startup, on_shutdown = background_loop(
    _STATE_KEY,
    _follow,
    every_s=lambda: settings().check_s,
    enabled=lambda: settings().follow,
    failed="cleanup_check_failed",
)

ON_STARTUP = (on_startup,)
ON_SHUTDOWN = (on_shutdown,)
