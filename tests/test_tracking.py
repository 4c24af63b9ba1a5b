"""MLflow tracking: URIs, the never-fatal write queue, and a training whose tracking server goes away mid-run."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
from conftest import tiny_config

from pyseg.distributed.tracking import (
    MlflowHook,
    MlflowRun,
    TrackingConfig,
    TrackingWarning,
    numeric_metrics,
    resolve_tracking_uri,
)
from pyseg.engine.trainer import Hook, Trainer, default_hooks

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_tracking_uri_defaults_to_sqlite_under_the_project(tmp_path, monkeypatch):
    assert resolve_tracking_uri("", tmp_path / "runs") == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("", "runs") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://h:1", "runs") == "http://h:1"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("store.db", "runs") == f"sqlite:///{tmp_path.resolve()}/store.db"


def test_numeric_metrics_keeps_numbers_and_drops_the_epoch():
    row = {"epoch": 3, "train/box": 0.5, "mask/map": "0.25", "note": "x", "flag": True}
    assert numeric_metrics(row) == {"train/box": 0.5, "mask/map": 0.25}
    assert list(numeric_metrics(row)) == ["mask/map", "train/box"]  # the metric MLflow's compare page charts


def test_failed_writes_warn_once_stay_queued_and_are_sent_in_order_later(tmp_path):
    store = tmp_path / "later"
    store.write_text("a file where the store's folder should be: every write fails until it is removed")
    run = MlflowRun(f"sqlite:///{store / 'mlflow.db'}", "queue-test")
    run.start("r", {"k": "v"})
    run.log_params({"lr0": 0.01})
    with pytest.warns(TrackingWarning, match="Training goes on") as caught:
        assert not run.flush()
        for step in (1, 2):
            run.log_metrics({"loss": 1.0 / step}, step=step)
            assert not run.flush()
    assert sum(issubclass(w.category, TrackingWarning) for w in caught) == 1 and len(run.pending) == 4
    store.unlink()
    store.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        assert run.flush()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    data = client.get_run(run.run_id).data
    assert data.params == {"lr0": "0.01"} and data.tags["k"] == "v"
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]


class ServerOutage(Hook):
    """Stops the tracking server after epoch 1 and starts it again after epoch 2."""

    def __init__(self, server):
        self.server = server

    def on_epoch_end(self, trainer, row):
        if row["epoch"] == 1:
            self.server.stop()
        elif row["epoch"] == 2:
            self.server.start()


@pytest.mark.slow
def test_training_outlives_a_stopped_tracking_server_and_logs_everything_once_it_is_back(
    tiny_data, tmp_path, mlflow_server
):
    cfg = tiny_config(tiny_data, tmp_path, epochs=3)
    tracking = TrackingConfig(uri=mlflow_server.uri, experiment="outage", tags={"purpose": "test"})
    hook = MlflowHook(tracking)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = Trainer(cfg, default_hooks() + [ServerOutage(mlflow_server), hook], show_progress=False).fit()
    tracking_warnings = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking_warnings) == 1, [str(w.message) for w in tracking_warnings]
    with open(run_dir / "results.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]

    client = mlflow.tracking.MlflowClient(mlflow_server.uri)
    run = client.get_run(hook.run.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["purpose"] == "test"
    assert run.data.params["imgsz"] == "64" and run.data.params["epochs"] == "3"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/box")]
    assert steps == [1, 2, 3]  # epoch 2 was queued while the server was down
    assert len(client.get_metric_history(run.info.run_id, "mask/map")) == 3
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id)}
    assert {"results.csv", "results.png", "args.yaml"} <= artifacts


@pytest.mark.slow
def test_the_experiment_opens_as_model_training_in_the_mlflow_ui(tmp_path):
    """Without mlflow.experimentKind, MLflow 3's UI shows the experiment as GenAI (traces, "No data available")."""
    from mlflow import MlflowClient

    from pyseg.distributed.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowRun(uri, "new-experiment")
    run.start("r", {})
    assert run.flush()
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("new-experiment").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.create_experiment("made-elsewhere")  # by hand or an older pyseg: tagged when pyseg first logs to it
    later = MlflowRun(uri, "made-elsewhere")
    later.start("r", {})
    assert later.flush()
    assert client.get_experiment_by_name("made-elsewhere").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
