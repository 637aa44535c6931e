"""Fixtures: a real Redis for the whole session, a unique key prefix per test.

Redis comes from testcontainers when a Docker engine answers, otherwise from a ``redis-server``
process started on a free 127.0.0.1 port. Neither → the session fails with a clear message.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import REGISTRY
from streamproc import (
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Keys,
    Producer,
    ProducerSettings,
    RedisSettings,
    connect,
)
from streamproc.embedded import EmbeddedRedis

#: The local Redis Cluster's fixtures (``local_cluster``, ``cluster_client`` ...): started only
#: by the tests that ask for them (tests/test_cluster.py).
pytest_plugins = ("tests.cluster_support",)


def _docker_redis() -> Iterator[str] | None:
    if os.environ.get("STREAMPROC_TEST_NO_DOCKER"):
        return None
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return None
    import gc
    import warnings

    try:
        from docker import DockerClient  # type: ignore[attr-defined]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            engine = DockerClient.from_env(timeout=2)
            try:
                engine.ping()
            finally:
                engine.close()
    except Exception:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()  # the failed client's socket, closed here rather than in a test
        return None
    from testcontainers.redis import RedisContainer

    def gen() -> Iterator[str]:
        with RedisContainer("redis:7.0") as c:
            yield f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"

    return gen()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis server shared by the session."""
    if url := os.environ.get("STREAMPROC_TEST_REDIS_URL"):
        yield url
        return
    container = _docker_redis()
    if container is not None:
        yield from container
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    try:
        server.start()
    except Exception as e:
        pytest.exit(f"no Redis for the tests: no Docker engine and {e}", returncode=3)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def keys() -> Keys:
    """A key prefix of this test's own: tests never FLUSHALL and never see each other."""
    return Keys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def redis_settings(redis_url: str, keys: Keys) -> RedisSettings:
    return RedisSettings(url=redis_url, key_prefix=keys.prefix)


@pytest.fixture
async def client(redis_settings: RedisSettings, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_settings)
    yield c
    # Deleted 1,000 at a time: the 20,000-event chaos test leaves two dedup marks per event;
    # one DEL each took ~8 s of its teardown (0.4 s now).
    batch: list[bytes] = []
    async for k in c.scan_iter(match=f"{keys.prefix}:*", count=1000):
        batch.append(k)
        if len(batch) >= 1000:
            await c.delete(*batch)
            batch.clear()
    if batch:
        await c.delete(*batch)
    await c.aclose()


@pytest.fixture
def codec() -> Codec[Any]:
    return Codec(REGISTRY)


@pytest.fixture
def producer(client: aioredis.Redis, codec: Codec[Any], keys: Keys) -> Producer:
    return Producer(client, codec, keys, ProducerSettings())


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def make_consumer(client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer) -> Any:
    """Build a Consumer of topic ``cluster`` (group ``g`` unless told) with these handlers.

    Keyword arguments go to ConsumerSettings, except ``concern={...}`` (Concern fields).
    """

    def make(
        handlers: dict[Any, Any],
        *,
        name: str = "c1",
        group: str = "g",
        concurrency: int = 4,
        concern: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Consumer:
        declared = Concern(
            group=group,
            topics=("cluster",),
            handlers=handlers,
            concurrency=concurrency,
            **(concern or {}),
        )
        return Consumer(
            declared,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            settings=ConsumerSettings(consumer=name, **settings),
        )

    return make


@pytest.fixture(autouse=True, scope="session")
def _no_load_shedding_in_the_application() -> Iterator[None]:
    """The application's runners shed load above 90 % CPU (seed 003); the suite alone keeps
    this shared 2-core machine there, so in-process runners of the application never shed
    here. Shedding itself is tested with its own ceilings (tests/test_task_runners.py)."""
    from consumers.tasks import LIMITS

    saved = (LIMITS.max_cpu_percent, LIMITS.max_memory_percent)
    LIMITS.max_cpu_percent = LIMITS.max_memory_percent = 100.0
    yield
    LIMITS.max_cpu_percent, LIMITS.max_memory_percent = saved
