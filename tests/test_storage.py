"""No shared disk: runs kept on an S3-compatible server on 127.0.0.1 (moto), through pyarrow.fs.

The fast tests check pyseg.distributed.storage against the server; the slow one runs a search on two Ray nodes whose
have different temp folders, kills its driver, deletes every local file of the driver, and resumes it from the bucket.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_process_group, python_env, ray_cluster, short_temp_dir

from pyseg.distributed.storage import (
    FolderUploader,
    Storage,
    is_remote,
    remove_all_staged,
    remove_staged,
    staging_folder,
)
from pyseg.errors import ConfigError

moto_server = pytest.importorskip("moto.server")
REPO = Path(__file__).resolve().parents[1]
BUCKET = "pyseg-runs"


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server (moto) on 127.0.0.1 with an empty bucket BUCKET; its address and test credentials in the
    environment (AWS_ENDPOINT_URL, which pyarrow and boto3 read), so Ray's processes started later inherit them."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_remote_uris_and_children_keep_their_query(s3_endpoint):
    assert is_remote("s3://b/p") and is_remote("gs://b/p") and not is_remote("/data/runs")
    assert not is_remote("file:///data/runs") and not is_remote("runs")
    storage = Storage("s3://b/runs?scheme=http")
    assert storage.child("tune", "trials").uri == "s3://b/runs/tune/trials?scheme=http"
    assert storage.child("tune").display == "s3://b/runs/tune"


def test_uploads_only_what_changed_and_downloads_it_back(s3_endpoint, tmp_path):
    local = tmp_path / "run"
    (local / "weights").mkdir(parents=True)
    (local / "ray_train").mkdir()
    (local / "results.csv").write_text("epoch\n1\n")
    (local / "weights" / "last.pt").write_bytes(b"w1")
    (local / "ray_train" / "state.json").write_text("{}")  # Ray writes its own checkpoints to the storage
    (local / ".results.csv.tmp").write_text("half")  # a file being written atomically
    storage = Storage(f"s3://{BUCKET}/upload-test")
    uploader = FolderUploader(local, storage)
    assert uploader.upload_changes() == 2
    assert storage.files() == {"results.csv": 8, "weights/last.pt": 2}
    assert uploader.upload_changes() == 0  # nothing changed
    (local / "results.csv").write_text("epoch\n1\n2\n")
    assert uploader.upload_changes() == 1
    assert storage.read_bytes("results.csv") == b"epoch\n1\n2\n"

    elsewhere = tmp_path / "other-node"
    assert storage.download(elsewhere) == 2
    assert (elsewhere / "results.csv").read_text() == "epoch\n1\n2\n"
    assert (elsewhere / "weights" / "last.pt").read_bytes() == b"w1"
    assert sorted(p.name for p in elsewhere.rglob("*") if p.is_file()) == ["last.pt", "results.csv"]
    assert storage.download(tmp_path / "no-weights", skip=("weights",)) == 1
    storage.delete("weights")
    assert storage.files() == {"results.csv": 10}
    assert Storage(f"s3://{BUCKET}/nothing-here").download(tmp_path / "empty") == 0


def test_a_bucket_is_opened_once_per_process_and_endpoint(s3_endpoint, tmp_path, monkeypatch):
    # opening an S3 filesystem asks for the bucket's region: once per bucket, not once per file of every epoch
    from pyseg.distributed.storage import _object_store

    _object_store.cache_clear()
    (tmp_path / "a.txt").write_text("a")
    kept = Storage(f"s3://{BUCKET}/open-once")
    for name in ("x/a.txt", "y/z/a.txt", "a.txt"):
        kept.write_file(tmp_path / "a.txt", name)
    assert kept.files() == {"x/a.txt": 1, "y/z/a.txt": 1, "a.txt": 1} and kept.child("y").exists("z", "a.txt")
    assert kept.read_bytes("y", "z", "a.txt") == b"a"
    assert _object_store.cache_info().misses == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # another endpoint: another filesystem
    kept._fs()
    assert _object_store.cache_info().misses == 2
    _object_store.cache_clear()


def test_a_storage_that_cannot_be_opened_names_the_flag_and_what_to_set(s3_endpoint):
    with pytest.raises(ConfigError) as caught:
        Storage.open("nosuchscheme://bucket/runs")
    assert "--storage nosuchscheme://bucket/runs: cannot open it" in str(caught.value)
    assert "AWS_ENDPOINT_URL" in str(caught.value)


def test_staged_copies_go_with_their_empty_parents(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    run = staging_folder("s3://b/runs/tune/trials/trial1", rank=1) / "trial1"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "last.pt").write_bytes(b"w")
    assert run.is_relative_to(tmp_path / "pyseg-staging")
    remove_staged(run)
    assert not (tmp_path / "pyseg-staging").exists()


def test_the_copies_a_search_staged_go_for_the_runs_named_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    trials = [f"s3://b/runs/tune/trials/trial{i}" for i in range(3)]
    for uri in trials:
        for rank in (0, 1):
            (staging_folder(uri, rank) / uri.rsplit("/", 1)[1] / "weights").mkdir(parents=True)
    remove_all_staged(trials[:2])  # a stopped trial's copies, every rank's; the third trial's stay
    left = sorted(
        path.relative_to(staging_folder(trials[2]).parent) for path in staging_folder(trials[2]).parent.rglob("*")
    )
    assert [str(path) for path in left] == [
        "rank0",
        "rank0/trial2",
        "rank0/trial2/weights",
        "rank1",
        "rank1/trial2",
        "rank1/trial2/weights",
    ]
    assert not staging_folder(trials[0]).parent.exists() and not staging_folder(trials[1]).parent.exists()
    remove_all_staged(trials[2:])
    assert not (tmp_path / "pyseg-staging").exists()  # nothing left: the staging folder goes too


def bucket_files(prefix: str) -> dict[str, int]:
    return Storage(f"s3://{BUCKET}/{prefix}").files()


class RunsCode:
    """Unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def results_epochs(storage: Storage, *parts: str) -> list[int]:
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(*parts).decode())))
    return [int(row["epoch"]) for row in rows]


