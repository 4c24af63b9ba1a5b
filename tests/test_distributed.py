"""Ray Train: 2 CPU workers on distinct shards, a worker crash recovered from the last checkpoint, path handling."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RayHead, free_port, kill_process_group, python_env, tiny_config

from pyseg.config import make_config
from pyseg.distributed.ray_train import RayClusterUnreachableError, RayScaling, absolute_paths, fit_with_ray, init_ray
from pyseg.distributed.tracking import TrackingConfig
from pyseg.engine.trainer import Hook
from pyseg.errors import UserError

ray = pytest.importorskip("ray")
# The hooks below travel to the Ray workers by value (the workers cannot import this test module).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))


class RecordStart(Hook):
    """Appends (rank, start epoch, this rank's first-epoch shard) to a JSON-lines file at every (re)start."""

    def __init__(self, path: Path):
        self.path = str(path)

    def on_fit_start(self, trainer):
        sampler = trainer.train_loader.sampler
        sampler.set_epoch(trainer.start_epoch)
        shard = [trainer.train_loader.dataset.images[i].image for i, _ in sampler]
        record = {"rank": trainer.rank, "world": trainer.world_size, "start": trainer.start_epoch, "shard": shard}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CrashOnce(Hook):
    """Test-only fault: the worker of `rank` dies (os._exit) after training epoch `epoch` (1-based), once.

    It waits a few seconds first: Ray Train's controller collects reports every 2 s, and a report still queued in a
    dying worker is lost (on real epochs, much longer than 2 s, that cannot happen to the previous epoch's report).
    """

    def __init__(self, rank: int, epoch: int, marker: Path):
        self.rank, self.epoch, self.marker = rank, epoch, str(marker)

    def on_train_epoch_end(self, trainer):
        if trainer.rank == self.rank and trainer.epoch + 1 == self.epoch and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"rank {trainer.rank} died in epoch {self.epoch}\n")
            time.sleep(5)
            os._exit(1)


