"""The ticker's table for tests/test_cluster_roles.py: the hibernation tick every second, so
a short test sees the ticker (leader lease, fire script, outbox) and the hibernation concern
(effects in the ``{ticks}`` slot) run on the cluster. ``streamproc ticker --schedules
tests.cluster_roles_support:SCHEDULES``."""

from __future__ import annotations

from schemas.ticks import HibernationTick
from streamproc.schedule import Schedule, every

__all__ = ("SCHEDULES",)

SCHEDULES = [
    Schedule(name="hibernation", trigger=every("1s"), event=HibernationTick, missed="latest"),
]
