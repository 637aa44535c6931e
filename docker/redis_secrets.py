#!/usr/bin/env python3
"""Redis users for the compose stack: an ACL file and one REDIS_URL per role, never committed.

    python3 docker/redis_secrets.py                 (before the first `docker compose up`)
    python3 docker/redis_secrets.py --host 127.0.0.1 --port 6380   (host networking)
    python3 docker/redis_secrets.py --force         (new passwords; restart the stack)
    python3 docker/redis_secrets.py --rules | redis-cli …   (the same users on another Redis)

Writes into ``docker/secrets/`` (or ``--dir``; 0700), only what is missing unless ``--force``:

- ``users.acl`` (0644): the ``aclfile`` Redis loads. Passwords only as SHA-256 (``#<hex>``) —
  the file must be readable by the container's redis user, and a hash of 192 random bits
  gives nothing away. The ``default`` user is off: every client must log in.
- ``ingest.env``, ``consumer.env``, ``ticker.env``, ``operator.env`` (0600): ``REDIS_URL``
  with that role's user and password, read by the services through ``env_file``.
- ``redis.env`` (0600): ``REDISCLI_AUTH`` of the ``health`` user (PING only) for the
  healthcheck.

Roles (docs/security.md): every role works under ``<prefix>:*`` only, with the data commands
streamproc and its applications send (directly or inside its Lua scripts); none may run
FLUSHALL/FLUSHDB, KEYS, CONFIG, DEBUG, SHUTDOWN, MODULE, ACL, MONITOR, REPLICAOF, SAVE, EVAL of
ad-hoc scripts or pub/sub. The agents hash ``<prefix>:agents`` (who may post what, who is an
operator) is writable by the operator CLI only; ingest reads it (its token lookup is a Lua
script, so a selector lets EVALSHA name the key while every command inside is checked against
read-only access); consumers and tickers cannot touch it. Stdlib only: it runs before any
virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ("ROLES", "acl_file", "all_keys_but", "role_rules", "write_secrets")

HERE = Path(__file__).resolve().parent

#: Role → the Redis user it logs in as (one per role; replicas of a role share it).
ROLES = ("ingest", "consumer", "ticker", "operator")

#: Log in, name the connection, pipelines and transactions (notifications' feed WATCHes).
_CONNECTION = (
    "auth hello ping select client|setname client|getname "
    "multi exec discard watch unwatch info time"
)
#: Lua scripts are loaded once and run by hash (streamproc/_lua.py); EVAL is not needed.
_SCRIPTS = "evalsha script|load script|exists"
#: Keys, strings, hashes, lists (delivery logs, a task's cancel signal, a consumer's parked
#: entries: LPOP), sorted sets, and sets (the registry set of issue 17 item 14). PEXPIREAT: the
#: producer's dedup generations (issue 20); HSETNX: its records claimed before their XADD.
_DATA = (
    "exists type ttl pttl expire pexpire pexpireat persist del unlink scan "
    "get set mget incr incrby "
    "hget hset hsetnx hmget hgetall hdel hexists hincrby hincrbyfloat hlen hkeys hscan "
    "rpush lpush lpop lrange ltrim llen "
    "zadd zcard zcount zrange zrangebyscore zrevrange zrevrangebyscore zrank zrem "
    "zremrangebyrank zremrangebyscore zscore zmscore "
    "sadd srem smembers sismember scard sscan"
)
#: Publishing, trimming and reading streams (dashboard, tail, feeds, DLQ replay); groups are
#: created where they are first needed and looked at (lag, pending) by the dashboard.
_STREAMS = (
    "xadd xtrim xdel xlen xrange xrevrange xread xinfo|stream xinfo|groups xinfo|consumers "
    "xgroup|create xpending"
)
#: Consuming: read, renew and reclaim (XCLAIM), ack, expire idle consumers; task runners wait
#: for a cancel signal (BLPOP). Consumers and task runners only.
_CONSUME = "xgroup|createconsumer xgroup|delconsumer xreadgroup xack xclaim xautoclaim blpop"
#: The operator CLI's extra reach: memory per key (inspect), group repair, stream ids.
_OPERATOR = "memory|usage xgroup|destroy xgroup|setid object|encoding"

_BASE = f"{_CONNECTION} {_SCRIPTS} {_DATA} {_STREAMS}"
_COMMANDS: dict[str, str] = {
    "ingest": _BASE,
    "consumer": f"{_BASE} {_CONSUME}",
    "ticker": _BASE,
    "operator": f"{_BASE} {_CONSUME} {_OPERATOR}",
}


def all_keys_but(prefix: str, name: str) -> list[str]:
    """ACL key patterns for every key under ``<prefix>:`` except ``<prefix>:<name>``.

    Redis ACLs have no negative patterns; ``[^c]`` globs do the same: a key is either shorter
    than ``<prefix>:<name>`` and a proper prefix of it, differs from it at some position, or
    is longer. New key families need no change here.
    """
    base = f"{prefix}:"
    patterns = [base]  # the bare prefix, for completeness
    for i, ch in enumerate(name):
        patterns.append(f"{base}{name[:i]}[^{ch}]*")
        if i:
            patterns.append(f"{base}{name[:i]}")
    patterns.append(f"{base}{name}?*")
    return patterns


def role_rules(role: str, prefix: str) -> str:
    """The ACL rules of one role's user (without ``user <name> on #<hash>``)."""
    agents = f"{prefix}:agents"
    keys = " ".join(f"~{p}" for p in all_keys_but(prefix, "agents"))
    commands = " ".join(f"+{c}" for c in _COMMANDS[role].split())
    rules = f"resetkeys resetchannels -@all {commands} {keys}"
    if role == "operator":
        return f"{rules} ~{agents}"
    if role == "ingest":
        # Token lookups (HGET, inside a script) read the agents hash; nothing may write it.
        return f"{rules} %R~{agents} (~{agents} +evalsha)"
    if role == "consumer":
        # The cluster-event processor reads an event's source agent (HGET <p>:agents <name>,
        # issue 17 item 3): read-only, and not through the token-lookup script.
        return f"{rules} %R~{agents}"
    return rules


