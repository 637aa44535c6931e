"""Prometheus metrics (prometheus-client): named by Prometheus conventions."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ("TRIM_CUT_UNACKED",)

TRIM_CUT_UNACKED = Counter(
    "streamproc_trim_cut_unacked_entries",
    "Entries a group had not acked that the hard length cap deleted",
    ["stream"],
)
