"""An embedded Redis: a ``redis-server`` child process on 127.0.0.1 with its data in a folder.

Used by ``streamproc up`` when REDIS_URL is unset, and by the test fixtures when no Docker
engine answers.

With ``password`` (``streamproc up`` always gives one, random per start) the server requires
it (``requirepass``: the default user's password); ``url`` carries it, and it is written to
``<data dir>/password`` (0600) for ``REDISCLI_AUTH=$(cat <data dir>/password) redis-cli -p
PORT``. The data folder is made 0700 and the server runs under umask 077, so its AOF, RDB and
log are 0600. ``maxmemory`` caps memory with ``maxmemory-policy noeviction``: a full Redis
refuses writes (streamproc waits it out) instead of deleting keys.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from streamproc.errors import ConfigError, RedisUnavailable

__all__ = ("EmbeddedRedis", "free_port")

#: ``maxmemory`` as redis.conf takes it: bytes, or a number with k/kb/m/mb/g/gb.
_MAXMEMORY_RE = re.compile(r"^[0-9]+(?:[kmg]b?)?$", re.IGNORECASE)
#: URL-safe and safe inside redis.conf's double quotes (``secrets.token_urlsafe`` makes these).
_PASSWORD_RE = re.compile(r"^[A-Za-z0-9._~-]{16,}$")


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
        password: str | None = None,
        maxmemory: str | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ConfigError(f"appendfsync must be always|everysec|no, got {appendfsync!r}")
        if maxmemory is not None and not _MAXMEMORY_RE.fullmatch(maxmemory):
            raise ConfigError(f"maxmemory must be bytes or e.g. 512mb, 2gb; got {maxmemory!r}")
        if password is not None and not _PASSWORD_RE.fullmatch(password):
            raise ConfigError("the embedded Redis password must be letters, digits, '._~-'")
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.password, self.maxmemory = password, maxmemory
        self.appendfsync, self.appendonly = appendfsync, appendonly
        self.executable = shutil.which(executable) or ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, with ``default:<password>@`` when it has one (the
        user is named so that ``redis-cli -u URL`` reads it too)."""
        auth = f"default:{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def password_file(self) -> Path:
        """Where ``start`` writes the password (0600), for redis-cli and operator commands."""
        return self.data_dir / "password"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if not self.executable:
            raise RedisUnavailable(
                "redis-server not found on PATH: install it (Debian: apt-get install "
                "redis-server) or set REDIS_URL to a running Redis"
            )
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # also when it existed: the AOF holds every event
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
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        if self.password:
            # Given on stdin as a config file ("-"), not in argv, which `ps` shows everyone.
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            self.password_file.chmod(0o600)
            args.insert(1, "-")
        # Own process group: a Ctrl-C in the terminal must not stop Redis before the roles
        # using it have drained; whoever started it stops it (stop()). umask 077: the files
        # it creates (AOF, RDB, log) are 0600.
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
            # Its own stdout says only "Reading config from stdin"; errors go to stderr.
            stdout=subprocess.DEVNULL,
            process_group=0,
            umask=0o077,
        )
        if self.password:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f'requirepass "{self.password}"\n'.encode())
            self.proc.stdin.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_file = self.data_dir / "redis.log"
                log = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    # NOAUTH: up and requiring the password, as it should.
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
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