def acl_file(hashes: dict[str, str], prefix: str) -> str:
    """The aclfile text; ``hashes`` maps each user (roles and ``health``) to its SHA-256."""
    # An aclfile has no comments: what it is says the folder's name and this script.
    lines = [
        # resetpass: else the default user keeps its nopass flag, and protected mode then
        # refuses every client that is not on loopback (the other containers), ACLs or not.
        "user default off resetpass resetkeys resetchannels -@all",
        f"user health on #{hashes['health']} resetkeys resetchannels -@all +ping +auth +hello",
    ]
    lines += [f"user {r} on #{hashes[r]} {role_rules(r, prefix)}" for r in ROLES]
    return "\n".join(lines) + "\n"


def _sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(mode)


def write_secrets(
    out: Path, *, host: str = "redis", port: int = 6379, prefix: str = "sp", force: bool = False
) -> bool:
    """Write the ACL file and the env files into ``out``; False if all existed (no ``force``)."""
    names = ["users.acl", "redis.env", *(f"{r}.env" for r in ROLES)]
    if not force and all((out / n).exists() for n in names):
        return False
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    out.chmod(0o700)
    passwords = {u: secrets.token_urlsafe(24) for u in ("health", *ROLES)}
    for role in ROLES:
        url = f"redis://{role}:{passwords[role]}@{host}:{port}/0"
        _write(out / f"{role}.env", f"REDIS_URL={url}\n", 0o600)
    _write(out / "redis.env", f"REDISCLI_AUTH={passwords['health']}\n", 0o600)
    hashes = {u: _sha256(p) for u, p in passwords.items()}
    _write(out / "users.acl", acl_file(hashes, prefix), 0o644)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=HERE / "secrets", help="where to write")
    p.add_argument("--host", default="redis", help="Redis host in the URLs (default: redis)")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--prefix", default=os.environ.get("STREAMPROC_PREFIX", "sp"))
    p.add_argument("--force", action="store_true", help="new passwords even if files exist")
    p.add_argument(
        "--rules",
        action="store_true",
        help="print ACL SETUSER commands (password placeholders) for a Redis run elsewhere",
    )
    args = p.parse_args(argv)
    if not args.prefix.replace("_", "").replace("-", "").replace(".", "").isalnum():
        p.error(f"--prefix {args.prefix!r}: letters, digits, '_', '.', '-' only")
    if args.rules:
        for role in ROLES:
            # A selector is one argument: quoted for redis-cli.
            rules = role_rules(role, args.prefix).replace("(", '"(').replace(")", ')"')
            print(f"ACL SETUSER {role} reset on >CHANGE-ME-{role} {rules}")
        return 0
    wrote = write_secrets(
        args.dir, host=args.host, port=args.port, prefix=args.prefix, force=args.force
    )
    print(
        f"{'wrote' if wrote else 'kept'} Redis users and passwords in {args.dir}/", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
