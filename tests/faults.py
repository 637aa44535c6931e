"""Fault injection on a real Redis connection: a client that fails chosen commands once.

Not a mock: every other command goes to the real server over the shared connection pool.
A fault is a predicate on a command's arguments (``("MGET",)`` matches by name, a script's
sha matches its EVALSHA); when a command matches, it raises ConnectionError instead of being
sent — as if the connection dropped right before it. Pipelines are checked per command and
fail before any of their commands is sent. ``lose_reply_once`` is the other half: the command
(or the pipeline holding it) runs on the server, and then its reply is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ("FlakyRedis", "command_is")

Match = Callable[[tuple[Any, ...]], bool]


def command_is(name: str, sha: str | None = None) -> Match:
    """Matches a command by name (and an EVALSHA by its script's sha)."""

    def match(args: tuple[Any, ...]) -> bool:
        first = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if first.upper() != name.upper():
            return False
        return sha is None or (len(args) > 1 and args[1] == sha)

    return match


class FlakyRedis(aioredis.Redis):
    """A client on ``base``'s connection pool whose planned commands fail once each."""

    def __init__(self, base: aioredis.Redis) -> None:
        super().__init__(connection_pool=base.connection_pool)
        self.faults: list[Match] = []
        self.lost_replies: list[Match] = []
        self.injected: list[str] = []

    def fail_once(self, match: Match) -> None:
        self.faults.append(match)

    def lose_reply_once(self, match: Match) -> None:
        self.lost_replies.append(match)

    def _after(self, args: tuple[Any, ...]) -> None:
        for f in self.lost_replies:
            if f(args):
                self.lost_replies.remove(f)
                self.injected.append(f"reply of {args[0]!r}")
                raise RedisConnectionError(f"injected: connection lost after {args[0]!r}")

    def _check(self, args: tuple[Any, ...]) -> None:
        for f in self.faults:
            if f(args):
                self.faults.remove(f)
                self.injected.append(str(args[0]))
                raise RedisConnectionError(f"injected: connection lost before {args[0]!r}")

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self._check(args)
        reply = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        self._after(args)
        return reply

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        original = pipe.execute

        async def execute(raise_on_error: bool = True) -> Any:
            stack = [args for args, _ in pipe.command_stack]
            for args in stack:
                self._check(args)
            replies = await original(raise_on_error)
            for args in stack:
                self._after(args)
            return replies

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe
