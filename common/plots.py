"""`training_curves.png`: a run's loss, smoothed loss, learning rate, padding ratio and tokens/s over steps.

Read from `metrics.jsonl` (every optimizer step, written whatever `--report_to` is), so every run and `--demo` get
the same figure next to their LoRA, at the end and in each checkpoint, without a tracker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_FILE = "training_curves.png"
SMOOTHING = 0.9  # weight of the past in the smoothed loss (TensorBoard's debiased exponential moving average)
# (panel title, metrics.jsonl keys drawn in it)
PANELS = (
    ("loss", ("loss", "smoothed loss")),
    ("learning rate", ("lr",)),
    ("padding ratio", ("padding_ratio",)),
    ("tokens / s", ("tokens_per_second",)),
)


def read_metrics(metrics_file: str | os.PathLike) -> list[dict]:
    """The per-step records of a metrics.jsonl."""
    return [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: early points are not pulled towards zero."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def curves_figure(records: list[dict]) -> Figure:
    """One panel per entry of PANELS, steps on a shared x axis (no pyplot: no backend or global state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    steps = [r["step"] for r in records]
    series = {key: [r[key] for r in records] for key in ("loss", "lr", "padding_ratio", "tokens_per_second")}
    series["smoothed loss"] = smoothed(series["loss"])
    figure = Figure(figsize=(8, 9))
    axes = figure.subplots(len(PANELS), 1, sharex=True)
    figure.subplots_adjust(left=0.11, right=0.97, top=0.96, bottom=0.06, hspace=0.3)  # layout engines cost 3x
    for axis, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            alpha = 0.35 if key == "loss" else 1.0
            axis.plot(steps, series[key], label=key, alpha=alpha)
        axis.set_title(title, loc="left", fontsize="medium")
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.legend(loc="upper right")
        if keys == ("lr",):
            # Plain decimals of small rates ("−0.000025") ran past the figure's left edge: "%g" keeps them short
            # (2.5e-05, 0.0001), and a rate is never negative.
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_ylim(bottom=0)
    axes[-1].set_xlabel("step")
    return figure


def save_training_curves(metrics_file: str | os.PathLike, out_file: str | os.PathLike) -> Path | None:
    """Write the curves of `metrics_file` to `out_file` (PNG) through a temporary file; None if nothing is logged."""
    metrics_file, out_file = Path(metrics_file), Path(out_file)
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    if not records:
        return None
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    try:
        curves_figure(records).savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file
