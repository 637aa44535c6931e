"""The results table, the JSON file and the PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ("plot", "table")


def _fmt_rate(rate: float | str) -> str:
    return f"{rate:,.0f}/s" if isinstance(rate, int | float) else str(rate)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table: scenario, rate, p50, p99, p99.9, max (intended publish time → handler
    start), p99 from the actual send (the engine's part), ack p99, throughput, verdict."""
    lines = [
        "| scenario | via | rate | p50 ms | p99 ms | p99.9 ms | max ms | p99 from send ms "
        "| ack p99 ms | throughput/s | verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in results:
        for i, row in enumerate(sc["rows"]):
            verdict = sc["verdict"] if i == len(sc["rows"]) - 1 else ""
            lines.append(
                f"| {row['scenario']} | {sc['via']} | {_fmt_rate(row['rate'])} "
                f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['p999_ms']:.2f} "
                f"| {row['max_ms']:.2f} | {row['from_send_p99_ms']:.2f} "
                f"| {row['ack_p99_ms']:.2f} "
                f"| {row['throughput_per_s']:,.0f} | {verdict} |"
            )
    return "\n".join(lines)


def checks_text(results: list[dict[str, Any]]) -> str:
    out = []
    for sc in results:
        for c in sc["checks"]:
            mark = "ok  " if c["ok"] else "FAIL"
            out.append(
                f"{mark} {sc['name']}: {c['check']} {c['target']:g} (measured {c['measured']:.4g})"
            )
    return "\n".join(out)


def plot(results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write the plots; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. latency percentile curve per scenario (one line per run)
    fig, ax = plt.subplots(figsize=(8, 5))
    for sc in results:
        for row, run in zip(sc["rows"], sc["runs"], strict=True):
            pts = run["curve_start"]
            if pts:
                xs = [1 / max(1e-6, 1 - p / 100) for p, _ in pts]
                ax.plot(
                    xs,
                    [max(v, 1e-3) for _, v in pts],
                    label=f"{sc['name']} {_fmt_rate(row['rate'])}",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, intended publish → handler start (ms)")
    ax.set_title("End-to-end latency by percentile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "latency-percentiles.png")

    # 2. p99 and throughput against rate (steady-state runs: steady, soak, render, ramp)
    points = sorted(
        (row["rate"], row["p99_ms"], row["throughput_per_s"])
        for sc in results
        for row in sc["rows"]
        if isinstance(row["rate"], int | float) and sc["via"] == "producer"
    )
    if points:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:red")
        ax.set_xlabel("offered rate (events/s)")
        ax.set_ylabel("p99 latency (ms)", color="tab:red")
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in points], [p[2] for p in points], "s--", color="tab:blue")
        ax2.plot([p[0] for p in points], [p[0] for p in points], ":", color="grey")
        ax2.set_ylabel("throughput (events/s); dotted: offered", color="tab:blue")
        ax.set_title("p99 and throughput against offered rate (producer API)")
        ax.grid(True, alpha=0.3)
        save(fig, "rate.png")

    # 3. scaling with consumer processes
    for sc in results:
        if sc["kind"] == "scaling":
            ks = [r["consumers"] for r in sc["runs"]]
            tp = [r["throughput_per_s"] for r in sc["runs"]]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.bar([str(k) for k in ks], tp, color="tab:green")
            ax.set_xlabel("consumer processes")
            ax.set_ylabel("drain throughput (events/s)")
            ax.set_title(f"Scaling: {sc['name']}")
            save(fig, f"scaling-{sc['name']}.png")

    # 4. soak: RSS and Redis memory over time
    for sc in results:
        if sc["kind"] == "soak":
            samples = sc["runs"][0]["samples"]
            fig, ax = plt.subplots(figsize=(8, 4))
            t = [s["t_s"] for s in samples]
            for key, label in (
                ("rss_consumer0", "consumer RSS"),
                ("rss_loadgen", "load generator RSS"),
                ("redis_used_memory", "Redis used_memory"),
            ):
                ax.plot(t, [s.get(key, math.nan) / 2**20 for s in samples], label=label)
            ax.set_xlabel("seconds")
            ax.set_ylabel("MiB")
            ax.set_title(f"Soak: {sc['name']} (trimming on)")
            ax.legend()
            ax.grid(True, alpha=0.3)
            save(fig, f"soak-{sc['name']}.png")
    return written
