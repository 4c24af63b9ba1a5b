"""pyseg.engine.search_plots: tune_curves.png and tune_params.png of a finished search."""

from __future__ import annotations

import csv

from pyseg.engine.search_plots import (
    plot_search_curves,
    plot_search_params,
    search_curves_figure,
    search_params_figure,
    trial_curve,
)


def write_trial(folder, maps: list[float | None]):
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "train/box", "mask/map"])
        writer.writeheader()
        for epoch, value in enumerate(maps, 1):
            writer.writerow({"epoch": epoch, "train/box": 1.0, "mask/map": "" if value is None else value})
    return str(folder)


def search_rows(tmp_path) -> list[dict]:
    """Three trials, best first as tune_results.csv: a finished one, one ASHA stopped, one that failed."""
    return [
        {
            "trial": "a_00001",
            "status": "TERMINATED",
            "mask/map": 0.3,
            "lr0": 0.01,
            "optimizer": "sgd",
            "run_dir": write_trial(tmp_path / "a_00001", [0.1, 0.2, 0.3]),
        },
        {
            "trial": "a_00000",
            "status": "STOPPED",
            "mask/map": 0.05,
            "lr0": 0.0001,
            "optimizer": "adamw",
            "run_dir": write_trial(tmp_path / "a_00000", [0.05]),
        },
        {
            "trial": "a_00002",
            "status": "ERROR",
            "mask/map": 0.02,
            "lr0": 0.001,
            "optimizer": "sgd",
            "run_dir": write_trial(tmp_path / "a_00002", [None, 0.02]),
        },
    ]


def test_curves_show_every_trial_per_epoch_with_the_best_named(tmp_path):
    rows = search_rows(tmp_path)
    assert trial_curve(rows[2]["run_dir"]) == [(2, 0.02)]  # unvalidated epochs are not points
    figure = search_curves_figure(rows, epochs=3)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "epoch" and "mask mAP50-95" in ax.get_ylabel()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert sorted(labels) == ["a_00000", "a_00001 (best)", "a_00002"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["a_00001 (best)"].get_ydata()) == [0.1, 0.2, 0.3]
    assert lines["a_00001 (best)"].get_linewidth() > lines["a_00000"].get_linewidth()
    assert lines["a_00002"].get_linestyle() == "--"  # failed
    stop_marks = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(stop_marks) == 2  # the stopped and the failed trial end in an x
    assert plot_search_curves(rows, 3, tmp_path / "tune_curves.png").stat().st_size > 1000


def test_params_plot_each_searched_value_against_the_metric(tmp_path):
    rows = search_rows(tmp_path)
    figure = search_params_figure(rows, ["lr0", "optimizer"])
    lr_axis, optimizer_axis = figure.axes[:2]
    assert lr_axis.get_xlabel() == "lr0" and lr_axis.get_xscale() == "log"  # 1e-4 .. 1e-2 spans 100x
    assert optimizer_axis.get_xlabel() == "optimizer"
    assert [t.get_text() for t in optimizer_axis.get_xticklabels()] == ["adamw", "sgd"]
    assert "best a_00001" in [t.get_text() for t in lr_axis.get_legend().get_texts()]
    assert search_params_figure(rows, []) is None
    assert plot_search_params(rows, ["lr0"], tmp_path / "tune_params.png").stat().st_size > 1000
