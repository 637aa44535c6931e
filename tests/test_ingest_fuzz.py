"""Fuzzing the ingest API from its own /openapi.json (schemathesis): no 5xx, answers match it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from aiohttp import web

from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.ingest import AgentStore, Ingest, IngestSettings, create_app

#: Examples per operation (8 operations): a few hundred requests in all.
EXAMPLES = 50


class ServerThread:
    """The ingest app on its own event loop in a thread (schemathesis calls it synchronously)."""

    def __init__(self, redis_url: str, keys: Keys) -> None:
        self.redis_url, self.keys = redis_url, keys
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.url = ""
        self.tokens: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self.stop_event = asyncio.Event()
        client = connect(RedisSettings(url=self.redis_url, key_prefix=self.keys.prefix))
        producer = Producer(client, Codec(REGISTRY), self.keys)
        from consumers.tasks import TASK_TYPES

        ingest = Ingest(
            client=client,
            registry=REGISTRY,
            keys=self.keys,
            producer=producer,
            settings=IngestSettings(max_batch=20, rate_burst=100_000),
            task_types=TASK_TYPES,
        )
        agents = AgentStore(client, self.keys)
        self.tokens["agent"] = (await agents.add("fuzz-agent", types=["*"]))[1]
        self.tokens["operator"] = (await agents.add("fuzz-op", types=["*"], operator=True))[1]
        runner = web.AppRunner(create_app(ingest), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.ready.set()
        try:
            await self.stop_event.wait()
        finally:
            await runner.cleanup()
            async for k in client.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
                await client.delete(k)
            await client.aclose()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(30), "ingest thread did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


@pytest.fixture
def server(redis_url: str, keys: Keys) -> Iterator[ServerThread]:
    with ServerThread(redis_url, keys) as s:
        yield s


@pytest.mark.timeout(300)
def test_fuzzing_from_the_openapi_spec_finds_no_5xx_and_no_spec_mismatch(
    server: ServerThread,
) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    auth = {"Authorization": f"Bearer {server.tokens['operator']}"}
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err raises here, as wanted
        strategy = operation.as_strategy()

        @hypothesis.given(case=strategy)
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
        def check(case: Any) -> None:
            response = case.call_and_validate(
                base_url=server.url,
                headers=auth,
                # JSON Schema treats `format` (date-time) as an annotation, so "schema-valid"
                # bodies carry dates that are not RFC 3339: refusing them (422) is right.
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500

        check()
    print("statuses:", sorted(seen.items()))
    assert seen.get(202), seen  # valid events and tasks were generated and accepted
