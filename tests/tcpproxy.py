"""A TCP proxy for tests: sits between clients and a Redis server and breaks the network on cue.

It runs its own event loop in a thread, so it keeps forwarding while the test's loop is busy
(or blocked in a ``subprocess.wait``), and consumers in other processes can connect through it
like any client. Control methods are plain functions, safe to call from any thread except the
proxy's own:

- ``cut()``: close every current connection at once, both sides; new ones are accepted.
- ``pause()`` / ``resume()``: hold the bytes in both directions (or one) with the sockets open:
  a stalled network. ``stall(seconds)`` pauses now and resumes by itself later.
- ``refuse(True)``: stop listening (new connections are refused); ``refuse(False)`` listens
  again on the same port. Existing connections are not touched.

Usage::

    with TcpProxy("127.0.0.1", redis_port) as proxy:
        client = connect(RedisSettings(url=proxy.url))
        ...
        proxy.cut()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

__all__ = ("TcpProxy",)

T = TypeVar("T")

_CHUNK = 65536


class _Link:
    """One client connection and its upstream connection."""

    __slots__ = ("client", "tasks", "upstream")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_host``:``upstream_port``; see the module doc."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.host, self.port = host, port
        #: Connections accepted in total, and currently open.
        self.accepted = 0
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._to_server = asyncio.Event()  # set = bytes flow client -> server
        self._to_client = asyncio.Event()  # set = bytes flow server -> client
        self._pauses = 0  # stall(): resume only if no pause came after it

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        # fresh events: an asyncio.Event belongs to the first loop that waits on it
        self._to_server, self._to_client = asyncio.Event(), asyncio.Event()
        self._to_server.set()
        self._to_client.set()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open(ready))
            except BaseException as e:
                if not ready.done():
                    ready.set_exception(e)
                loop.close()
                return
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()
        ready.result(timeout=10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection; join the thread."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """A redis:// URL through the proxy (database 0)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    @property
    def paused(self) -> bool:
        return self._call(self._paused())

    # ------------------------------------------------------------------ controls

    def cut(self) -> int:
        """Close every current connection, client and upstream side at once; return how many.

        The listener stays open: clients reconnect through it.
        """
        return self._call(self._cut())

    def pause(self, *, to_server: bool = True, to_client: bool = True) -> None:
        """Stop forwarding (both directions unless told), keeping every socket open.

        Bytes already read by the proxy are held and forwarded, in order, on ``resume()``.
        """
        self._call(self._pause(to_server=to_server, to_client=to_client))

    def resume(self) -> None:
        """Forward again in both directions, held bytes first."""
        self._call(self._resume(None))

    def stall(self, seconds: float) -> concurrent.futures.Future[None]:
        """Pause both directions now, resume after ``seconds``; the future is done on resume.

        A later ``pause``/``stall`` takes over: this stall's timer then resumes nothing (its
        future is still done when the timer runs out).
        """
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._call(self._stall(seconds, done))
        return done

    def refuse(self, on: bool = True) -> None:
        """``True``: close the listener (new connections are refused). ``False``: listen again
        on the same port. Open connections keep working either way."""
        self._call(self._refuse(on))

    # ------------------------------------------------------------------ the proxy's loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("call the proxy's controls from another thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _open(self, ready: concurrent.futures.Future[None]) -> None:
        await self._listen()
        ready.set_result(None)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        sock: socket.socket = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                up_reader, link.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:  # upstream down: the client sees its connection closed
                return
            if link not in self._links:  # cut while connecting
                return
            link.tasks = [
                asyncio.create_task(self._pipe(reader, link.upstream, self._to_server)),
                asyncio.create_task(self._pipe(up_reader, writer, self._to_client)),
            ]
            # when either side ends, the other goes too (Redis clients don't half-close)
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            link.abort()
            for t in link.tasks:
                t.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                await flowing.wait()  # paused: hold this chunk and read no further
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _paused(self) -> bool:
        return not (self._to_server.is_set() and self._to_client.is_set())

    async def _cut(self) -> int:
        links, self._links = self._links, set()
        for link in links:
            link.abort()
        return len(links)

    async def _pause(self, *, to_server: bool, to_client: bool) -> None:
        self._pauses += 1
        if to_server:
            self._to_server.clear()
        if to_client:
            self._to_client.clear()

    async def _resume(self, only_after: int | None) -> None:
        if only_after is not None and self._pauses != only_after:
            return  # a later pause took over
        self._to_server.set()
        self._to_client.set()

    async def _stall(self, seconds: float, done: concurrent.futures.Future[None]) -> None:
        await self._pause(to_server=True, to_client=True)
        mine = self._pauses

        async def later() -> None:
            try:
                await asyncio.sleep(seconds)
                await self._resume(mine)
            finally:
                if not done.done():
                    done.set_result(None)

        asyncio.get_running_loop().create_task(later())

    async def _refuse(self, on: bool) -> None:
        if on and self._server is not None:
            # no wait_closed(): from Python 3.12 it also waits for the open connections
            self._server.close()
            self._server = None
        elif not on and self._server is None:
            await self._listen()