class RecordReports(pytest.importorskip("ray.train").UserCallback):
    """Appends rank 0's metrics of every ray.train.report to a JSON-lines file (it runs in Ray Train's controller)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


def test_absolute_paths_resolve_data_project_and_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.yaml").write_text("x")
    cfg = absolute_paths(make_config({"data": "data.yaml", "project": "runs", "weights": "w.pt"}))
    assert cfg.data == str(tmp_path / "data.yaml")
    assert cfg.project == str(tmp_path / "runs") and cfg.weights == str(tmp_path / "w.pt")
    assert absolute_paths(make_config({"data": "shapes-seg.yaml"})).data == "shapes-seg.yaml"  # built-in name


def test_ray_trains_per_report_info_line_is_silenced():
    import logging

    from ray.train.v2._internal.execution import context as ray_context

    from pyseg.distributed.ray_train import _quiet_report_log

    _quiet_report_log()
    assert not ray_context.logger.isEnabledFor(logging.INFO)  # the logger Ray's report() writes to
    assert ray_context.logger.isEnabledFor(logging.WARNING)


def test_ray_scaling_rejects_impossible_resources():
    with pytest.raises(ValueError, match="--ray-workers"):
        RayScaling(workers=0)
    with pytest.raises(ValueError, match="--cpus-per-worker"):
        RayScaling(workers=1, cpus_per_worker=0)
    assert RayScaling(2, gpus_per_worker=1).resources_per_worker() == {"CPU": 1.0, "GPU": 1}
    assert RayScaling(2, gpus_per_worker=0).resources_per_worker() == {"CPU": 1.0}


@pytest.fixture
def ray_not_started(monkeypatch):
    """init_ray as in a fresh process (a module fixture's Ray may be up in this one); ray.init records its calls."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_without_an_address_pyseg_starts_a_local_ray_not_the_last_ray_start(ray_not_started, monkeypatch, short_tmp):
    # A killed `ray start --head` leaves its address in $TMPDIR/ray/ray_current_cluster; address=None would wait
    # for that dead head forever.
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    (short_tmp / "ray").mkdir()
    (short_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    init_ray(None)
    assert [call["address"] for call in ray_not_started] == ["local"]
    assert ray_not_started[0]["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    # every actor of the job is told where this Ray's state API (its dashboard) listens
    port = ray_not_started[0]["dashboard_port"]
    assert ray_not_started[0]["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_actors_ask_the_state_api_of_their_own_ray_while_another_ray_runs(local_ray, tmp_path, short_tmp):
    # Ray Train's placement-group cleaner asks the state API without an address. With a second local Ray up (two
    # searches side by side), Ray picks the Ray started last ("Found multiple active Ray instances ... Connecting to
    # latest cluster"): the cleaner then judged its controller by another Ray's actors, and a dead trial's placement
    # group kept its CPUs (a search stalled).
    head = RayHead(tmp_path / "head.log", {**python_env(), "TMPDIR": str(short_tmp)}, num_cpus=1)
    try:
        head.wait_until_up()

        @local_ray.remote(num_cpus=0, max_calls=1)
        def nodes_seen_by_the_state_api(with_address: bool) -> list[str] | str:
            from ray.util.state import list_nodes

            if not with_address:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            try:
                return sorted(node.node_id for node in list_nodes(timeout=30))
            except Exception as error:
                return str(error)

        own_nodes = sorted(node["NodeID"] for node in local_ray.nodes())
        assert local_ray.get(nodes_seen_by_the_state_api.remote(True)) == own_nodes
        without_address = local_ray.get(nodes_seen_by_the_state_api.remote(False))
        assert without_address != own_nodes, "without the address the state API must find the other Ray"
    finally:
        head.kill()


def test_an_address_or_ray_address_is_used_when_given(ray_not_started, monkeypatch):
    port = free_port()
    with socket.socket() as server:  # something that accepts connections stands in for the cluster
        server.bind(("127.0.0.1", port))
        server.listen()
        init_ray(f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
        init_ray(None)
    assert [call["address"] for call in ray_not_started] == [f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"]
    # a GCS address goes to every actor of the job (the state API of this cluster); a client address does not
    assert ray_not_started[0]["runtime_env"]["env_vars"]["RAY_ADDRESS"] == f"127.0.0.1:{port}"
    assert "RAY_ADDRESS" not in ray_not_started[1]["runtime_env"]["env_vars"]


def test_inside_a_ray_job_init_ray_leaves_out_the_env_vars_the_job_already_sets(ray_not_started, monkeypatch):
    # Ray refuses a job driver's ray.init whose runtime_env repeats a key of the job's ("Failed to merge the Job's
    # runtime env"): pyseg.submit forwards PYSEG_CACHE_DIR and the like to the job, and init_ray forwarded them again.
    monkeypatch.setenv("PYSEG_CACHE_DIR", "/data/cache")
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip", "env_vars": {"PYSEG_CACHE_DIR": "/data/cache"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # as Ray Jobs sets it
        init_ray(None)
    env_vars = ray_not_started[0]["runtime_env"]["env_vars"]
    assert "PYSEG_CACHE_DIR" not in env_vars  # the job brings it
    assert env_vars["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and env_vars["RAY_ADDRESS"] == f"127.0.0.1:{port}"


@pytest.mark.parametrize("source", ["--address", "RAY_ADDRESS", "auto"])
def test_an_unreachable_cluster_is_a_user_error_that_names_the_address(ray_not_started, monkeypatch, short_tmp, source):
    dead = f"127.0.0.1:{free_port()}"
    address = None
    if source == "--address":
        address = f"ray://{dead}"
    elif source == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", dead)
    else:  # auto: the address the last `ray start` recorded, long dead
        monkeypatch.setenv("TMPDIR", str(short_tmp))
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
        (short_tmp / "ray").mkdir()
        (short_tmp / "ray" / "ray_current_cluster").write_text(dead)
        # and no Ray runs on this machine (with exactly one running, Ray's "auto" connects to that one instead)
        monkeypatch.setattr("ray._private.services.find_gcs_addresses", lambda: [])
        address = "auto"
    start = time.monotonic()
    with pytest.raises(RayClusterUnreachableError) as caught:
        init_ray(address)
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ConnectionError)
    named = {"--address": f"ray://{dead} (--address)", "RAY_ADDRESS": f"{dead} (RAY_ADDRESS)"}
    named["auto"] = "auto (--address)"
    assert f"cannot reach the Ray cluster at {named[source]}" in message and dead in message
    assert "ray start --head" in message and "--address" in message
    assert not ray_not_started and time.monotonic() - start < 15


@pytest.mark.slow
def test_two_workers_train_distinct_shards_and_a_crashed_worker_resumes_from_the_checkpoint(
    tiny_data, tmp_path, local_ray, ray_worker_tmpdir
):
    cfg = tiny_config(tiny_data, tmp_path, epochs=2, batch=4, name="ddp")
    starts, marker = tmp_path / "starts.jsonl", tmp_path / "crashed.txt"
    run_dir, result = fit_with_ray(
        cfg,
        RayScaling(workers=2, cpus_per_worker=1, max_failures=1),
        TrackingConfig(enabled=False),
        extra_hooks=[RecordStart(starts), CrashOnce(rank=1, epoch=2, marker=marker)],
    )
    assert result.error is None and marker.is_file()
    assert "GPU" not in local_ray.cluster_resources()  # so the unset gpus_per_worker resolved to CPU workers
    assert result.metrics["epoch"] == 2

    records = [json.loads(line) for line in starts.read_text().splitlines()]
    first = {r["rank"]: r for r in records if r["start"] == 0}
    assert set(first) == {0, 1} and all(r["world"] == 2 for r in records)
    shard0, shard1 = set(first[0]["shard"]), set(first[1]["shard"])
    assert shard0 and shard1 and not shard0 & shard1, "the ranks must train on disjoint shards"
    assert len(shard0 | shard1) == 8  # together they cover the 8 training images
    restarts = [r for r in records if r["start"] > 0]
    assert {r["rank"] for r in restarts} == {0, 1} and all(r["start"] == 1 for r in restarts), [
        (r["rank"], r["start"]) for r in records
    ]

    with open(run_dir / "results.csv", newline="") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [1, 2]
    assert (run_dir / "weights" / "last.pt").is_file() and (run_dir / "weights" / "best.pt").is_file()
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "last.pt").is_file()
    # Both ranks restored the checkpoint into a temporary folder (in the workers' TMPDIR) and removed it.
    assert not list(ray_worker_tmpdir.glob("pyseg-restore-*")), list(ray_worker_tmpdir.iterdir())

    # Resumed once finished, the run has nothing to train, and still reports how it ended (a Tune trial interrupted
    # as it finished is run again this way, and its result must end at the last epoch, not at an earlier report).
    again = tiny_config(tiny_data, tmp_path, epochs=2, batch=4, name=run_dir.name, resume=True)
    reports = tmp_path / "reports.jsonl"
    same_dir, finished = fit_with_ray(
        again,
        RayScaling(workers=2, cpus_per_worker=1),
        TrackingConfig(enabled=False),
        callbacks=[RecordReports(reports)],
    )
    assert same_dir == run_dir and finished.error is None
    reported = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [r["epoch"] for r in reported] == [2]  # what TuneReportCallback passes on to Tune
    assert reported[0]["best_fitness"] == result.metrics["best_fitness"]
    assert reported[0]["mask/map"] == result.metrics["mask/map"]
    with open(run_dir / "results.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    assert not list(ray_worker_tmpdir.glob("pyseg-restore-*")), list(ray_worker_tmpdir.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ray_workers", "stop"),
    [
        pytest.param(0, signal.SIGINT, id="int"),
        pytest.param(1, signal.SIGINT, id="int-ray"),
        pytest.param(0, signal.SIGTERM, id="term"),
    ],
)
def test_ctrl_c_says_how_to_continue_and_that_command_finishes_the_run(
    ray_workers, stop, tiny_data, tmp_path, short_tmp
):
    """pyseg.train (in this process, and with --ray-workers 1) gets SIGINT (Ctrl-C; or SIGTERM, `kill PID`) after
    its first epoch: exit 130 and a continue command (on Ray, not Ray Train's own handler, which exited 1 without
    one); that command, run as printed, ends the run with one row per epoch. The Ray run is started as a script's
    background job is (`... &`: SIGINT ignored), which `kill -INT` must still end."""
    env = python_env(TMPDIR=str(short_tmp), RAY_TMPDIR=None, RAY_ADDRESS=None, PYSEG_CACHE_DIR=str(tmp_path / "c"))
    run_dir = tmp_path / "runs" / "ctrl_c"
    flags = ["--data", str(tiny_data), "--imgsz", "64", "--batch", "4", "--workers", "0", "--epochs", "3"]
    flags += ["--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "ctrl_c", "--no-mlflow"]
    log = tmp_path / "interrupted.log"
    with open(log, "w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pyseg.train", *flags, "--ray-workers", str(ray_workers)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # as a background job of a script: SIGINT ignored from the start
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ray_workers else None,
        )
        try:
            deadline = time.monotonic() + 240
            while not (run_dir / "results.csv").is_file() or len((run_dir / "results.csv").read_text().split()) < 2:
                assert driver.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no epoch finished within 240 s"
                time.sleep(0.2)
            driver.send_signal(stop)
            code = driver.wait(timeout=120)
        finally:
            kill_process_group(driver, grace_s=10)
    text = log.read_text()
    assert code == 130, text[-4000:]
    last = run_dir / "weights" / "last.pt"
    command = text.split("pyseg.train: interrupted; continue with: ", 1)[1].splitlines()[0]
    words = shlex.split(command)
    on_ray = ["--ray-workers", "1"] if ray_workers else []
    assert words == ["python", "-m", "pyseg.train", "--resume", str(last), "--no-mlflow", *on_ray]
    done = subprocess.run(
        [sys.executable, *words[1:]], env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    with open(run_dir / "results.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
