"""MLflow under load: eight trials at once write to the default SQLite store, and nothing they log is lost."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import tiny_config

from pyseg.distributed.search import run_tune
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import load_search_space
from pyseg.distributed.tracking import TrackingConfig, numeric_metrics, resolve_tracking_uri


@pytest.mark.slow
def test_eight_trials_at_once_log_every_epoch_of_results_csv_to_one_sqlite_store(tiny_data, tmp_path, local_ray):
    # Eight trial drivers write to one SQLite file at the same moments (each epoch ends at about the same time in
    # trials of one size); SQLite lets one writer in at a time. Every metric of every epoch must arrive.
    space_path = tmp_path / "space.yaml"
    space_path.write_text("optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
    base = tiny_config(tiny_data, tmp_path, epochs=2, name="unused", imgsz=32)
    settings = TuneSettings(
        samples=8, scheduler="none", name="load", max_concurrent=8, cpus_per_worker=0.25, progress_every_s=0,
        time_budget=900,
    )  # fmt: skip
    summary = run_tune(base, load_search_space(space_path), settings, TrackingConfig(experiment="load"))
    assert len(summary.rows) == 8 and summary.unfinished == 0

    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri("", base.project)
    assert uri.endswith(f"{Path(base.project).name}/mlflow.db")  # the default store, not a server
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id])
    children = {r.data.tags["pyseg.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == sorted(row["trial"] for row in summary.rows)
    # they wrote at the same time: every run had started before the first one ended
    first_end = min(r.info.end_time for r in children.values())
    assert all(r.info.start_time < first_end for r in children.values())
    points = 0
    for row in summary.rows:
        with open(Path(row["run_dir"]) / "results.csv", newline="") as f:
            epochs = list(csv.DictReader(f))
        assert len(epochs) == 2
        run = children[row["trial"]]
        assert run.info.status == "FINISHED"
        expected: dict[str, dict[int, float]] = {}
        for epoch in epochs:
            for key, value in numeric_metrics(epoch).items():
                expected.setdefault(key, {})[int(epoch["epoch"])] = value
        for key, by_epoch in expected.items():
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert logged == pytest.approx(by_epoch, nan_ok=True), (row["trial"], key)
            points += len(logged)
    assert points >= 8 * 2 * 10  # every trial, every epoch, the losses and the box and mask metrics