@pytest.mark.slow
def test_a_search_kept_on_s3_resumes_from_the_bucket_after_its_driver_is_killed(
    s3_endpoint, tiny_data, tmp_path, private_cache
):
    # Two nodes, each with a temp folder of its own (where its trials stage their run folders), one trial on each
    # (1 CPU per node, 1 per trial). The driver is killed once a trial has stored an epoch; every file it had is
    # then deleted, so the resumed search can only continue from what is in the bucket.
    with short_temp_dir("pyseg-s3-") as scratch:
        node_tmp = {"head": scratch / "head", "worker": scratch / "worker"}
        for folder in node_tmp.values():
            folder.mkdir()
        space = tmp_path / "space.yaml"
        space.write_text("optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
        project = tmp_path / "driver"
        with ray_cluster(
            head_cpus=1, worker_cpus=1, head_env={"TMPDIR": str(node_tmp["head"])},
            worker_env={"TMPDIR": str(node_tmp["worker"])},
        ) as nodes:  # fmt: skip
            args = [
                "--data", str(tiny_data), "--space", str(space), "--imgsz", "64", "--batch", "4", "--workers", "0",
                "--device", "cpu", "--threads", "1", "--close-mosaic", "1", "--warmup-epochs", "0.5",
                "--epochs", "3", "--samples", "2", "--max-concurrent", "2", "--cpus-per-worker", "1",
                "--scheduler", "none", "--no-mlflow", "--name", "s3search", "--project", str(project),
                "--address", nodes.address, "--storage", f"s3://{BUCKET}/runs",
            ]  # fmt: skip
            env = python_env(TMPDIR=str(scratch), RAY_ADDRESS=None, MLFLOW_TRACKING_URI=None, PYTHONUNBUFFERED="1")
            trials = Storage(f"s3://{BUCKET}/runs/s3search/trials")
            staged_on = set()
            with open(tmp_path / "first.log", "w") as log:
                first = subprocess.Popen(
                    [sys.executable, "-m", "pyseg.tune", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                    cwd=REPO, start_new_session=True,
                )  # fmt: skip
                try:
                    deadline = time.monotonic() + 480
                    while not any(path.endswith("results.csv") for path in trials.files()):
                        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                        assert time.monotonic() < deadline, "no trial stored an epoch within 480 s"
                        staged_on |= {node for node, tmp in node_tmp.items() if (tmp / "pyseg-staging").exists()}
                        time.sleep(0.5)
                finally:
                    os.killpg(first.pid, signal.SIGKILL)  # the driver dies; Ray ends its trials
                    kill_process_group(first, grace_s=0)
            assert staged_on == {"head", "worker"}, "each node stages its trial in its own temp folder"
            shutil.rmtree(project)  # the driver's machine keeps nothing
            # a pickle that runs code, in Ray's state files in the bucket: --resume must not read any of them
            marker = tmp_path / "MARK"
            payload = tmp_path / "payload.pkl"
            payload.write_bytes(pickle.dumps(RunsCode(f"touch {marker}")))
            search_kept = Storage(f"s3://{BUCKET}/runs/s3search")
            ray_files = [name for name in search_kept.files() if name.endswith(".pkl") and "/" not in name]
            assert "tuner.pkl" in ray_files
            for name in [*ray_files, "searcher-state-9999-12-31_23-59-59.pkl"]:
                search_kept.write_file(payload, name)

            with open(tmp_path / "second.log", "w") as log:
                code = subprocess.run(
                    [sys.executable, "-m", "pyseg.tune", *args, "--resume"], stdout=log, stderr=subprocess.STDOUT,
                    env=env, cwd=REPO, timeout=600,
                ).returncode  # fmt: skip
            output = (tmp_path / "second.log").read_text()
            assert code == 0, output[-4000:]
            assert not marker.exists(), "a pickle in the bucket ran"
            assert not search_kept.exists("searcher-state-9999-12-31_23-59-59.pkl")

        # every trial's outputs are in the bucket, each epoch once
        stored = trials.files()
        trial_ids = sorted({path.split("/", 1)[0] for path in stored})
        assert len(trial_ids) == 2, sorted(stored)
        for trial in trial_ids:
            assert results_epochs(trials, trial, "results.csv") == [1, 2, 3], trial
            for name in ("args.yaml", "weights/last.pt", "weights/best.pt", "results.png"):
                assert f"{trial}/{name}" in stored, (trial, name)
        search = Storage(f"s3://{BUCKET}/runs/s3search")
        assert search.exists("tune_results.csv") and search.exists("best.yaml")
        assert f"best checkpoint: s3://{BUCKET}/runs/s3search/trials/" in output
        # the staged copies are gone from both nodes
        leftovers = [path for tmp in node_tmp.values() for path in (tmp / "pyseg-staging").rglob("*")]
        assert not leftovers


@pytest.mark.slow
def test_a_ray_training_kept_on_s3_stores_its_run_folder_and_refuses_to_overwrite_it(
    s3_endpoint, tiny_data, tmp_path, private_cache
):
    with short_temp_dir("pyseg-s3-") as scratch:
        project = tmp_path / "here"
        args = [
            "--data", str(tiny_data), "--imgsz", "64", "--batch", "4", "--workers", "0", "--device", "cpu",
            "--threads", "1", "--close-mosaic", "1", "--warmup-epochs", "0.5", "--epochs", "2", "--no-mlflow",
            "--ray-workers", "1", "--cpus-per-worker", "1", "--project", str(project), "--name", "stored",
            "--storage", f"s3://{BUCKET}/train",
        ]  # fmt: skip
        env = python_env(TMPDIR=str(scratch), RAY_ADDRESS=None, MLFLOW_TRACKING_URI=None, PYTHONUNBUFFERED="1")

        def train(*extra: str) -> tuple[int, str]:
            done = subprocess.run(
                [sys.executable, "-m", "pyseg.train", *args, *extra], capture_output=True, text=True, env=env,
                cwd=REPO, timeout=600,
            )  # fmt: skip
            return done.returncode, done.stdout + done.stderr

        code, output = train()
        assert code == 0, output[-4000:]
        assert f"results in s3://{BUCKET}/train/stored" in output
        run = Storage(f"s3://{BUCKET}/train/stored")
        stored = run.files()
        assert results_epochs(run, "results.csv") == [1, 2]
        assert {"args.yaml", "weights/last.pt", "weights/best.pt"} <= set(stored)
        assert any(path.startswith("ray_train/") for path in stored)  # Ray's checkpoints, written there by Ray
        assert not project.exists() and not list((scratch / "pyseg-staging").rglob("*"))  # no copy stays here

        code, output = train()  # the same name again: refused, the stored run untouched
        assert code == 2 and f"s3://{BUCKET}/train/stored already holds a run" in output and "--resume" in output
        assert run.files() == stored
        code, output = train("--resume")  # a finished run: nothing left to train, still one row per epoch
        assert code == 0, output[-4000:]
        assert results_epochs(run, "results.csv") == [1, 2]


def test_a_search_kept_remotely_needs_a_tracking_store_every_node_reaches(s3_endpoint, tiny_data, tmp_path):
    from conftest import tiny_config

    from pyseg.distributed.search import run_tune
    from pyseg.distributed.search_settings import TuneSettings
    from pyseg.distributed.search_space import load_search_space
    from pyseg.distributed.tracking import TrackingConfig

    space = tmp_path / "space.yaml"
    space.write_text("lr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
    settings = TuneSettings(samples=1, name="remote", storage=f"s3://{BUCKET}/checks")
    with pytest.raises(ConfigError) as caught:  # before Ray starts
        run_tune(tiny_config(tiny_data, tmp_path), load_search_space(space), settings, TrackingConfig())
    message = str(caught.value)
    assert "mlflow.db" in message and "--mlflow-uri http://" in message and "--no-mlflow" in message


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("tune", ["--storage", "nosuchscheme://bucket/runs"], "--storage nosuchscheme://bucket/runs: cannot open it"),
        ("train", ["--storage", f"s3://{BUCKET}/t"], "--storage URI keeps a run trained by Ray workers"),
    ],
)
def test_storage_mistakes_are_one_line_and_exit_2(s3_endpoint, tmp_path, capsys, command, flags, message):
    from pyseg import train as train_cli
    from pyseg import tune as tune_cli

    main = tune_cli.main if command == "tune" else train_cli.main
    assert main([*flags, "--project", str(tmp_path / "runs"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
