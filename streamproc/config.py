"""Reading the environment: done here, at the entry point, and nowhere else.

| variable | meaning | form |
|---|---|---|
| ``REDIS_URL`` | Redis to use; unset: ``up`` starts one | ``redis://host:port/db`` (1) |
| ``STREAMPROC_PREFIX`` | key prefix | name, default ``sp`` |
| ``STREAMPROC_CONSUMER`` | consumer name, stable across restarts | default: host name |
| ``STREAMPROC_LOG_LEVEL`` | debug, info, warning, error | default ``info`` |
| ``STREAMPROC_LOG_JSON`` | force JSON logs (1) or console logs (0) | default: JSON unless a TTY |
| ``STREAMPROC_ALLOW_EVICTION`` | start on a Redis that may evict keys (1) | default ``0`` |
| ``STREAMPROC_REDIS_MEMORY_ALERT`` | used/maxmemory that is high (alert, check) | ``0.8`` |
| ``STREAMPROC_REDIS_MEMORY_SAMPLE_S`` | ingest's INFO memory interval | seconds, ``5`` |
| ``STREAMPROC_PARTITIONS`` | partitioned topics: the same in every role | ``cluster=6,metrics=3`` |
| ``STREAMPROC_TASK_CONCURRENCY`` | queue concurrency, all runners (2) | ``crawl=3,tickets=6`` |
| ``STREAMPROC_<SETTING>`` | any ConsumerSettings / ProducerSettings field, upper-case | its type |

(1) or ``redis+cluster://host:port``: a Redis Cluster (``streamproc.connection.connect``).
(2) overrides of the application's queue figures (``parse_task_concurrency``), applied by
its ``configure`` (this repository: ``consumers.tasks``); the same in every runner.
A bad value fails at start with a message naming the variable and the expected form.
"""

from __future__ import annotations

import os
import re
import socket
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

import msgspec

from streamproc.errors import ConfigError, RedisUrlError
from streamproc.keys import NAME_RE, Keys
from streamproc.settings import ConsumerSettings, ProducerSettings, RedisSettings

__all__ = (
    "MAX_TASK_CONCURRENCY",
    "TASK_CONCURRENCY_VAR",
    "Config",
    "load_config",
    "parse_partitions",
    "parse_task_concurrency",
    "settings_from_env",
)

_LEVELS = ("debug", "info", "warning", "error")


class Config(msgspec.Struct, frozen=True, kw_only=True):
    redis: RedisSettings
    consumer: ConsumerSettings
    producer: ProducerSettings
    log_level: str
    log_json: bool | None
    #: False when REDIS_URL was not set (``up`` then starts an embedded Redis).
    redis_url_given: bool
    #: Partitioned topics: topic -> number of partitions (``streamproc.keys``).
    partitions: dict[str, int] = msgspec.field(default_factory=dict)

    def keys(self) -> Keys:
        """The key names of this configuration: its prefix and its partitioned topics."""
        return Keys(self.redis.key_prefix, partitions=self.partitions)


