"""Risky spot pools: who may make a pool (instance type, AZ) risky for whom (issue 17 item 3).

A spot interruption is reported by one cluster's agent. It makes the pool risky **for that
cluster** at once; it makes it risky **for every cluster** only once interruptions of the pool
came from ``MIN_REPORTERS`` distinct clusters *and* distinct sources (agents) within
``RISKY_POOL_TTL_S``. One tenant, or one agent speaking for many clusters, cannot on its own
steer every other tenant's optimizer away from a pool.

- ``<p>:state:risky-pool-reports:<type>:<az>`` (sorted set): member ``["<source>",
  "<cluster>"]`` (JSON), score = when it was handled (epoch ms); the newest ``MAX_REPORTS``
  within ``REPORTS_KEPT_S`` kept; expires ``REPORTS_KEPT_S`` after the last report.
- ``<p>:state:risky-pool:<type>:<az>`` (string): the flag for every cluster (the id of the
  event that completed the quorum), expires after ``RISKY_POOL_TTL_S``.

The optimizer's other input, interruptions per pool and day (shared by every client, 0.15 risk
each), lifts a pool to the risk limit for a cluster only when the reports kept name that
cluster or meet the quorum (or none are kept): one tenant posting the same pool again and
again stays below the limit for the others.

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
    "REPORTS_KEPT_S",
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
#: How long reports are kept: the optimizer's window for interruption counts (7 days).
REPORTS_KEPT_S = 7 * 86400

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
    """The reports of one pool, as (source, cluster) pairs: those of the flag's window
    (``RISKY_POOL_TTL_S``) and all those kept (``REPORTS_KEPT_S``)."""

    def __init__(self, reports: Iterable[tuple[bytes | str, float]], now_ms: int) -> None:
        self.recent: set[tuple[str, str]] = set()
        self.kept: set[tuple[str, str]] = set()
        since_ms = now_ms - RISKY_POOL_TTL_S * 1000
        for member, at_ms in reports:
            try:
                pair = _pair.decode(member)
            except msgspec.DecodeError:  # not written by this module: ignored
                continue
            self.kept.add(pair)
            if at_ms >= since_ms:
                self.recent.add(pair)

    def risky_for(self, cluster_id: str) -> bool:
        """Risky for this cluster: it reported the pool itself within the flag's window."""
        return any(c == cluster_id for _, c in self.recent)

    def risky_for_all(self) -> bool:
        """The quorum within the flag's window."""
        return _quorum(self.recent)

    def counts_for(self, cluster_id: str) -> bool:
        """May the pool's shared interruption counts raise this cluster's risk to the limit:
        the cluster reported the pool itself, the quorum holds over the reports kept, or
        there are none (counts from before reports were kept, or written by other means)."""
        return not self.kept or any(c == cluster_id for _, c in self.kept) or _quorum(self.kept)


def _quorum(pairs: set[tuple[str, str]]) -> bool:
    """``MIN_REPORTERS`` distinct clusters and distinct sources."""
    return (
        len({c for _, c in pairs}) >= MIN_REPORTERS and len({s for s, _ in pairs}) >= MIN_REPORTERS
    )
