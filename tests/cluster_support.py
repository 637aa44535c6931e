"""A local Redis Cluster for the tests: 3 masters + 3 replicas on 127.0.0.1.

Six ``redis-server --cluster-enabled yes`` processes in a temporary folder (no persistence),
joined with ``redis-cli --cluster create ... --cluster-replicas 1``; ready once every node's
``CLUSTER INFO`` says ``cluster_state:ok``. Only the processes started here are stopped, by
their PIDs. tests/conftest.py loads this module as a plugin; the cluster starts only when a
test asks for one of its fixtures (``local_cluster`` is session-scoped).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from streamproc import Keys, RedisSettings, connect

__all__ = (
    "LocalCluster",
    "cluster_client",
    "cluster_keys",
    "cluster_settings",
    "local_cluster",
    "redis_cluster_url",
)

#: Redis' cluster bus listens on the client port + 10000.
_BUS_OFFSET = 10000


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_ports(n: int) -> list[int]:
    """``n`` ports free on 127.0.0.1 whose cluster-bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + _BUS_OFFSET > 65535:
            port -= 2 * _BUS_OFFSET  # ephemeral ports start at 32768: still above 1024
        if port not in ports and _free(port) and _free(port + _BUS_OFFSET):
            ports.append(port)
    return ports


def _ask(port: int, command: bytes, timeout_s: float = 0.5) -> bytes:
    """One inline command to one node; its raw reply (enough for PING and CLUSTER INFO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(command + b"\r\n")
        reply = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
            if reply.startswith((b"+", b"-")) and reply.endswith(b"\r\n"):
                break
            if reply.startswith(b"$"):
                head, _, body = reply.partition(b"\r\n")
                if len(body) >= int(head[1:]) + 2:
                    break
        return reply


class LocalCluster:
    """Start six nodes and join them; ``stop`` (or ``kill``) ends exactly those PIDs."""

    def __init__(
        self, data_dir: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 5000
    ) -> None:
        self.data_dir = data_dir
        #: How long a node may not answer before the others fail it over. The shared
        #: cluster's 5 s keeps a loaded CI machine (xdist workers) from spurious failovers;
        #: the failover test's own cluster uses 2 s.
        self.node_timeout_ms = node_timeout_ms
        self.count = masters * (1 + replicas)
        self.replicas = replicas
        self.ports = free_cluster_ports(self.count)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.server = shutil.which("redis-server") or ""
        self.cli = shutil.which("redis-cli") or ""

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start_node(self, port: int) -> None:
        node_dir = self.data_dir / str(port)
        node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                self.server,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--repl-diskless-sync-delay",
                "0",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(node_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(node_dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            process_group=0,
        )

    def _wait(self, ready: bytes, command: bytes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = [p for p in self.ports if p in self.procs]
        while waiting:
            port = waiting[0]
            if self.procs[port].poll() is not None:
                log = (self.data_dir / str(port) / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server on {port} exited: {log[-2000:]}")
            try:
                if ready in _ask(port, command):
                    waiting.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {port} never answered {ready!r} to {command!r}")
            time.sleep(0.05)

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        if not self.server or not self.cli:
            raise RuntimeError("redis-server / redis-cli not on PATH (apt-get install redis)")
        for port in self.ports:
            self.start_node(port)
        self._wait(b"+PONG", b"PING", timeout_s)
        create = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]!r}")
        self._wait(b"cluster_state:ok", b"CLUSTER INFO", timeout_s)
        self.wait_for_replicas(timeout_s)
        return self

    def wait_for_replicas(self, timeout_s: float = 30.0) -> None:
        """Until every replica's link to its master is up (synced once) and every node knows
        them as replicas: a replica that never synced, or that the other masters do not know
        as one, is not promoted when its master dies."""
        deadline = time.monotonic() + timeout_s
        want = self.count // (1 + self.replicas) * self.replicas
        while True:
            synced, views = 0, []
            for port in self.ports:
                if self.procs[port].poll() is not None:
                    continue
                try:
                    info = _ask(port, b"INFO replication")
                    views.append(_ask(port, b"CLUSTER NODES").count(b"slave "))
                except OSError:
                    continue
                if b"role:slave" in info and b"master_link_status:up" in info:
                    synced += 1
            if synced >= want and views and min(views) >= want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {synced} replicas in sync after {timeout_s}s")
            time.sleep(0.05)

    def kill(self, port: int) -> None:
        """SIGKILL one node started here."""
        proc = self.procs[port]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 masters + 3 replicas for the session (``STREAMPROC_TEST_CLUSTER_URL`` to reuse one)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        pytest.fail(f"no local Redis Cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(local_cluster: LocalCluster) -> str:
    return os.environ.get("STREAMPROC_TEST_CLUSTER_URL") or local_cluster.url


@pytest.fixture
def cluster_keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def cluster_settings(redis_cluster_url: str, cluster_keys: Keys) -> RedisSettings:
    return RedisSettings(url=redis_cluster_url, key_prefix=cluster_keys.prefix)


@pytest.fixture
async def cluster_client(
    cluster_settings: RedisSettings, cluster_keys: Keys
) -> AsyncIterator[aioredis.Redis]:
    """A RedisCluster client; the test's keys are deleted from every master afterwards."""
    c = connect(cluster_settings)
    yield c
    from redis.asyncio.cluster import RedisCluster

    assert isinstance(c, RedisCluster)
    for node in c.get_primaries():
        batch: list[bytes] = []
        async for k in c.scan_iter(match=f"{cluster_keys.prefix}:*", count=1000, target_nodes=node):
            batch.append(k)
        for k in batch:
            await c.delete(k)
    await c.aclose()
