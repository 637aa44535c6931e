"""The SLO file: scenarios and their targets, read from TOML, validated at load.

One ``[defaults]`` table (applied to every scenario) and one ``[[scenario]]`` table per
scenario, tagged by ``kind``. Unknown keys and wrong types are a ``ConfigError``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from streamproc.errors import ConfigError

__all__ = (
    "Burst",
    "Ramp",
    "RenderMix",
    "Scaling",
    "Scenario",
    "SloFile",
    "Soak",
    "Steady",
    "Targets",
    "load_slo",
)

Via = Literal["producer", "http"]


class Targets(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a scenario must reach; a target left out is not checked."""

    #: End-to-end latency, intended publish time → handler start, in milliseconds.
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    #: Same, intended publish time → ack.
    ack_p99_ms: float | None = None
    #: Achieved throughput / offered rate (steady, soak, render): the load was kept up with.
    min_rate_ratio: float | None = None
    #: Drain throughput / the bare redis-py loop's (burst).
    min_ratio_to_bare: float | None = None
    #: Ramp: the highest rate held with p99 under ``saturation_p99_ms`` must be at least this.
    min_saturation_per_s: float | None = None
    #: Scaling: throughput with 2 consumer processes / with 1.
    min_speedup_2: float | None = None
    #: Soak: growth of consumer RSS and Redis used_memory, second half against first half.
    max_rss_growth_pct: float | None = None
    max_redis_growth_pct: float | None = None
    #: Render mix: event-loop lag p99 of the consumer process.
    loop_lag_p99_ms: float | None = None


class _Base(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"
):
    name: str
    via: Via = "producer"
    #: Size of the event's JSON body (``data``), padded to this.
    event_bytes: int = 256
    #: Load sent before the measured window, not recorded (connections, caches, JIT of Lua).
    warmup_s: float = 1.0
    consumers: int = 1
    #: Handlers at once per consumer process (the engine's default is 10).
    concurrency: int = 10
    #: Producer and consumer dedup window; 0 = off. The engine's default is 24 h.
    dedup_window_ms: int = 86_400_000
    trim_interval_ms: int = 30_000
    #: Consumer XREADGROUP COUNT and the load generator's largest publish batch.
    batch: int = 100
    #: Seconds to wait for the group to drain after the load stopped.
    drain_timeout_s: float = 60.0
    slo: Targets = msgspec.field(default_factory=Targets)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("scenario without a name")
        for field in ("event_bytes", "consumers", "concurrency", "batch", "drain_timeout_s"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"scenario {self.name!r}: {field} must be > 0")
        if self.warmup_s < 0 or self.dedup_window_ms < 0 or self.trim_interval_ms < 0:
            raise ConfigError(f"scenario {self.name!r}: negative warmup/dedup/trim setting")


class Steady(_Base, frozen=True, kw_only=True, tag="steady"):
    """A fixed rate for a duration."""

    rate_per_s: float
    duration_s: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rate_per_s <= 0 or self.duration_s <= 0:
            raise ConfigError(f"scenario {self.name!r}: rate_per_s and duration_s must be > 0")


class Soak(Steady, frozen=True, kw_only=True, tag="soak"):
    """A steady rate for long, sampling RSS and Redis memory (trimming on)."""

    sample_every_s: float = 1.0


class RenderMix(Steady, frozen=True, kw_only=True, tag="render"):
    """Every ``render_every``-th event runs a CPU-heavy job in the render pool."""

    render_every: int = 50
    render_ms: float = 20.0
    render_workers: int = 1


class Burst(_Base, frozen=True, kw_only=True, tag="burst"):
    """``events`` published as fast as possible into an idle group (intended time: the start)."""

    events: int = 100_000
    warmup_s: float = 0.0


class Scaling(Burst, frozen=True, kw_only=True, tag="scaling"):
    """The burst drained by 1, 2, 4 … consumer processes."""

    processes: tuple[int, ...] = (1, 2, 4)


class Ramp(_Base, frozen=True, kw_only=True, tag="ramp"):
    """Steady steps at rising rates until p99 passes ``saturation_p99_ms`` or the rate is missed."""

    rates_per_s: tuple[float, ...]
    step_s: float = 5.0
    saturation_p99_ms: float = 100.0


Scenario = Steady | Soak | RenderMix | Burst | Scaling | Ramp


class SloFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scenario: tuple[Scenario, ...]
    #: Run the baselines (redis-benchmark, bare redis-py loop) with this many events; 0 = skip.
    baseline_events: int = 100_000
    description: str = ""


def load_slo(path: Path, *, only: tuple[str, ...] = ()) -> SloFile:
    """Read and validate the SLO file; ``only`` keeps the named scenarios."""
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read SLO file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"SLO file {path}: {e}") from None
    defaults = raw.pop("defaults", {})
    scenarios = raw.get("scenario", [])
    if not isinstance(scenarios, list) or not scenarios:
        raise ConfigError(f"SLO file {path}: no [[scenario]] tables")
    raw["scenario"] = [{**defaults, **s} for s in scenarios]
    try:
        slo = msgspec.convert(raw, SloFile)
    except msgspec.ValidationError as e:
        raise ConfigError(f"SLO file {path}: {e}") from None
    names = [s.name for s in slo.scenario]
    if len(set(names)) != len(names):
        raise ConfigError(f"SLO file {path}: scenario names must be unique")
    if only:
        missing = set(only) - set(names)
        if missing:
            raise ConfigError(f"unknown scenario(s) {sorted(missing)}; in the file: {names}")
        slo = msgspec.structs.replace(
            slo, scenario=tuple(s for s in slo.scenario if s.name in only)
        )
    return slo
