"""An embedded Redis: a ``redis-server`` child process on 127.0.0.1 with its data in a folder.

Used by ``streamproc up`` when REDIS_URL is unset, and by the test fixtures when no Docker
engine answers.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from streamproc.errors import ConfigError, RedisUnavailable

__all__ = ("EmbeddedRedis", "free_port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """Start ``redis-server`` on 127.0.0.1; stop it (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        appendfsync: str = "everysec",
        appendonly: bool = True,
        executable: str = "redis-server",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ConfigError(f"appendfsync must be always|everysec|no, got {appendfsync!r}")
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.appendfsync, self.appendonly = appendfsync, appendonly
        self.executable = shutil.which(executable) or ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if not self.executable:
            raise RedisUnavailable(
                "redis-server not found on PATH: install it (Debian: apt-get install "
                "redis-server) or set REDIS_URL to a running Redis"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        # Own process group: a Ctrl-C in the terminal must not stop Redis before the roles
        # using it have drained; whoever started it stops it (stop()).
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, process_group=0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
