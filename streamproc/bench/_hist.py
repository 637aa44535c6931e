"""Latency histograms (HdrHistogram, microseconds) and their JSON-safe form."""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ("PERCENTILES", "encode", "merge", "new_histogram", "record_s", "summary")

#: 1 µs .. 1 h, 3 significant digits.
_LOW_US, _HIGH_US, _DIGITS = 1, 3_600_000_000, 3

PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)


def new_histogram() -> Any:
    return HdrHistogram(_LOW_US, _HIGH_US, _DIGITS)


def record_s(hist: Any, seconds: float) -> None:
    """Record a latency given in seconds (clamped into the histogram's range)."""
    hist.record_value(min(_HIGH_US, max(_LOW_US, int(seconds * 1e6))))


def encode(hist: Any) -> str:
    return bytes(hist.encode()).decode()


def merge(encoded: list[str]) -> Any:
    hist = new_histogram()
    for e in encoded:
        if e:
            hist.decode_and_add(e.encode())
    return hist


def summary(hist: Any) -> dict[str, float]:
    """Count, percentiles and max in milliseconds (0 when nothing was recorded)."""
    count = int(hist.get_total_count())
    if not count:
        return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0}
    at = hist.get_value_at_percentile
    return {
        "count": count,
        "p50_ms": at(50.0) / 1000,
        "p90_ms": at(90.0) / 1000,
        "p99_ms": at(99.0) / 1000,
        "p999_ms": at(99.9) / 1000,
        "p9999_ms": at(99.99) / 1000,
        "max_ms": hist.get_max_value() / 1000,
        "mean_ms": hist.get_mean_value() / 1000,
    }


def curve(hist: Any, points: int = 60) -> list[tuple[float, float]]:
    """(percentile, latency ms) pairs for a percentile plot, denser toward the tail."""
    out: list[tuple[float, float]] = []
    if not hist.get_total_count():
        return out
    for k in range(points):
        # 0, 90, 99, 99.9 … evenly spaced on a log scale of 1 / (1 - p)
        p = 100.0 * (1 - 10 ** (-5 * k / (points - 1)))
        out.append((p, hist.get_value_at_percentile(min(p, 99.9999)) / 1000))
    return out
