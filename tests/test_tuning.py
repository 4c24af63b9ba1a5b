"""Search spaces, and a real Ray Tune search (3 trials x 2 epochs, ASHA) logged to a real MLflow server."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from pyseg import tune as tune_cli
from pyseg.config import config_from_args, make_config
from pyseg.tracking import TrackingConfig
from pyseg.train import parse_args as train_args
from pyseg.tuning import (
    METRIC,
    SearchSpaceError,
    TuneSettings,
    TuneSummary,
    format_table,
    load_search_space,
    run_tune,
    to_tune_space,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def write_space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_covers_the_documented_keys_and_samples_valid_configs():
    space = load_search_space(REPO / "tune" / "default.yaml")
    expected = {"lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "box", "cls", "dfl", "mask"}
    expected |= {"hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "fliplr", "mosaic"}
    expected |= {"mixup", "copy_paste"}
    assert expected <= set(space)
    assert space["lr0"][0] == "loguniform"
    domains = to_tune_space(space)
    for _ in range(5):
        sample = {k: (v.sample() if hasattr(v, "sample") else v) for k, v in domains.items()}
        cfg = make_config(sample)
        assert 1e-4 <= cfg.lr0 <= 1e-2 and 0.0 <= cfg.mosaic <= 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: {uniform: [0.1, 0.2]}\n", "key 'lr': not a training config key"),
        ("lr0: {normal: [0.1, 0.2]}\n", "key 'lr0': give a fixed value or exactly one of"),
        ("lr0: {uniform: [0.2, 0.1]}\n", "key 'lr0': uniform needs low < high"),
        ("lr0: {loguniform: [0.0, 0.1]}\n", "key 'lr0': loguniform needs low > 0"),
        ("lr0: {uniform: [0.1]}\n", "key 'lr0': uniform takes 2 numbers"),
        ("epochs: {randint: [1, 5]}\n", "key 'epochs': describes the run"),
        ("close_mosaic: {uniform: [1.5, 3.5]}\n", "key 'close_mosaic': close_mosaic must be a int"),
        ("cos_lr: {choice: [true, maybe]}\n", "key 'cos_lr': cos_lr must be true or false"),
        ("- lr0\n", "must map TrainConfig keys"),
        ("lr0: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_search_spaces_name_the_key(tmp_path, text, message):
    with pytest.raises(SearchSpaceError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_search_space(write_space(tmp_path, text))


def test_tune_cli_reports_a_bad_space_without_starting_ray(tmp_path, capsys):
    space = write_space(tmp_path, "lr0: {uniform: [1, 0]}\n")
    assert tune_cli.main(["--space", str(space), "--project", str(tmp_path / "runs")]) == 2
    assert "uniform needs low < high" in capsys.readouterr().err


@pytest.mark.parametrize("extra, added", [([], ["--name", "tune", "--resume"]), (["--name", "a", "--resume"], [])])
def test_tune_cli_says_how_to_continue_an_unfinished_search(tmp_path, capsys, monkeypatch, extra, added):
    import shlex

    import pyseg.tuning

    def interrupted_search(base, space, settings, tracking):
        return TuneSummary(tmp_path, tmp_path / "t.csv", tmp_path / "best.yaml", None, "t0", 0.1, [], unfinished=2)

    monkeypatch.setattr(pyseg.tuning, "run_tune", interrupted_search)
    given = ["--samples", "3", "--project", str(tmp_path / "runs"), "--no-mlflow", *extra]
    assert tune_cli.main(given) == 0
    out = capsys.readouterr().out
    assert "2 of 3 trials did not finish" in out
    assert out.rstrip().endswith("python -m pyseg.tune " + shlex.join(given + added))


def test_format_table_aligns_columns_and_marks_missing_values():
    text = format_table([{"a": 1.23456789, "b": None}, {"a": float("nan"), "b": "x"}], ["a", "b"])
    assert text.splitlines() == ["a      b", "1.235  -", "-      x"]


@pytest.mark.slow
def test_three_trial_asha_search_gives_each_trial_its_hyperparameters_and_logs_to_mlflow(
    tiny_data, tmp_path, local_ray, mlflow_server
):
    space_path = write_space(
        tmp_path, "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\nmosaic: {uniform: [0.0, 1.0]}\n"
    )
    space = load_search_space(space_path)
    base = tiny_config(tiny_data, tmp_path, epochs=2, name="unused")
    # The time budget only guards CI against a stuck trial: the search takes about 80 s here.
    settings = TuneSettings(
        samples=3, scheduler="asha", name="search", max_concurrent=2, progress_every_s=0, time_budget=400
    )
    tracking = TrackingConfig(uri=mlflow_server.uri, experiment="tune-test")
    summary = run_tune(base, space, settings, tracking)

    # Every trial ran with its own sampled values: what it trained with (args.yaml) is what Tune sampled.
    assert len(summary.rows) == 3 and summary.unfinished == 0
    assert all(row["status"] == ("TERMINATED" if row["epochs"] == 2 else "STOPPED") for row in summary.rows)
    trained = {}
    for row in summary.rows:
        args = yaml.safe_load((Path(row["run_dir"]) / "args.yaml").read_text())
        assert math.isclose(args["lr0"], row["lr0"]) and math.isclose(args["mosaic"], row["mosaic"])
        assert args["optimizer"] == "adamw" and args["epochs"] == 2
        trained[row["trial"]] = args["lr0"]
    assert len(set(trained.values())) == 3

    with open(summary.results_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == [row["trial"] for row in summary.rows]
    scores = [float(r[METRIC]) for r in table]
    assert scores == sorted(scores, reverse=True)
    # The best config is a --cfg file as it is, and the best checkpoint exists.
    best = config_from_args(train_args(["--cfg", str(summary.best_config)]))
    assert best.lr0 == pytest.approx(trained[summary.best_trial]) and best.epochs == 2
    assert summary.best_checkpoint is not None and summary.best_checkpoint.is_file()

    # MLflow: one parent run, one child per trial with its params, per-epoch metrics and artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.data.tags["pyseg.best_trial"] == summary.best_trial
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id)} >= {"tune_results.csv", "best.yaml"}
    for child in children:
        trial = child.data.tags["pyseg.trial_id"]
        assert float(child.data.params["lr0"]) == pytest.approx(trained[trial])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, METRIC)]
        assert steps[0] == 1 and steps == sorted(steps) and len(steps) >= 1
        # a trial ASHA stopped early is closed as KILLED, never left RUNNING
        assert child.info.status == ("FINISHED" if len(steps) == 2 else "KILLED"), (trial, steps)
        artifacts = {Path(a.path).name for a in client.list_artifacts(child.info.run_id)}
        assert {"results.csv", "args.yaml"} <= artifacts
        if trial == summary.best_trial:
            assert [Path(a.path).name for a in client.list_artifacts(child.info.run_id, "weights")] == ["best.pt"]

    # --resume of a finished experiment keeps every trial and reruns none.
    stamps = {row["trial"]: (Path(row["run_dir"]) / "results.csv").stat().st_mtime_ns for row in summary.rows}
    again = run_tune(base, space, TuneSettings(samples=3, name="search", resume=True), TrackingConfig(enabled=False))
    assert {row["trial"] for row in again.rows} == set(stamps)
    assert all((Path(r["run_dir"]) / "results.csv").stat().st_mtime_ns == stamps[r["trial"]] for r in again.rows)


def test_an_existing_experiment_needs_resume_or_a_new_name(tiny_data, tmp_path):
    base = tiny_config(tiny_data, tmp_path)
    (Path(base.project) / "taken").mkdir(parents=True)
    space = {"lr0": ("uniform", [0.001, 0.01])}
    with pytest.raises(FileExistsError, match="--resume"):
        run_tune(base, space, TuneSettings(name="taken"), TrackingConfig(enabled=False))
    with pytest.raises(FileNotFoundError, match="no Tune experiment to continue"):
        run_tune(base, space, TuneSettings(name="missing", resume=True), TrackingConfig(enabled=False))


def test_optuna_search_is_used_when_installed_and_named_when_missing():
    from pyseg.tuning import _search_algorithm

    assert _search_algorithm(TuneSettings(search="random")) is None
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install optuna"):
            _search_algorithm(TuneSettings(search="optuna"))
    else:
        from ray.tune.search.optuna import OptunaSearch

        assert isinstance(_search_algorithm(TuneSettings(search="optuna")), OptunaSearch)
    with pytest.raises(ValueError, match="--search must be random or optuna"):
        TuneSettings(search="grid")
