"""Blocking task types: each attempt in a child process, so the hard limit can end it.

A ``TaskType(blocking=True)``'s ``run`` is a plain module-level function ``fn(payload) ->
result`` (pickled by reference, run in a fresh **spawn** process: safe beside the event loop).
The soft limit — counted from when the function starts in the child, so a slow process
start never spends it — sends the child SIGUSR1, whose handler raises ``SoftTimeLimit`` in the
task's code between two bytecodes (also out of ``time.sleep`` and other interrupted system
calls), so the task can save what it has; the hard limit, counted from the attempt's start
(process start included), SIGKILLs it. Its result or exception comes back
over a pipe the event loop watches; a child that dies without answering (killed, segfault,
``os._exit``) raises ``TaskCrashed``, a transient error the retry policy retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from streamproc.errors import Permanent, StreamprocError

__all__ = ("SoftTimeLimit", "TaskCrashed", "TaskError", "run_in_process")


class SoftTimeLimit(Exception):
    """Raised inside a task at its soft time limit: catch it to save partial results."""


class TaskCrashed(StreamprocError):
    """The task's child process died without an answer (killed, crashed)."""


class TaskError(StreamprocError):
    """The task raised in its child process: ``error_type`` and its message."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        super().__init__(f"{error_type}: {message}")


def _on_usr1(signum: int, frame: Any) -> None:
    raise SoftTimeLimit("soft time limit reached")


def _child(fn: Callable[[Any], Any], payload_type: Any, payload: Any, conn: Connection) -> None:
    signal.signal(signal.SIGUSR1, _on_usr1)
    conn.send(("ready", None))  # the parent signals only from now on (else SIGUSR1 kills)
    try:
        result = fn(msgspec.convert(payload, payload_type))
        reply: tuple[str, Any] = ("ok", msgspec.json.encode(result))
    except BaseException as e:  # everything goes back to the parent, nothing to a console
        kind = "soft" if isinstance(e, SoftTimeLimit) else "permanent"
        if not isinstance(e, SoftTimeLimit | Permanent):
            kind = "error"
        reply = (kind, (type(e).__name__, str(e)[:2000]))
    # A late SIGUSR1 must not interrupt the answer.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    conn.send(reply)
    conn.close()


async def run_in_process(
    fn: Callable[[Any], Any],
    payload_type: Any,
    payload: Any,
    *,
    soft_s: float | None,
    hard_s: float | None,
    on_soft: Callable[[], None] | None = None,
) -> Any:
    """Run ``fn(payload)`` in a child process; its decoded JSON result.

    Raises ``SoftTimeLimit`` (the task let it out), ``Permanent``, ``TaskError``, ``TaskCrashed``
    or ``TimeoutError`` (the hard limit: the child was killed). Cancelling kills the child too.
    """
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, payload_type, payload, writer), daemon=True)
    proc.start()
    writer.close()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    def soft() -> None:
        if on_soft is not None:
            on_soft()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid or 0, signal.SIGUSR1)

    loop.add_reader(reader.fileno(), readable)
    timer: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(hard_s):
            while True:
                await ready
                ready = loop.create_future()
                if not reader.poll():  # a stale wake-up: the message was read already
                    continue
                try:
                    kind, value = reader.recv()
                except EOFError:
                    await asyncio.to_thread(proc.join, 5)
                    raise TaskCrashed(
                        f"the task's process exited with code {proc.exitcode}"
                    ) from None
                if kind != "ready":
                    break
                if soft_s is not None:  # the function starts now: its soft limit too
                    timer = loop.call_later(soft_s, soft)
    finally:
        if timer is not None:
            timer.cancel()
        loop.remove_reader(reader.fileno())
        reader.close()
        if proc.is_alive():
            proc.kill()
        await asyncio.to_thread(proc.join, 5)
    if kind == "ok":
        return msgspec.json.decode(value)
    error_type, message = value
    if kind == "soft":
        raise SoftTimeLimit(message)
    if kind == "permanent":
        raise Permanent(f"{error_type}: {message}")
    raise TaskError(error_type, message)
