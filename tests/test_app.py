"""The App boundary: an application is one object the CLI loads by name (``--app module:attr``).

These tests use an application of their own (``tests/tiny_app.py``), never this repository's:
the engine runs any App, checks it when it is built, and every role creates its declared
groups and runs its hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from streamproc import Codec, Concern, ConfigError, Event, Keys, Producer, Registry
from streamproc.app import App, AppContext, load_app
from streamproc.cli import _up_roles, child_argv
from streamproc.embedded import free_port
from streamproc.groups import ensure_declared_groups, group_infos
from streamproc.schedule import Schedule, Tick, every
from streamproc.tasks import TaskType
from tests import tiny_app
from tests.helpers import CliRun, cli_in_process
from tests.test_cli import ROOT, cli
from tests.tiny_app import GROUPS, Ping, TinyTick


class Pong(Event, frozen=True, kw_only=True, tag="tiny.pong"):
    topic: ClassVar[str] = "tiny"


async def nothing(event: Any, ctx: Any) -> None:
    return None


async def run_task(payload: Any, ctx: Any) -> None:
    return None


# ---------------------------------------------------------------------- building an App


def test_declared_groups_are_every_concerns_group_per_topic_plus_the_extra_ones() -> None:
    both = Concern(group="b", topics=("tiny", "other"), handlers={})
    app = App(
        registry=Registry([Ping]),
        concerns=[tiny_app.CONCERN, both],
        extra_groups={"tiny": ("audit",), "outside": ("billing",)},
    )
    assert dict(app.declared_groups) == {
        "other": ("b",),
        "outside": ("billing",),
        "tiny": ("audit", "b", "tiny-counter"),
    }
    assert dict(tiny_app.app.declared_groups) == GROUPS
    assert sorted(app.concerns) == ["b", "tiny-counter"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: App(registry=Registry([Pong]), concerns=[tiny_app.CONCERN]),
            "concern 'tiny-counter' handles 'tiny.ping' (Ping), which is not in the app's registry",
        ),
        (
            lambda: App(registry=Registry([Ping]), concerns=[tiny_app.CONCERN, tiny_app.CONCERN]),
            "two concerns use the group 'tiny-counter'",
        ),
        (
            lambda: App(
                registry=Registry([Ping]),
                schedules=[Schedule(name="t", trigger=every(60), event=TinyTick)],
            ),
            "schedule 't' fires 'tiny.tick' (TinyTick), which is not in the app's registry",
        ),
        (
            lambda: App(
                registry=Registry([Tick]),
                schedules=[Schedule(name="t", trigger=every(60), event=Tick)] * 2,
            ),
            "two schedules are named 't'",
        ),
        (
            lambda: App(
                registry=Registry([Ping]),
                task_types={"x.run": TaskType(name="x.run", run=run_task)},
            ),
            "task requests of queue 'default' (task_events) are 'task.critical' (TaskCritical), "
            "which is not in the app's registry",
        ),
        (
            lambda: App(registry=Registry([Ping]), extra_groups={"tiny": "audit"}),
            "extra_groups['tiny'] must be a sequence of group names",
        ),
        (lambda: App(registry=[Ping]), "must be a streamproc.codec.Registry"),  # type: ignore[arg-type]
        (
            lambda: App(registry=Registry([Ping]), commands="tests.tiny_commands"),
            "App(commands=...) takes module names",
        ),
        (
            lambda: App(registry=Registry([Ping]), routes=["/x"]),  # type: ignore[list-item]
            "App(routes=...) takes callables (app, ingest)",
        ),
    ],
)
def test_an_app_is_checked_when_it_is_built(build: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build()
    assert message in str(e.value)


# ---------------------------------------------------------------------- load_app


def test_load_app_finds_module_and_attribute_and_defaults_to_app() -> None:
    assert load_app("tests.tiny_app:app") is tiny_app.app
    assert load_app("tests.tiny_app") is tiny_app.app


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module:app", "--app 'no_such_module:app': no module named 'no_such_module'"),
        ("tests.no_such:app", "--app 'tests.no_such:app': no module named 'tests.no_such'"),
        (
            "tests.tiny_app:nope",
            "--app 'tests.tiny_app:nope': 'tests.tiny_app' has no attribute 'nope'",
        ),
        (
            "tests.tiny_app:not_an_app",
            "--app 'tests.tiny_app:not_an_app': tests.tiny_app.not_an_app is a dict, "
            "not a streamproc.app.App",
        ),
        ("tests/tiny_app.py", "expected MODULE:ATTRIBUTE"),
        ("", "expected MODULE:ATTRIBUTE"),
    ],
)
def test_load_app_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_app(spec)
    assert str(e.value) == message or message in str(e.value)


def test_load_app_reports_the_applications_own_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing dependency or an invalid App inside the module: the spec and the cause."""
    (tmp_path / "needs_a_dep.py").write_text("import surely_not_installed_dep\n")
    (tmp_path / "bad_app.py").write_text(
        textwrap.dedent("""
        from streamproc.app import App
        from streamproc.codec import Registry
        from tests.tiny_app import CONCERN, TinyTick

        app = App(registry=Registry([TinyTick]), concerns=[CONCERN])
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"importing 'needs_a_dep' failed: .*surely_not_installed"
    ):
        load_app("needs_a_dep:app", origin="STREAMPROC_APP")
    with pytest.raises(ConfigError) as e:
        load_app("bad_app:app")
    assert str(e.value).startswith(
        "--app 'bad_app:app': concern 'tiny-counter' handles 'tiny.ping'"
    )


# ---------------------------------------------------------------------- lifespan, groups


async def test_lifespan_creates_declared_groups_then_runs_hooks_around_the_body(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    calls: list[str] = []

    async def up(ctx: AppContext) -> None:
        names = {g.name for g in await group_infos(ctx.redis, ctx.keys.stream("tiny"))}
        calls.append(f"up:{ctx.role}:{','.join(sorted(names))}")

    async def down_fails(ctx: AppContext) -> None:
        calls.append("down1")
        raise RuntimeError("a shutdown hook failed")

    async def down(ctx: AppContext) -> None:
        calls.append("down2")

    app = App(
        registry=Registry([Ping]),
        concerns=[tiny_app.CONCERN],
        extra_groups={"elsewhere": ("audit",)},
        on_startup=[up],
        on_shutdown=[down_fails, down],
    )

    async def role_fails() -> None:
        async with app.lifespan(role="consume", redis=client, keys=keys, producer=producer):
            calls.append("body")
            raise KeyError("the role failed")

    with pytest.raises(KeyError):
        await role_fails()
    # Groups exist before the first hook; every shutdown hook runs, also after a failure.
    assert calls == ["up:consume:tiny-counter", "body", "down1", "down2"]
    assert [g.name for g in await group_infos(client, keys.stream("elsewhere"))] == ["audit"]


async def test_ensure_declared_groups_creates_at_0_and_keeps_existing_groups(
    client: aioredis.Redis, keys: Keys
) -> None:
    codec = Codec(Registry([Ping]))
    stream = keys.stream("tiny")
    first = await Producer(client, codec, keys).publish(Ping(n=1))
    await client.xgroup_create(stream, "audit", id="$")
    created = await ensure_declared_groups(client, keys, GROUPS)
    assert created == [("tiny", "tiny-counter")]
    by_name = {g.name: g for g in await group_infos(client, stream)}
    assert by_name["audit"].last_delivered_id == first  # BUSYGROUP: left where it was
    assert by_name["tiny-counter"].last_delivered_id == "0-0"  # reads what is there
    assert await ensure_declared_groups(client, keys, GROUPS) == []


def test_up_starts_each_role_with_the_same_app() -> None:
    args = argparse.Namespace(app="tests.tiny_app:app", without=["ingest"])
    roles = _up_roles(args, tiny_app.app)
    assert roles == [["consume", "--all"], ["ticker"]]
    assert child_argv(args, "ticker")[1:] == ["-m", "streamproc", "--app", args.app, "ticker"]
    no_table = App(registry=Registry([Ping]), concerns=[tiny_app.CONCERN])
    assert _up_roles(argparse.Namespace(app="x:app", without=[]), no_table) == [
        ["consume", "--all"],
        ["ingest"],
    ]


# ---------------------------------------------------------------------- the CLI


BAD_APPS: list[tuple[list[str], dict[str, str], str]] = [
    (["--app", "no_such_module:app"], {}, "no module named 'no_such_module'"),
    (["--app", "tests.tiny_app:nope"], {}, "'tests.tiny_app' has no attribute 'nope'"),
    (["--app", "tests.tiny_app:not_an_app"], {}, "is a dict, not a streamproc.app.App"),
    ([], {"STREAMPROC_APP": "tests.tiny_app:nope"}, "STREAMPROC_APP 'tests.tiny_app:nope': "),
]


@pytest.mark.parametrize(("args", "env", "message"), BAD_APPS)
def test_a_bad_app_is_exit_2_with_the_reason(
    args: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first case in a real ``python -m streamproc`` process; the others by the same
    ``main`` in this process, without an interpreter start each."""
    r: CliRun | subprocess.CompletedProcess[str]
    if (args, env, message) == BAD_APPS[0]:
        r = cli(*args, "check", "--all", env=env)
    else:
        r = cli_in_process(monkeypatch, capsys, env, *args, "check", "--all")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_check_all_covers_the_extra_declared_groups(env: dict[str, str]) -> None:
    """`check --all` checks every declared group, the extra ones (outside readers) too."""
    r = cli("--app", "tests.tiny_app:app", "check", "--all", env=env)
    assert r.returncode == 1
    assert "group audit does not exist on" in r.stderr
    assert "group tiny-counter does not exist on" in r.stderr
    r = cli("--app", "tests.tiny_app:app", "check", "audit", env=env)
    assert r.returncode == 1
    assert "tiny-counter" not in r.stderr
    stream = f"{env['STREAMPROC_PREFIX']}:{{tiny}}:stream"
    for group in ("audit", "tiny-counter"):
        created = subprocess.run(
            [
                "redis-cli",
                "-u",
                env["REDIS_URL"],
                "XGROUP",
                "CREATE",
                stream,
                group,
                "0",
                "MKSTREAM",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert created.stdout.strip() == "OK"
    r = cli("--app", "tests.tiny_app:app", "check", "--all", env=env)
    assert r.returncode == 0, r.stderr
    assert "2 group(s)" in r.stdout


def test_commands_use_the_named_apps_registry(env: dict[str, str]) -> None:
    """The tiny app's event is known to the tiny app only: the boundary, from outside."""
    r = cli("--app", "tests.tiny_app:app", "publish", "tiny.ping", '{"n": 2}', env=env)
    assert r.returncode == 0, r.stderr
    r = cli("publish", "tiny.ping", '{"n": 2}', env=env)  # this repository's app
    assert r.returncode == 2
    assert "unknown event type 'tiny.ping'" in r.stderr
    r = cli("publish", "tiny.ping", "{}", env={**env, "STREAMPROC_APP": "tests.tiny_app:app"})
    assert r.returncode == 0, r.stderr


def test_an_apps_commands_are_subcommands_of_streamproc(env: dict[str, str]) -> None:
    """App(commands=[module]) adds that module's subcommands, for that app only."""
    r = cli("--app", "tests.tiny_app:with_commands", "tiny-hello", "world", env=env)
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.strip() == "hello world from App(concerns=['tiny-counter'], types=2, "
        "schedules=1, task_types=[])"
    )
    r = cli("--app", "tests.tiny_app:app", "tiny-hello", "world", env=env)
    assert r.returncode == 2
    assert "invalid choice: 'tiny-hello'" in r.stderr
    r = cli("--app", "tests.tiny_app:with_bad_commands", "check", env=env)
    assert r.returncode == 2
    assert "tests.tiny_app' has no register(subparsers)" in r.stderr


async def wait_for(cond: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if got := await cond():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("role", [["consume", "--all"], ["ingest", "--port", "0"], ["ticker"]])
async def test_every_role_creates_the_declared_groups_and_runs_the_hooks(
    role: list[str], env: dict[str, str], client: aioredis.Redis, keys: Keys
) -> None:
    if role[0] == "ingest":
        role = ["ingest", "--port", str(free_port())]
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "streamproc", "--app", "tests.tiny_app:app", *role),
        cwd=ROOT,
        env={**os.environ, **env, "STREAMPROC_LOG_JSON": "1", "STREAMPROC_BLOCK_MS": "100"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    hooks = keys.state("tiny", "hooks")
    try:
        assert await wait_for(lambda: client.lrange(hooks, 0, -1)) == [f"start:{role[0]}".encode()]
        groups = sorted(g.name for g in await group_infos(client, keys.stream("tiny")))
        assert groups == sorted(GROUPS["tiny"])
        if role[0] == "consume":  # and it runs the tiny app's concern
            r = cli("--app", "tests.tiny_app:app", "publish", "tiny.ping", '{"n": 5}', env=env)
            assert r.returncode == 0, r.stderr
            assert await wait_for(lambda: client.get(keys.state("tiny", "pings"))) == b"5"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]
    ran = [f"start:{role[0]}".encode(), f"stop:{role[0]}".encode()]
    assert await client.lrange(hooks, 0, -1) == ran


@pytest.fixture
def env(redis_url: str, keys: Keys) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
