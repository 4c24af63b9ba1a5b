"""Pictures of a finished search, written in its folder beside tune_results.csv:

- tune_curves.png: mask mAP50-95 per epoch of every trial (from its results.csv); a trial that ran fewer epochs
  than asked (stopped by ASHA, interrupted or out of time) ends in an x, a failed one is dashed, the best is drawn
  thick and named in the legend.
- tune_params.png: one panel per searched value, the value against the trial's best mask mAP50-95 (log scale where
  the values span more than a factor of 50), the best trial marked.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pyseg.engine.run_files import BEST_METRIC

METRIC = BEST_METRIC
CURVES_FILE, PARAMS_FILE = "tune_curves.png", "tune_params.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trial_curve(run_dir: str | Path | None) -> list[tuple[int, float]]:
    """(epoch, mask mAP50-95) of every validated epoch in a trial's results.csv; [] when there is none."""
    path = Path(run_dir or "") / "results.csv"
    if not run_dir or not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r[METRIC])) for r in csv.DictReader(f) if r.get(METRIC) not in ("", None)]


def plot_search_curves(rows: list[dict], epochs: int, path: Path) -> Path:
    """tune_curves.png from tune_results.csv rows (best first: 'trial', 'status', 'run_dir')."""
    return _save(search_curves_figure(rows, epochs), path, dpi=100)


def _save(fig, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def search_curves_figure(rows: list[dict], epochs: int):
    """The matplotlib figure of tune_curves.png."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    best = rows[0]["trial"] if rows else None
    for row in reversed(rows):  # the best drawn last, on top
        curve = trial_curve(row.get("run_dir"))
        if not curve:
            continue
        x, y = [e for e, _ in curve], [v for _, v in curve]
        is_best = row["trial"] == best
        style = "--" if row["status"] == "ERROR" else "-"
        label = f"{row['trial']} (best)" if is_best else row["trial"]
        (line,) = ax.plot(x, y, style, linewidth=2.8 if is_best else 1.2, alpha=1.0 if is_best else 0.7, label=label)
        if row["status"] != "TERMINATED":  # stopped before the last epoch: mark where it ended
            ax.plot(x[-1], y[-1], "x", color=line.get_color(), markersize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mask mAP50-95 (val)")
    ax.set_xlim(0.5, max(epochs, 1) + 0.5)
    ax.set_title(f"{len(rows)} trials; x = stopped early, dashed = failed")
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7, loc="best")
    else:  # a legend of many trials hides the curves: name the best only
        handles, labels = ax.get_legend_handles_labels()
        ax.legend([h for h, lab in zip(handles, labels, strict=True) if "(best)" in lab], [f"{best} (best)"])
    return fig


def plot_search_params(rows: list[dict], searched: list[str], path: Path) -> Path | None:
    """tune_params.png: each searched value (x) against the trial's best mask mAP50-95 (y); None when nothing
    was searched or no trial was validated."""
    fig = search_params_figure(rows, searched)
    return _save(fig, path, dpi=90) if fig is not None else None


def search_params_figure(rows: list[dict], searched: list[str]):
    """The matplotlib figure of tune_params.png (None when there is nothing to draw)."""
    scored = [r for r in rows if _finite(r.get(METRIC))]
    if not searched or not scored:
        return None
    plt = _pyplot()
    columns = min(4, len(searched))
    lines = math.ceil(len(searched) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3.2 * lines), squeeze=False)
    best = scored[0]
    for ax, key in zip(axes.ravel(), searched, strict=False):
        points = [(r.get(key), float(r[METRIC])) for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v, _ in points)
        if numeric:
            xs = [float(v) for v, _ in points]
        else:  # a choice: one slot per value
            choices = sorted({str(v) for v, _ in points})
            xs = [choices.index(str(v)) for v, _ in points]
            ax.set_xticks(range(len(choices)), choices)
        ax.scatter(xs, [y for _, y in points], s=18, alpha=0.8)
        best_x = xs[scored.index(best)]
        ax.scatter([best_x], [float(best[METRIC])], s=90, marker="*", color="red", label=f"best {best['trial']}")
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("best mask mAP50-95")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(searched) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    return fig


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
