"""The settings and AWS access the concern, the startup hook and the CLI share (one per
process, set by ``configure_from_env`` at the entry point, or by a test with ``use``)."""

from __future__ import annotations

from collections.abc import Mapping

from spot.aws import AwsSettings
from workers._aws import WorkerAws
from workers.settings import WorkerSettings, from_env

__all__ = ("Runtime", "configure_from_env", "runtime", "use")


class Runtime:
    def __init__(self, settings: WorkerSettings, aws: AwsSettings) -> None:
        self.settings = settings
        self.aws_settings = aws
        self.aws = WorkerAws(aws)
        #: When this process next trims ``worker-events`` (monotonic s).
        self.events_trim_at = 0.0

    def discover_regions(self) -> tuple[str, ...]:
        return self.settings.discover_regions or (self.aws_settings.region,)


_runtime: Runtime | None = None


def use(rt: Runtime | None) -> None:
    """Use this runtime from now on (None: the defaults, built at the next use)."""
    global _runtime
    _runtime = rt


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(WorkerSettings(), AwsSettings())
    return _runtime


def configure_from_env(env: Mapping[str, str]) -> None:
    """``STREAMPROC_WORKERS_*`` and ``STREAMPROC_AWS_*``."""
    from spot import aws_settings

    use(Runtime(from_env(env), aws_settings(env)))
