"""Search spaces, and a real Ray Tune search (3 trials x 2 epochs, ASHA) logged to a real MLflow server."""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import RayHead, free_port, kill_process_group, python_env, tiny_config

from pyseg import tune as tune_cli
from pyseg.config import config_from_args, make_config
from pyseg.distributed.search import METRIC, run_tune
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import SearchSpaceError, check_search_space, load_search_space, to_tune_space
from pyseg.distributed.search_state import SearchRecordError
from pyseg.distributed.tracking import TrackingConfig
from pyseg.errors import ConfigError
from pyseg.train import parse_args as train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def write_space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_full_space_covers_the_documented_keys_and_samples_valid_configs():
    space = load_search_space(REPO / "tune" / "full.yaml")
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


def test_the_default_space_is_the_full_spaces_first_six_with_the_same_ranges():
    """tune/full.yaml is ordered by measured importance (its comments' [share]); tune/default.yaml keeps the top."""
    full, default = load_search_space(REPO / "tune" / "full.yaml"), load_search_space(REPO / "tune" / "default.yaml")
    assert list(default) == list(full)[:6] and all(default[key] == full[key] for key in default)
    shares = [float(share) for share in re.findall(r"#\s*\[(\d\.\d+)\]", (REPO / "tune" / "full.yaml").read_text())]
    assert len(shares) == len(full) == 20 and shares == sorted(shares, reverse=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: {uniform: [0.1, 0.2]}\n", "key 'lr': not a training config key"),
        ("lr0: {normal: [0.1, 0.2]}\n", "key 'lr0': give a fixed value or exactly one of"),
        ("lr0: {uniform: [0.2, 0.1]}\n", r"key 'lr0': uniform needs low < high"),
        ("lr0: {loguniform: [0.0, 0.1]}\n", "key 'lr0': loguniform needs low > 0"),
        ("lr0: {uniform: [0.1]}\n", "key 'lr0': uniform takes 2 numbers"),
        ("epochs: {randint: [1, 5]}\n", "key 'epochs': describes the run"),
        (
            "close_mosaic: {uniform: [1.5, 3.5]}\n",
            "key 'close_mosaic': uniform low 1.5 is not a valid training value: .*close.mosaic must be a int",
        ),
        ("cos_lr: {choice: [true, maybe]}\n", "key 'cos_lr': choice 'maybe' is not a valid .*cos.lr must be true or"),
        ("- lr0\n", "must hold a mapping of keys to values"),
        ("lr0: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_search_spaces_name_the_key(tmp_path, text, message):
    with pytest.raises(SearchSpaceError, match=message):
        load_search_space(write_space(tmp_path, text))


@pytest.mark.parametrize(
    "text, bound",
    [
        ("mosaic: {uniform: [0, 2]}\n", "key 'mosaic': uniform high 2 "),
        ("lr0: {uniform: [-0.1, 0.1]}\n", "key 'lr0': uniform low -0.1 "),
        ("imgsz: {choice: [64, 100]}\n", "key 'imgsz': choice 100 "),
        ("batch: {randint: [0, 8]}\n", "key 'batch': randint low 0 "),
        ("fliplr: 1.5\n", "key 'fliplr': value 1.5 "),
    ],
)
def test_a_space_that_allows_an_invalid_value_fails_before_any_trial(tmp_path, monkeypatch, capsys, text, bound):
    import pyseg.distributed.search

    def no_ray(*args, **kwargs):
        pytest.fail("Ray must not start for a search space with an invalid value")

    monkeypatch.setattr(pyseg.distributed.search, "init_ray", no_ray)
    path = write_space(tmp_path, text)
    with pytest.raises(SearchSpaceError, match=f"search space {re.escape(str(path))}, {re.escape(bound)}"):
        load_search_space(path)
    assert tune_cli.main(["--space", str(path), "--project", str(tmp_path / "runs"), "--no-mlflow"]) == 2
    assert f"search space {path}, {bound}" in capsys.readouterr().err
    # A space given as a dict (not read by load_search_space) is checked by run_tune against its base.
    key, entry = next(iter(yaml.safe_load(text).items()))
    kind, args = next(iter(entry.items())) if isinstance(entry, dict) else ("fixed", entry)
    with pytest.raises(SearchSpaceError, match=re.escape(bound)):
        run_tune(make_config({}), {key: (kind, args)}, TuneSettings(name="bad"), TrackingConfig(enabled=False))
    assert not (tmp_path / "runs").exists()


def test_space_extremes_are_checked_on_top_of_the_base_config():
    space = {"lr0": ("loguniform", [1e-4, 1e-2]), "mosaic": ("quniform", [0.0, 1.0, 0.25])}
    check_search_space(space, make_config({"epochs": 3}))  # valid: no error
    with pytest.raises(SearchSpaceError, match="key 'close_mosaic': randint low 1.5"):
        check_search_space({"close_mosaic": ("randint", [1.5, 4])}, make_config({}))


def test_tune_cli_reports_a_bad_space_without_starting_ray(tmp_path, capsys):
    space = write_space(tmp_path, "lr0: {uniform: [1, 0]}\n")
    assert tune_cli.main(["--space", str(space), "--project", str(tmp_path / "runs")]) == 2
    assert "uniform needs low < high" in capsys.readouterr().err


def test_format_table_aligns_columns_and_marks_missing_values():
    from pyseg.distributed.search_view import format_table

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
    parent_artifacts = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id)}
    assert parent_artifacts >= {"tune_results.csv", "best.yaml", "tune_curves.png", "tune_params.png"}
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
    (Path(base.project) / "taken" / "tune_results.csv").write_text("trial\n")  # an empty folder is no experiment
    space = {"lr0": ("uniform", [0.001, 0.01])}
    with pytest.raises(ConfigError, match="--resume"):
        run_tune(base, space, TuneSettings(name="taken"), TrackingConfig(enabled=False))
    with pytest.raises(SearchRecordError, match="no search to continue"):
        run_tune(base, space, TuneSettings(name="missing", resume=True), TrackingConfig(enabled=False))


