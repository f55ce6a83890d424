"""PNG plots of a run, for people who would rather look than read.

`write_loss_plot(output_dir)`: the training recipes call it once at the end of a run (rank 0); it
reads `output_dir/metrics.jsonl` and writes `output_dir/loss.png` (train loss, and eval loss when
the run evaluated). A plot is a convenience: any error becomes a warning and the run's result is
untouched. `bar_plot` draws one value per named bar (the demo's accuracy per stage).

matplotlib's Agg backend is used explicitly: no display, no GUI toolkit, the same on a laptop and
in a pod.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("kubetune.plots")

LOSS_PLOT = "loss.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Write the PNG atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def loss_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in metrics.jsonl records, in step order (the last record of a step wins)."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_losses(series: dict[str, dict[str, tuple[list[int], list[float]]]], path: Path, title: str) -> Path:
    """One panel per run (name -> {label: (steps, values)}), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], series.items()):
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 3 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    fig.suptitle(title, y=1.04)  # above the panel titles
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def write_loss_plot(output_dir: str | Path, title: Optional[str] = None) -> Optional[Path]:
    """output_dir/loss.png from output_dir/metrics.jsonl; None (and a warning) if it cannot be drawn."""
    output_dir = Path(output_dir)
    try:
        from kubetune.trainer.training.metrics import read_metrics

        records = read_metrics(output_dir / "metrics.jsonl")
        curves = {label: loss_series(records, key) for label, key in (("train", "loss"), ("eval", "eval_loss"))}
        curves = {label: c for label, c in curves.items() if c[0]}
        if not curves:
            log.warning("no loss plot: %s has no loss values", output_dir / "metrics.jsonl")
            return None
        path = plot_losses({title or output_dir.name: curves}, output_dir / LOSS_PLOT, "training loss")
    except ImportError as err:
        log.warning("no loss plot: matplotlib is not installed (%s); pip install matplotlib", err)
        return None
    except Exception as err:  # noqa: BLE001 - a plot must never fail the run it describes
        log.warning("no loss plot in %s: %s: %s", output_dir, type(err).__name__, err)
        return None
    log.info("loss plot: %s", path)
    return path


def bar_plot(values: dict[str, float], path: Path, title: str, ylabel: str, ylim: tuple[float, float] = (0.0, 1.0)) -> Path:
    """One bar per name, its value written on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 * len(values) + 2, 3.4))
    bars = ax.bar(list(values), list(values.values()), color="#4C72B0")
    for bar, value in zip(bars, values.values()):
        ax.annotate(f"{value:.0%}" if ylim == (0.0, 1.0) else f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return path
