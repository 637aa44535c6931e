"""Commands packed by streamproc and sent on a pooled connection: the publish hot path.

redis-py turns every argument into RESP one at a time (about 170 ns each even with hiredis);
an event is 12 arguments. The codec packs an event's fields in one formatting step instead
(``Codec.encode_resp``), and ``execute`` sends such pre-packed commands on a connection taken
from the client's own pool, reading one reply per command. Error replies come back as
redis-py's exceptions (``NoScriptError``, ``ResponseError``) in their place; after a
connection failure the connection is closed, so no unread reply is left on it.

``execute`` never sends anything twice: it bypasses redis-py's command retry (which would send
an XADD again after a connection error, whatever the client's ``retry`` setting), and it asks
for the commands only once it holds a connected connection, so the caller decides what goes
out at the last moment (the producer leaves out callers cancelled while it waited).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

__all__ = ("Command", "bulk", "execute")


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


class Command:
    """A command assembled from arguments and already packed runs of arguments."""

    __slots__ = ("argc", "chunks")

    def __init__(self, *args: bytes) -> None:
        self.argc = len(args)
        self.chunks: list[bytes] = [bulk(a) for a in args]

    def add(self, *args: bytes) -> None:
        self.argc += len(args)
        self.chunks += [bulk(a) for a in args]

    def add_packed(self, packed: bytes, argc: int) -> None:
        """Append ``argc`` arguments that are already RESP bulk strings."""
        self.argc += argc
        self.chunks.append(packed)

    def packed(self) -> bytes:
        return b"*%d\r\n%b" % (self.argc, b"".join(self.chunks))


async def execute(client: aioredis.Redis, build: Callable[[], Sequence[Command]]) -> list[Any]:
    """Send the commands ``build()`` returns in one write; return their replies in order.

    ``build`` is called once, after a connection was taken from the pool and (re)connected,
    and the write follows it whatever happens next: what it leaves out is never sent, what it
    returns is. Nothing is sent when it returns no command. An error reply comes back in its
    place as a ``ResponseError`` (the others still count); a connection failure raises, and
    that connection is closed. Nothing is sent again.
    """
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        commands = build()
        if not commands:
            return []
        await conn.send_packed_command([c.packed() for c in commands], check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:  # read whole: the connection stays in step
                replies.append(e)
        return replies
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