def test_both_searches_are_seeded_and_run_at_most_max_concurrent_trials():
    """Tune ignores max_concurrent_trials once a search algorithm is given (it started all 16 trial drivers of a
    search at once, 578 MB each): each search limits itself. TPE models the results after a quarter of the trials
    (its default of 10 random ones would make a short search all random), and a seed repeats the same suggestions."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from pyseg.distributed.search import _search_algorithm, tpe_startup_trials
    from pyseg.distributed.search_space import to_tune_space

    random_search = _search_algorithm(TuneSettings(search="random", seed=3), max_concurrent=2)
    assert isinstance(random_search, BasicVariantGenerator) and random_search.max_concurrent == 2
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    tpe = _search_algorithm(TuneSettings(search="optuna", samples=16, seed=3), max_concurrent=2)
    assert isinstance(tpe, ConcurrencyLimiter) and tpe.max_concurrent == 2 and isinstance(tpe.searcher, OptunaSearch)
    assert tpe.searcher._sampler._n_startup_trials == tpe_startup_trials(16) == 4
    assert [tpe_startup_trials(n) for n in (4, 8, 40, 400)] == [2, 2, 10, 10]

    def suggestions(seed: int) -> list[dict]:
        search = _search_algorithm(TuneSettings(search="optuna", samples=16, seed=seed), max_concurrent=2)
        search.set_search_properties(METRIC, "max", to_tune_space({"lr0": ("loguniform", [1e-4, 1e-2])}))
        return [search.suggest(f"trial{i}") for i in range(2)]

    assert suggestions(3) == suggestions(3) != suggestions(4)


def test_a_trial_of_one_worker_trains_in_its_own_process_holding_the_workers_resources():
    from pyseg.distributed.search import TRIAL_DRIVER_MEMORY, trains_in_trial_process, trial_resources
    from pyseg.distributed.trial_process import TuneReportHook

    one = TuneSettings(cpus_per_worker=2, gpus_per_trial=0.25)
    assert trains_in_trial_process(one)
    assert trial_resources(one) == {"cpu": 2, "gpu": 0.25, "memory": TRIAL_DRIVER_MEMORY}
    # several workers: the trial only drives its TorchTrainer, whose workers hold the CPUs and GPUs
    two = TuneSettings(workers_per_trial=2, cpus_per_worker=2, gpus_per_trial=1)
    assert not trains_in_trial_process(two) and trial_resources(two) == {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}
    baseline = TuneSettings(gpus_per_trial=0, torch_trainer_per_trial=True)  # bench_scaling's baseline
    assert not trains_in_trial_process(baseline) and trial_resources(baseline)["cpu"] == 0
    # PBT's interval 2 over 5 epochs: epochs 2, 4 and the last carry a checkpoint to Tune; without PBT none does
    due = TuneReportHook(checkpoint_every=2, epochs=5)
    assert [epoch for epoch in range(1, 6) if due.wants_checkpoint(None, epoch)] == [2, 4, 5]
    assert not any(TuneReportHook(0, 5).wants_checkpoint(None, epoch) for epoch in range(1, 6))


def test_a_trials_best_epoch_comes_from_its_results_csv_rows():
    # Tune's per-trial log files are off: the summary ranks each trial by its own results.csv
    from pyseg.distributed.search_results import best_epoch

    rows = [
        {"epoch": "1", METRIC: "0.10", "mask/map50": "0.2"},
        {"epoch": "2", METRIC: "nan", "mask/map50": ""},  # an epoch without a usable score
        {"epoch": "3", METRIC: "0.30", "mask/map50": "0.5"},
        {"epoch": "4", METRIC: "0.30", "mask/map50": "0.6"},  # equal: the first one stays best
    ]
    best = best_epoch(rows)
    assert best["epoch"] == 3 and isinstance(best["epoch"], int) and best[METRIC] == 0.3 and best["mask/map50"] == 0.5
    assert best_epoch([]) == {} and best_epoch([{"epoch": "1", METRIC: ""}]) == {}


def test_a_missing_optuna_is_named_with_what_to_do(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ValueError, match="pip install optuna"):
        TuneSettings(search="optuna")
    with pytest.raises(ValueError, match="--search must be one of optuna, random"):
        TuneSettings(search="grid")


# ------------------------------------------------------------------ pyseg.tune as a command, with its own Ray


def tune_command(tiny_data, project: Path, space: Path, *extra: str) -> list[str]:
    """python -m pyseg.tune flags for a tiny CPU search (64 px, batch 4, one thread per trial, no MLflow)."""
    args = ["--data", str(tiny_data), "--space", str(space), "--imgsz", "64", "--batch", "4", "--workers", "0"]
    args += ["--device", "cpu", "--threads", "1", "--close-mosaic", "1", "--warmup-epochs", "0.5"]
    return args + ["--project", str(project), "--no-mlflow", "--scheduler", "none", *extra]


def command_env(tmp_path: Path, short_tmp: Path) -> dict[str, str]:
    """The environment of a pyseg.tune subprocess: TMPDIR (Ray's session, the workers' temp files) in short_tmp,
    no RAY_ADDRESS, the dataset cache in tmp_path."""
    return python_env(
        TMPDIR=str(short_tmp),
        RAY_TMPDIR=None,
        RAY_ADDRESS=None,
        MLFLOW_TRACKING_URI=None,
        PYSEG_CACHE_DIR=str(tmp_path / "cache"),
    )


def start_tune_process(args: list[str], env: dict[str, str], output) -> subprocess.Popen:
    """python -m pyseg.tune args in its own process group (so that everything it starts can be ended with it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pyseg.tune", *args],
        stdout=output,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


def run_tune_command(args: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, str]:
    """Runs python -m pyseg.tune args in its own process group, ended with all it started; (exit code, output)."""
    with open(log, "w") as output:
        process = start_tune_process(args, env, output)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_process_group(process, grace_s=10)
    text = log.read_text()
    assert code is not None, f"python -m pyseg.tune did not finish within {timeout} s:\n{text[-4000:]}"
    return code, text


def test_an_unreachable_address_is_a_user_error_naming_it(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a module fixture's Ray may be up in this process
    dead = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    args = ["--space", str(write_space(tmp_path, "lr0: 0.01\n")), "--project", str(tmp_path / "runs")]
    assert tune_cli.main([*args, "--no-mlflow", "--address", dead]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray cluster at {dead} (--address)" in err and "ray start --head" in err
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_tune_starts_its_own_ray_when_a_killed_head_left_its_address_behind(tiny_data, tmp_path, short_tmp):
    """A head started as `ray start --head` (no --temp-dir) records its address in $TMPDIR/ray/ray_current_cluster
    (/tmp/ray/... without TMPDIR); killed, it leaves the record behind, and ray.init(address=None) then waited for
    the dead head forever (make test, then make run, hung). The search run past it also checks --epoch-budget
    (a search of its own costs a minute here): it stops the whole search once its trials trained that many
    epochs; the trials it kept from running are named with the command that runs them, and the exit code is 0
    (not Ctrl-C's 130)."""
    env = command_env(tmp_path, short_tmp)
    record = short_tmp / "ray" / "ray_current_cluster"
    head = RayHead(tmp_path / "head.log", env, num_cpus=1)
    try:
        head.wait_until_up()
        recorded = record.read_text().strip()  # host:port (Ray writes the node's IP for 127.0.0.1)
        assert recorded.endswith(f":{head.port}")
    finally:
        head.kill()
    assert record.read_text().strip() == recorded, "the killed head's record must stay for this test"

    space = write_space(tmp_path, "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
    args = tune_command(tiny_data, tmp_path / "runs", space, "--samples", "3", "--epochs", "2")
    args += ["--max-concurrent", "1", "--epoch-budget", "2", "--name", "budget"]
    code, output = run_tune_command(args, env, tmp_path / "tune.log", timeout=300)
    assert code == 0, output[-4000:]
    assert (tmp_path / "runs" / "budget" / "best.yaml").is_file()
    assert "the epoch budget ended the search before 2 of 3 trials ran" in output, output[-3000:]
    with open(tmp_path / "runs" / "budget" / "tune_results.csv", newline="") as f:
        trained = [int(row["epochs"]) for row in csv.DictReader(f) if row["epochs"]]
    assert trained == [2], trained  # the first trial's two epochs spent the budget


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupted_search_continues_each_trial_from_its_checkpoint(tiny_data, tmp_path, short_tmp, stop):
    """Ctrl-C (SIGINT) or `kill PID` (SIGTERM) once a trial has stored its first epoch: exit 130 and the same
    continue command. After Ctrl-C that command continues the search: every trial ends at the asked epoch count
    with one results.csv row per epoch, the interrupted ones continued from their weights/last.pt, and no
    restored-checkpoint folder is left in TMPDIR."""
    env = command_env(tmp_path, short_tmp)
    project = tmp_path / "runs"
    space = write_space(tmp_path, "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
    # --verbose: the trials' own output ("resuming at epoch N ... from .../last.pt") reaches the console
    given = tune_command(tiny_data, project, space, "--samples", "2", "--epochs", "3", "--max-concurrent", "2")
    given.append("--verbose")
    trials = project / "tune" / "trials"

    with open(tmp_path / "interrupted.log", "w") as output:
        driver = start_tune_process(given, env, output)
        try:
            deadline = time.monotonic() + 300
            checkpointed = []
            while not checkpointed:  # a trial stored its epoch-1 checkpoint and results row
                assert driver.poll() is None, (tmp_path / "interrupted.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no trial reached its first checkpoint within 300 s"
                time.sleep(0.5)
                checkpointed = [
                    path.parent.name
                    for path in trials.glob("*/results.csv")
                    if (path.parent / "weights" / "last.pt").is_file() and path.read_text().count("\n") >= 2
                ]
            driver.send_signal(stop)
            code = driver.wait(timeout=180)
        finally:
            kill_process_group(driver, grace_s=10)
    output = (tmp_path / "interrupted.log").read_text()
    assert code == 130, output[-4000:]  # interrupted, trials unfinished
    for trial in checkpointed:
        with open(trials / trial / "results.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)][0] == 1

    # pyseg.tune says how to continue: the same flags plus --name tune --resume.
    assert re.search(r"pyseg.tune: interrupted with [12] of 2 trials unfinished", output), output[-4000:]
    lines = output.splitlines()  # Ray's own log lines may follow
    command = lines[next(i for i, line in enumerate(lines) if "continue the search with:" in line) + 1].strip()
    assert command.startswith("python -m pyseg.tune ")
    again = shlex.split(command.removeprefix("python -m pyseg.tune "))
    assert again == [*given, "--name", "tune", "--resume"]
    if stop == signal.SIGTERM:
        return  # the same command as after Ctrl-C: the ctrl-c case runs it (a search of its own: a minute here)

    code, resumed = run_tune_command(again, env, tmp_path / "resumed.log", timeout=300)
    assert code == 0, resumed[-4000:]
    assert resumed.count("resuming at epoch") >= len(checkpointed), resumed[-4000:]
    assert "interrupted with" not in resumed and "budget ended" not in resumed
    with open(project / "tune" / "tune_results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and all(r["status"] == "TERMINATED" and r["epochs"] == "3" for r in table), table
    for row in table:
        with open(Path(row["run_dir"]) / "results.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3], row["trial"]
    assert not list(short_tmp.glob("pyseg-restore-*")), list(short_tmp.iterdir())


@pytest.mark.slow
def test_a_search_in_a_log_is_short_and_free_of_ray_noise(tiny_data, tmp_path, short_tmp):
    """Without --verbose, a search's log holds pyseg's lines only: no worker output, no Ray-internal lines, no
    Tune configuration box or TensorBoard hint, the legend of the searched values once; Ray's trial folders are
    named by trial id; the end says what next; the local Ray's session and its processes' temporaries (pymp-*)
    are gone from the temp dir."""
    env = command_env(tmp_path, short_tmp)
    space = write_space(tmp_path, "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\nmosaic: {uniform: [0, 1]}\n")
    args = tune_command(tiny_data, tmp_path / "runs", space, "--samples", "2", "--epochs", "2", "--name", "quiet")
    code, output = run_tune_command(args, env, tmp_path / "tune.log", timeout=300)
    assert code == 0, output[-4000:]
    for noise in (
        "core_worker.cc",
        "PreemptionWatcher",
        "RayTrainWorker",
        "TrainController",
        "TensorBoard",
        "Configuration for experiment",
        "Token authentication",
        "train/box=",
    ):
        assert noise not in output, noise
    lines = output.splitlines()
    assert len(lines) <= 40, output
    assert output.count("searched: lr0, mos = mosaic") == 1 and "rank  trial" in output
    assert {path.name for path in short_tmp.iterdir()} <= {"torchinductor_root"}  # torch's compile cache stays
    assert "next:" in output and "python -m pyseg.train --cfg" in output
    experiment = tmp_path / "runs" / "quiet"
    trial_ids = {path.name for path in (experiment / "trials").iterdir()}
    ray_folders = {path.name for path in experiment.iterdir() if path.is_dir() and path.name != "trials"}
    assert len(trial_ids) == 2 and ray_folders == trial_ids, (ray_folders, trial_ids)
    pictures = {"tune_curves.png", "tune_params.png", "best_val_predictions.jpg"}
    assert pictures <= {path.name for path in experiment.iterdir()} and "pictures: " in output


# A driver that starts more actors than Ray expects for 1 CPU (4x 1, past the 8 IO workers Ray leaves out), so the
# raylet sends its worker-pool warning; with "drop" pyseg's quiet mode is on before ray.init.
WORKER_POOL_SCRIPT = """
import sys, time, ray
if sys.argv[1] == "drop":
    from pyseg.distributed.ray_train import drop_worker_pool_warnings
    drop_worker_pool_warnings()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[2])

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

actors = [Idle.remote() for _ in range(14)]
ray.get([actor.ping.remote() for actor in actors])
time.sleep(3)
print("actors up", flush=True)
ray.shutdown()
"""


@pytest.mark.slow
def test_quiet_mode_drops_the_raylets_worker_pool_warning(tmp_path, short_tmp):
    """The raylet's "N PYTHON worker processes have been started" line (in its log: it was sent) reaches a plain
    driver; pyseg's quiet mode keeps it out of the search's output."""
    from pyseg.distributed.ray_train import WORKER_POOL_WARNING

    done = subprocess.run(
        [sys.executable, "-c", WORKER_POOL_SCRIPT, "drop", str(short_tmp / "drop")],
        env=python_env(TMPDIR=str(short_tmp), RAY_ADDRESS=None, PYTHONPATH=str(Path(__file__).parents[1])),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and "actors up" in done.stdout, done.stdout + done.stderr
    raylet_logs = "".join(path.read_text() for path in (short_tmp / "drop").glob("session_*/logs/raylet.out"))
    assert WORKER_POOL_WARNING in raylet_logs, raylet_logs[-3000:]
    assert WORKER_POOL_WARNING not in done.stdout + done.stderr, done.stdout + done.stderr


def test_next_steps_name_the_best_config_the_mlflow_page_and_the_best_weights(tmp_path):
    from types import SimpleNamespace

    from pyseg.tune import next_steps

    summary = SimpleNamespace(
        best_config=tmp_path / "best.yaml",
        best_checkpoint=tmp_path / "best.pt",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        mlflow_experiment_id="7",
    )
    text = next_steps(summary, epochs=10)
    assert f"python -m pyseg.train --cfg {tmp_path / 'best.yaml'} --epochs 30" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in text  # not the GenAI page
    assert f"python -m pyseg.predict --weights {tmp_path / 'best.pt'} --source IMAGES" in text
    on_val = next_steps(summary, epochs=10, images=tmp_path / "images" / "val")
    assert f"--weights {tmp_path / 'best.pt'} --source {tmp_path / 'images' / 'val'}" in on_val
    served = next_steps(SimpleNamespace(**{**vars(summary), "tracking_uri": "http://mlflow:5000"}), epochs=10)
    assert "open http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning" in served
    assert "mlflow ui" not in served


def test_a_trial_that_cannot_fit_the_local_ray_is_one_line_naming_tunes_flags(monkeypatch):
    import ray

    from pyseg.distributed.search import default_concurrency
    from pyseg.errors import ConfigError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # a machine without GPUs
    with pytest.raises(ConfigError, match=r"needs 0.5 GPUs .*--gpus-per-trial.* leave out --gpus-per-trial"):
        default_concurrency(TuneSettings(gpus_per_trial=0.5))
    with pytest.raises(ConfigError, match=r"needs 3 CPUs .*lower --workers-per-trial or --cpus-per-worker"):
        default_concurrency(TuneSettings(workers_per_trial=3))
    assert default_concurrency(TuneSettings(cpus_per_worker=0.5)) == 4


def plant_payloads(folder: Path, marker: Path) -> list[Path]:
    """A pickle that runs `touch marker` when loaded, in every file Ray Tune reads to restore a search in folder
    (its pickles, its experiment state with a cloudpickled field, its trial folders' pickles), and in new ones
    named as Ray names its newest state. Returns the files written."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    blob = pickle.dumps(Payload())
    state = json_state = {"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}
    experiment_state = {"trial_data": [[json.dumps({"config": json_state}), "{}"]], "runner_data": state}
    planted = []
    targets = [p for p in folder.rglob("*") if p.is_file() and "trials" not in p.relative_to(folder).parts]
    names = ["tuner.pkl", "trainable.pkl", "searcher-state-9999-12-31_23-59-59.pkl", "basic-variant-state-9999.json"]
    names += ["search_gen_state-9999-12-31_23-59-59.json"]
    targets += [folder / name for name in names] + [folder / "experiment_state-9999-12-31_23-59-59.json"]
    tune_trials = [trial for trial in folder.iterdir() if trial.is_dir() and trial.name != "trials"]
    targets += [trial / name for trial in tune_trials for name in ("error.pkl", "params.pkl")]
    for path in targets:
        if path.suffix == ".json" and path.name != "search.json":
            path.write_text(json.dumps(experiment_state))
        elif path.suffix == ".pkl":
            path.write_bytes(blob)
        else:
            continue
        planted.append(path)
    return planted


@pytest.mark.slow
def test_a_resumed_search_runs_no_code_from_its_folder_and_resumes_where_it_was_moved(tiny_data, tmp_path, short_tmp):
    """Both trials die after their first epoch (no restarts): the search ends with them failed. Its folder is moved
    to another project and a pickle that runs code is planted in every file Ray would read to restore it. --resume
    continues both failed trials from their last.pt in the moved folder to the end, and the payload never runs."""
    env = command_env(tmp_path, short_tmp)
    space = write_space(tmp_path, "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
    first = tmp_path / "first"
    given = tune_command(tiny_data, first, space, "--samples", "2", "--epochs", "2", "--max-concurrent", "2")
    given += ["--max-failures", "0", "--name", "moved"]
    code, output = run_tune_command(
        given, {**env, "PYSEG_TEST_KILL_AT": "epoch-end:1"}, tmp_path / "first.log", timeout=300
    )
    assert "2 of 2 trials failed" in output, output[-4000:]
    record = json.loads((first / "moved" / "search.json").read_text())
    assert [trial["status"] for trial in record["trials"].values()] == ["failed", "failed"], record

    project = tmp_path / "elsewhere"
    project.mkdir()
    shutil.move(first / "moved", project / "moved")
    marker = tmp_path / "MARK"
    planted = plant_payloads(project / "moved", marker)
    assert {p.name for p in planted} >= {"tuner.pkl", "experiment_state-9999-12-31_23-59-59.json"}

    again = tune_command(tiny_data, project, space, "--name", "moved", "--resume")
    code, resumed = run_tune_command(again, env, tmp_path / "resumed.log", timeout=300)
    assert code == 0, resumed[-4000:]
    assert not marker.exists(), "a pickle in the search folder ran"
    assert "0 trials kept, 2 continue from their checkpoints, 0 new" in resumed, resumed[-4000:]
    for trial in record["trials"]:
        with open(project / "moved" / "trials" / trial / "results.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2], trial
    with open(project / "moved" / "tune_results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in table) == sorted(record["trials"]) and {r["status"] for r in table} == {
        "TERMINATED"
    }
    assert all(Path(r["run_dir"]).parent == project / "moved" / "trials" for r in table)
    # the planted state is gone: nothing reads it later (Ray's ExperimentAnalysis takes the newest name)
    assert not [p for p in planted if p.exists() and "9999" in p.name]
    assert not [p for p in planted if p.exists() and p.name in ("error.pkl", "params.pkl", "trainable.pkl")]


def test_failed_trials_are_named_with_their_cause_and_pysegs_user_errors_are_told_apart(tmp_path):
    """A trial that failed on a full disk (pyseg's WriteError, a user's or the machine's fault) and one that
    failed on a bug: each is named with the line of its error; only the first counts as a user error (exit 2)."""
    from pyseg.distributed.search import failed_trial_causes
    from pyseg.distributed.search_results import TuneSummary

    for trial, error in {
        "aaaaa_00000": "pyseg.files.WriteError: [Errno 28] cannot write last.pt: no space left on device",
        "aaaaa_00001": "KeyError: 'box'",
    }.items():
        (tmp_path / trial).mkdir()
        (tmp_path / trial / "error.txt").write_text(
            f"Failure # 1\nTraceback (most recent call last):\n  ...\n{error}\n"
        )
    rows = [{"trial": "aaaaa_00000", "status": "ERROR"}, {"trial": "aaaaa_00001", "status": "ERROR"}]
    rows.append({"trial": "aaaaa_00002", "status": "TERMINATED"})
    summary = TuneSummary(tmp_path, tmp_path / "t.csv", None, None, None, None, rows)
    causes = failed_trial_causes(summary)
    assert causes == {
        "aaaaa_00000": ("[Errno 28] cannot write last.pt: no space left on device", True),
        "aaaaa_00001": ("KeyError: 'box'", False),
    }


def test_flags_given_with_resume_that_the_search_does_not_use_are_named():
    from pyseg.tune import ignored_on_resume

    argv = ["--resume", "--name", "s", "--epochs", "5", "--samples=4", "--project", "p", "--no-mlflow", "--lr0", "1"]
    assert ignored_on_resume(argv) == ["--epochs", "--lr0", "--samples"]
    assert ignored_on_resume(["--resume", "--name", "s", "--storage", "s3://b/p", "--verbose"]) == []
