"""Risky spot pools: who may make a pool (instance type, AZ) risky for whom (issue 17 item 3).

A spot interruption is reported by one cluster's agent. It makes the pool risky **for that
cluster** at once; it makes it risky **for every cluster** only once interruptions of the pool
came from ``MIN_REPORTERS`` distinct clusters *and* distinct sources (agents) within
``RISKY_POOL_TTL_S``. One tenant, or one agent speaking for many clusters, cannot on its own
steer every other tenant's optimizer away from a pool.

- ``<p>:state:risky-pool-reports:<type>:<az>`` (sorted set): member ``["<source>",
  "<cluster>"]`` (JSON), score = when it was handled (epoch ms); the newest ``MAX_REPORTS``
  kept; expires ``RISKY_POOL_TTL_S`` after the last report.
- ``<p>:state:risky-pool:<type>:<az>`` (string): the flag for every cluster (the id of the
  event that completed the quorum), expires after ``RISKY_POOL_TTL_S``.

The cluster-event processor writes both; the optimizer (``spot.optimizer_pipeline.pool_risks``)
reads both and applies the same rule to the reports itself, so two reports handled at the same
moment still count together.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from streamproc.keys import Keys

__all__ = (
    "MAX_REPORTS",
    "MIN_REPORTERS",
    "RISKY_POOL_TTL_S",
    "PoolReports",
    "report_member",
    "reports_key",
    "risky_pool_key",
)

#: How long a pool stays risky after an interruption (for its cluster; for all, after the
#: quorum's last report).
RISKY_POOL_TTL_S = 6 * 3600
#: Distinct clusters, and distinct sources, whose reports make a pool risky for every cluster.
MIN_REPORTERS = 2
#: Reports kept per pool (the newest): bounds the set whatever agents send.
MAX_REPORTS = 64

_member = msgspec.json.Encoder()
_pair = msgspec.json.Decoder(tuple[str, str])


def risky_pool_key(keys: Keys, instance_type: str, az: str) -> str:
    """The flag for every cluster."""
    return keys.state("risky-pool", instance_type, az)


def reports_key(keys: Keys, instance_type: str, az: str) -> str:
    """The pool's recent reports (who reported it, for which cluster)."""
    return keys.state("risky-pool-reports", instance_type, az)


def report_member(source: str, cluster_id: str) -> bytes:
    return _member.encode((source, cluster_id))


class PoolReports:
    """The reports of one pool within the window, as (source, cluster) pairs."""

    def __init__(self, members: Iterable[bytes | str]) -> None:
        self.pairs: set[tuple[str, str]] = set()
        for m in members:
            try:
                self.pairs.add(_pair.decode(m))
            except msgspec.DecodeError:  # not written by this module: ignored
                continue

    def risky_for(self, cluster_id: str) -> bool:
        """Risky for this cluster: it reported the pool itself."""
        return any(c == cluster_id for _, c in self.pairs)

    def risky_for_all(self) -> bool:
        """The quorum: ``MIN_REPORTERS`` distinct clusters and distinct sources."""
        return (
            len({c for _, c in self.pairs}) >= MIN_REPORTERS
            and len({s for s, _ in self.pairs}) >= MIN_REPORTERS
        )
