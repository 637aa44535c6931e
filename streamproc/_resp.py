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

On a Redis Cluster (``connect`` with a ``redis+cluster://`` URL) each command goes to the
master of its ``route`` key's slot: a connection to every master is taken and connected
first, then ``build`` runs, then each node gets its commands in one write. A MOVED or ASK
reply (a failover or a resharding moved the slot: the command did not run) updates the slot
map and raises ``SlotMoved``, a connection error: the caller's retry reaches the new master.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ("Command", "NotReplicated", "SlotMoved", "bulk", "execute")


class NotReplicated(RedisError):
    """The commands ran, but WAIT saw fewer replicas acknowledge them than asked for."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(
            f"{acked} of {wanted} replica(s) acknowledged the write within {timeout_ms} ms"
        )
        self.acked, self.wanted, self.timeout_ms = acked, wanted, timeout_ms
        #: The commands' replies, as ``execute`` would have returned them.
        self.replies: list[Any] = []


class SlotMoved(RedisConnectionError):
    """A cluster node answered MOVED/ASK: the slot map was stale and is updated; send again."""


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


class Command:
    """A command assembled from arguments and already packed runs of arguments."""

    __slots__ = ("argc", "chunks", "route")

    def __init__(self, *args: bytes, route: bytes = b"") -> None:
        self.argc = len(args)
        self.chunks: list[bytes] = [bulk(a) for a in args]
        #: The key whose slot decides the node on a Redis Cluster (the first key it touches).
        self.route = route

    def add(self, *args: bytes) -> None:
        self.argc += len(args)
        self.chunks += [bulk(a) for a in args]

    def add_packed(self, packed: bytes, argc: int) -> None:
        """Append ``argc`` arguments that are already RESP bulk strings."""
        self.argc += argc
        self.chunks.append(packed)

    def packed(self) -> bytes:
        return b"*%d\r\n%b" % (self.argc, b"".join(self.chunks))


def _wait(replicas: int, timeout_ms: int) -> bytes:
    return Command(b"WAIT", b"%d" % replicas, b"%d" % timeout_ms).packed()


def _check_wait(reply: Any, replicas: int, timeout_ms: int, replies: list[Any]) -> None:
    if isinstance(reply, BaseException):
        raise reply
    if int(reply) < replicas:
        e = NotReplicated(int(reply), replicas, timeout_ms)
        e.replies = replies
        raise e


async def execute(
    client: aioredis.Redis,
    build: Callable[[], Sequence[Command]],
    *,
    replicas: int = 0,
    replica_timeout_ms: int = 0,
) -> list[Any]:
    """Send the commands ``build()`` returns in one write; return their replies in order.

    ``build`` is called once, after a connection was taken from the pool and (re)connected,
    and the write follows it whatever happens next: what it leaves out is never sent, what it
    returns is. Nothing is sent when it returns no command. An error reply comes back in its
    place as a ``ResponseError`` (the others still count); a connection failure raises, and
    that connection is closed. Nothing is sent again.

    ``replicas``: a WAIT follows the commands on each connection written to; fewer replicas
    acknowledging within ``replica_timeout_ms`` raises ``NotReplicated`` (after the replies
    were read: the commands did run on the master).
    """
    if isinstance(client, RedisCluster):
        return await _execute_on_cluster(client, build, replicas, replica_timeout_ms)
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        commands = build()
        if not commands:
            return []
        packed = [c.packed() for c in commands]
        if replicas:
            packed.append(_wait(replicas, replica_timeout_ms))
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in packed:
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:  # read whole: the connection stays in step
                replies.append(e)
        if replicas:
            _check_wait(replies.pop(), replicas, replica_timeout_ms, replies)
        return replies
    except NotReplicated:
        raise  # every reply was read: the connection is in step
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


async def _execute_on_cluster(
    client: RedisCluster,
    build: Callable[[], Sequence[Command]],
    replicas: int,
    replica_timeout_ms: int,
) -> list[Any]:
    """``execute`` on a Redis Cluster: per master, its commands in one write."""
    await client.initialize()  # a no-op unless a connection error asked for a new slot map
    taken: dict[str, tuple[ClusterNode, Connection]] = {}

    async def take(node: ClusterNode) -> Connection:
        held = taken.get(node.name)
        if held is None:
            held = taken[node.name] = (node, node.acquire_connection())
        await held[1].connect()  # type: ignore[no-untyped-call]
        return held[1]

    try:
        for node in client.get_primaries():
            await take(node)
        commands = build()
        if not commands:
            return []
        by_node: dict[str, list[int]] = {}
        for i, c in enumerate(commands):
            if not c.route:
                raise ValueError("a command sent to a Redis Cluster needs its route key")
            target = client.get_node_from_key(c.route)  # type: ignore[arg-type]
            if target is None:  # pragma: no cover - only replica lookups answer None
                raise RedisConnectionError(f"no node serves the slot of {c.route!r}")
            by_node.setdefault(target.name, []).append(i)
            if target.name not in taken:  # the slot map changed since the masters were listed
                await take(target)
        for name, idx in by_node.items():
            packed = [commands[i].packed() for i in idx]
            if replicas:
                packed.append(_wait(replicas, replica_timeout_ms))
            await taken[name][1].send_packed_command(packed, check_health=False)
        replies: list[Any] = [None] * len(commands)
        waited: list[Any] = []
        for name, idx in by_node.items():
            conn = taken[name][1]
            for i in idx:
                try:
                    replies[i] = await conn.read_response()
                except ResponseError as e:  # read whole: the connection stays in step
                    replies[i] = e
            if replicas:
                try:
                    waited.append(await conn.read_response())
                except ResponseError as e:
                    waited.append(e)
        down = [r for r in replies if isinstance(r, ClusterDownError)]
        if down:  # CLUSTERDOWN / MASTERDOWN: a failover under way; nothing of it ran there
            client._initialize = True  # a new slot map before the caller sends again
            raise down[0]
        moved = [r for r in replies if isinstance(r, (MovedError, AskError))]
        if moved:
            for r in moved:
                if isinstance(r, MovedError):
                    await client.nodes_manager.move_slot(r)
            raise SlotMoved(f"{len(moved)} of {len(commands)} commands were redirected: {moved[0]}")
        for reply in waited:
            _check_wait(reply, replicas, replica_timeout_ms, replies)
        return replies
    except (SlotMoved, ClusterDownError, NotReplicated):
        raise
    except BaseException:
        for _, conn in taken.values():
            await conn.disconnect(nowait=True)
        # As redis-py's own commands do after a connection error: reload the slot map first
        # the next time (a master may have died and its replica been promoted).
        client._initialize = True
        raise
    finally:
        for node, conn in taken.values():
            node.release(conn)
