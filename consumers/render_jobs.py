"""Render job functions. They run in the render pool's spawned workers: bytes in, bytes out.

Both return ``pack_files({name: bytes})`` (msgpack), which the render concern stores.

- ``report_job``: 7 days of daily metrics -> one PNG chart per metric (matplotlib, Agg) and an
  HTML summary that shows them. The figures the concerns record (``schemas.metrics.FIGURES``:
  savings, hibernated hours, optimizer runs, interruptions, OOM kills, agent metrics) come
  first, in that order, with their labels and units; any other field follows by name.
- ``frame_job``: a procedural frame/preview render: PyTorch on CUDA when this worker has a GPU
  and torch is installed, NumPy otherwise; both give the same pixels within ``FRAME_TOLERANCE``.
"""

from __future__ import annotations

import html
import importlib.util
import io
from datetime import datetime
from typing import Any

import msgspec

from schemas.metrics import FIGURES
from streamproc.errors import Permanent
from streamproc.offload import WorkerContext

__all__ = (
    "FRAME_TOLERANCE",
    "FrameInput",
    "ReportInput",
    "frame_job",
    "pack_files",
    "render_frame",
    "report_job",
    "report_order",
    "unpack_files",
)

#: Max absolute difference per channel (0..1) between the torch and NumPy frame renders.
FRAME_TOLERANCE = 1e-4


class DayMetrics(msgspec.Struct, frozen=True):
    day: str
    values: dict[str, float]


class ReportInput(msgspec.Struct, frozen=True, kw_only=True):
    title: str
    period_start: datetime
    period_end: datetime
    days: list[DayMetrics]


class FrameInput(msgspec.Struct, frozen=True, kw_only=True):
    width: int = 256
    height: int = 256
    frames: int = 1
    seed: int = 0


def pack_files(files: dict[str, bytes]) -> bytes:
    return msgspec.msgpack.encode(files)


def unpack_files(data: bytes) -> dict[str, bytes]:
    return msgspec.msgpack.decode(data, type=dict[str, bytes])


# ---------------------------------------------------------------------- report


def report_job(payload: bytes, ctx: WorkerContext) -> bytes:
    try:
        report = msgspec.msgpack.decode(payload, type=ReportInput)
    except msgspec.DecodeError as e:
        raise Permanent(f"bad report input: {e}") from None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = report_order({n for d in report.days for n in d.values})
    files: dict[str, bytes] = {}
    rows = []
    for i, name in enumerate(names):
        days = [d.day[5:] for d in report.days]
        values = [d.values.get(name, 0.0) for d in report.days]
        fig = Figure(figsize=(6, 3), dpi=100)
        ax = fig.add_subplot()
        ax.bar(days, values, color="#3b7dd8")
        ax.set_title(_label(name))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        files[f"{name}.png"] = buf.getvalue()
        rows.append((name, sum(values), max(values, default=0.0)))
        ctx.progress((i + 1) / (len(names) + 1), f"chart {name}")
    files["index.html"] = _summary_html(report, rows).encode()
    ctx.progress(1.0, "summary")
    return pack_files(files)


def report_order(names: set[str]) -> list[str]:
    """The report's known figures first (in ``FIGURES`` order), then the rest by name."""
    return [n for n in FIGURES if n in names] + sorted(names - FIGURES.keys())


def _label(name: str) -> str:
    known = FIGURES.get(name)
    return f"{known[0]} ({known[1]})" if known else name.replace("_", " ")


def _summary_html(report: ReportInput, rows: list[tuple[str, float, float]]) -> str:
    e = html.escape
    period = f"{report.period_start:%Y-%m-%d} to {report.period_end:%Y-%m-%d}"
    table = "".join(
        f"<tr><td>{e(_label(n))}</td><td>{total:,.2f}</td><td>{peak:,.2f}</td>"
        f"<td><code>{e(n)}</code></td></tr>"
        for n, total, peak in rows
    )
    charts = "".join(f'<figure><img src="{e(n)}.png" alt="{e(n)}"></figure>' for n, _, _ in rows)
    body = table or '<tr><td colspan="4">no data for this period</td></tr>'
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>"
        f"</head><body><h1>{e(report.title)}</h1><p>{e(period)} · {len(report.days)} days</p>"
        f"<table><tr><th>metric</th><th>total</th><th>peak day</th><th>field</th></tr>{body}"
        f"</table>{charts}</body></html>"
    )


# ---------------------------------------------------------------------- frames


def _scene(seed: int, blobs: int = 12) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "centre": rng.uniform(0.1, 0.9, (blobs, 2)).astype(np.float32),
        "radius": rng.uniform(0.05, 0.25, blobs).astype(np.float32),
        "colour": rng.uniform(0.2, 1.0, (blobs, 3)).astype(np.float32),
        "speed": rng.uniform(-0.2, 0.2, (blobs, 2)).astype(np.float32),
    }


def render_frame(inp: FrameInput, t: int, backend: str = "numpy") -> Any:
    """One frame as a float32 (height, width, 3) array in [0, 1] (a NumPy array)."""
    import numpy as np

    scene = _scene(inp.seed)
    if backend == "numpy":
        ys = np.linspace(0, 1, inp.height, dtype=np.float32)[:, None, None]
        xs = np.linspace(0, 1, inp.width, dtype=np.float32)[None, :, None]
        c = (scene["centre"] + scene["speed"] * (t / 30.0)) % 1.0
        d2 = (xs - c[:, 0]) ** 2 + (ys - c[:, 1]) ** 2
        w = np.exp(-d2 / scene["radius"] ** 2)
        light = w @ scene["colour"]
        return (1.0 - np.exp(-light)).astype(np.float32)
    import torch  # type: ignore[import-not-found,unused-ignore]  # optional extra

    dev = "cuda" if backend == "cuda" else "cpu"
    s = {k: torch.from_numpy(v).to(dev) for k, v in scene.items()}
    ys_t = torch.linspace(0, 1, inp.height, dtype=torch.float32, device=dev)[:, None, None]
    xs_t = torch.linspace(0, 1, inp.width, dtype=torch.float32, device=dev)[None, :, None]
    c_t = torch.remainder(s["centre"] + s["speed"] * (t / 30.0), 1.0)
    d2_t = (xs_t - c_t[:, 0]) ** 2 + (ys_t - c_t[:, 1]) ** 2
    w_t = torch.exp(-d2_t / s["radius"] ** 2)
    out = 1.0 - torch.exp(-(w_t @ s["colour"]))
    return out.cpu().numpy().astype(np.float32)


def frame_backend(device: str) -> str:
    """``cuda`` with a GPU worker and torch installed; ``numpy`` otherwise."""
    if device == "cuda" and importlib.util.find_spec("torch") is not None:
        return "cuda"
    return "numpy"


def frame_job(payload: bytes, ctx: WorkerContext) -> bytes:
    try:
        inp = msgspec.msgpack.decode(payload, type=FrameInput)
    except msgspec.DecodeError as e:
        raise Permanent(f"bad frame input: {e}") from None
    import matplotlib.image

    backend = frame_backend(ctx.device)
    files: dict[str, bytes] = {}
    for t in range(inp.frames):
        buf = io.BytesIO()
        matplotlib.image.imsave(buf, render_frame(inp, t, backend), format="png")
        files[f"frame-{t:04d}.png"] = buf.getvalue()
        ctx.progress((t + 1) / inp.frames, f"frame {t + 1}/{inp.frames}")
    files["backend.txt"] = backend.encode()
    return pack_files(files)