def parse_partitions(raw: str) -> dict[str, int]:
    """``cluster=6,metrics=3`` -> {"cluster": 6, "metrics": 3}; ConfigError when malformed."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        topic, sep, n = part.partition("=")
        if not sep or not n.strip().isdigit():
            raise ConfigError(
                f"STREAMPROC_PARTITIONS={raw!r}: expected topic=count pairs, "
                "e.g. cluster=6,metrics=3"
            )
        out[topic.strip()] = int(n)
    try:
        Keys("sp", partitions=out)
    except ConfigError as e:
        raise ConfigError(f"STREAMPROC_PARTITIONS={raw!r}: {e}") from None
    return out


#: Tasks of one queue at once, across every runner: the most an override may ask for.
MAX_TASK_CONCURRENCY = 1000
TASK_CONCURRENCY_VAR = "STREAMPROC_TASK_CONCURRENCY"
_COUNT_RE = re.compile(r"[+-]?[0-9]+")


def parse_task_concurrency(raw: str, queues: Iterable[str] | None = None) -> dict[str, int]:
    """``crawl=3,tickets=6`` -> {"crawl": 3, "tickets": 6}: each queue's concurrency across
    every runner. ConfigError naming the variable and the item when an item is not
    ``queue=count``, its count is not an integer within 1..MAX_TASK_CONCURRENCY, a queue comes
    twice, or (``queues`` given) the queue is not one of them. Empty: no overrides."""
    known = None if queues is None else sorted(queues)
    out: dict[str, int] = {}
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue

        def bad(why: str, item: str = item) -> ConfigError:
            return ConfigError(f"{TASK_CONCURRENCY_VAR}={raw!r}: item {item!r}: {why}")

        queue, sep, count = (x.strip() for x in item.partition("="))
        if not sep or not queue or "=" in count:
            raise bad("expected queue=count, e.g. crawl=3,tickets=6")
        if known is not None and queue not in known:
            raise bad(f"unknown queue {queue!r}; known: {', '.join(known)}")
        if not NAME_RE.fullmatch(queue):
            raise bad("a queue is a name of letters, digits, _.-")
        if queue in out:
            raise bad(f"queue {queue!r} is given twice")
        if not _COUNT_RE.fullmatch(count):
            raise bad(f"count {count!r} is not an integer")
        n = int(count) if len(count) <= 12 else MAX_TASK_CONCURRENCY + 1
        if not 1 <= n <= MAX_TASK_CONCURRENCY:
            raise bad(f"count {count[:20]} is not within 1..{MAX_TASK_CONCURRENCY}")
        out[queue] = n
    return out


S = TypeVar("S")


def _default_consumer_name() -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in socket.gethostname())
    return (name.strip("-_.") or "c")[:40]


def settings_from_env(cls: type[S], prefix: str, env: Mapping[str, str]) -> S:
    """A settings Struct from ``<prefix><FIELD>`` variables; a nested Struct field ``pool``
    reads ``<prefix>POOL_<FIELD>``; a tuple takes a comma-separated list (empty = none).

    Unset variables keep the defaults. A bad value raises ConfigError naming its variable.
    """
    hints = msgspec.structs.fields(cls)  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for f in hints:
        var = f"{prefix}{f.name.upper()}"
        nested = _struct_type(f.type)
        if nested is not None:
            if any(k.startswith(var + "_") for k in env):
                values[f.name] = settings_from_env(nested, var + "_", env)
            continue
        if var not in env:
            continue
        raw = env[var]
        value: Any = raw
        if _is_tuple(f.type):
            value = [p.strip() for p in raw.split(",") if p.strip()]
        try:
            msgspec.convert({f.name: value}, cls, strict=False)
        except msgspec.ValidationError as e:
            choices = typing.get_args(f.type) if typing.get_origin(f.type) is Literal else ()
            reason = (
                f"expected one of {', '.join(map(repr, choices))}"
                if choices
                else str(e).split(" - at ")[0]
            )
            raise ConfigError(f"{var}={raw!r}: {reason}") from None
        except ConfigError as e:  # the Struct's own checks (__post_init__)
            raise ConfigError(f"{var}={raw!r}: {e}") from None
        values[f.name] = value
    try:
        return msgspec.convert(values, cls, strict=False)
    except (msgspec.ValidationError, ConfigError) as e:
        raise ConfigError(f"{prefix}*: {e}") from None


def _struct_type(t: Any) -> type[Any] | None:
    return t if isinstance(t, type) and issubclass(t, msgspec.Struct) else None


def _number(env: Mapping[str, str], var: str, default: float) -> float:
    if not env.get(var, "").strip():
        return default
    try:
        return float(env[var])
    except ValueError:
        raise ConfigError(f"{var}={env[var]!r}: expected a number") from None


def _is_tuple(t: Any) -> bool:
    return any(a is tuple or typing.get_origin(a) is tuple for a in (t, *typing.get_args(t)))


def load_config(env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    url = env.get("REDIS_URL", "")
    prefix = env.get("STREAMPROC_PREFIX", "sp")
    if not NAME_RE.fullmatch(prefix):
        raise ConfigError(f"STREAMPROC_PREFIX={prefix!r}: expected a name of letters, digits, _.-")
    level = env.get("STREAMPROC_LOG_LEVEL", "info").lower()
    if level not in _LEVELS:
        raise ConfigError(f"STREAMPROC_LOG_LEVEL={level!r}: expected one of {', '.join(_LEVELS)}")
    json_raw = env.get("STREAMPROC_LOG_JSON")
    if json_raw not in (None, "", "0", "1"):
        raise ConfigError(f"STREAMPROC_LOG_JSON={json_raw!r}: expected 0 or 1")
    eviction_raw = env.get("STREAMPROC_ALLOW_EVICTION", "")
    if eviction_raw not in ("", "0", "1"):
        raise ConfigError(f"STREAMPROC_ALLOW_EVICTION={eviction_raw!r}: expected 0 or 1")
    alert_ratio = _number(env, "STREAMPROC_REDIS_MEMORY_ALERT", 0.8)
    sample_s = _number(env, "STREAMPROC_REDIS_MEMORY_SAMPLE_S", 5.0)
    try:
        redis = RedisSettings(
            url=url or "redis://127.0.0.1:6379/0",
            key_prefix=prefix,
            allow_eviction=eviction_raw == "1",
            memory_alert_ratio=alert_ratio,
            memory_sample_s=sample_s,
        )
    except RedisUrlError as e:
        raise type(e)(f"REDIS_URL: {e}") from None
    except ConfigError as e:  # the memory settings: name the variables
        raise ConfigError(
            f"STREAMPROC_REDIS_MEMORY_ALERT / STREAMPROC_REDIS_MEMORY_SAMPLE_S: {e}"
        ) from None
    consumer_name = env.get("STREAMPROC_CONSUMER") or _default_consumer_name()
    if not NAME_RE.fullmatch(consumer_name):
        raise ConfigError(
            f"STREAMPROC_CONSUMER={consumer_name!r}: expected a name of letters, "
            "digits, _.- (at most 63)"
        )
    # One reader of the environment for every settings object (settings_from_env).
    consumer_env = {**env, "STREAMPROC_CONSUMER": consumer_name}
    if not env.get("STREAMPROC_CONSUMER"):
        # The host name is a default, not a promise: a second process on the same host takes
        # "<host>-2" instead of refusing to start (a name given explicitly refuses).
        consumer_env.setdefault("STREAMPROC_NAME_TAKEN", "suffix")
    consumer = settings_from_env(ConsumerSettings, "STREAMPROC_", consumer_env)
    producer = settings_from_env(ProducerSettings, "STREAMPROC_", env)
    return Config(
        redis=redis,
        consumer=consumer,
        producer=producer,
        log_level=level,
        log_json=None if json_raw in (None, "") else json_raw == "1",
        redis_url_given=bool(url),
        partitions=parse_partitions(env.get("STREAMPROC_PARTITIONS", "")),
    )
