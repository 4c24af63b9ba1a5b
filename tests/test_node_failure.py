"""Failure on purpose: a Ray worker node is removed in the middle of an epoch (its raylet and every process on it
killed), once under a 2-worker training and once under a trial of a search. Both must end with every epoch trained
once, one results.csv row per epoch, and say how much time the failure cost."""

from __future__ import annotations

import csv
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ray_cluster, tiny_config

from pyseg.distributed.ray_train import RayScaling, fit_with_ray
from pyseg.distributed.search import run_tune
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import load_search_space
from pyseg.distributed.tracking import TrackingConfig
from pyseg.engine.trainer import Hook

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks travel to the workers by value

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_cache")]


@pytest.fixture
def two_nodes():
    """A head and a worker node of 1 CPU each; a test removes the worker node."""
    with ray_cluster(head_cpus=1, worker_cpus=1) as nodes:
        yield nodes


class StallOnNode(Hook):
    """On the worker of `node_id`, once: after training epoch `epoch` (1-based), before its validation and
    checkpoint, writes `marker` and waits, so that the test removes the node in the middle of that epoch."""

    def __init__(self, node_id: str, epoch: int, marker: Path):
        self.node_id, self.epoch, self.marker = node_id, epoch, str(marker)

    def on_train_epoch_end(self, trainer):
        here = ray.get_runtime_context().get_node_id()
        if here == self.node_id and trainer.epoch + 1 == self.epoch and not os.path.exists(self.marker):
            # Ray Train's controller collects reports every 2 s; real epochs are longer than that, and a tiny one
            # must not let the previous epoch's report die with the node
            time.sleep(5)
            Path(self.marker).write_text(json.dumps({"run": trainer.run_dir.name, "rank": trainer.rank}))
            time.sleep(120)  # the node goes away meanwhile


class RecordWorld(Hook):
    """Appends (run, world size, first epoch) at every (re)start of a worker to a JSON-lines file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def on_fit_start(self, trainer):
        record = {"run": trainer.run_dir.name, "world": trainer.world_size, "start": trainer.start_epoch}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def remove_node_when(marker: Path, nodes, work: threading.Thread, timeout: float = 300) -> float:
    """Waits for marker (the stalled epoch), removes the worker node; returns when it was removed."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert work.is_alive(), "the run ended before the worker node's epoch stalled"
        assert time.monotonic() < deadline, f"no stall within {timeout} s"
        time.sleep(0.2)
    nodes.remove_node(nodes.worker_node, allow_graceful=False)
    return time.monotonic()


def epochs_in(run_dir: Path) -> list[int]:
    with open(run_dir / "results.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def in_thread(target) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = target()
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


def test_training_goes_on_with_the_workers_left_when_a_node_dies_mid_epoch(two_nodes, tiny_data, tmp_path, capfd):
    marker, worlds = tmp_path / "stalled.json", tmp_path / "worlds.jsonl"
    cfg = tiny_config(tiny_data, tmp_path, epochs=3, name="elastic")
    worker_node = two_nodes.worker_node.node_id
    thread, outcome = in_thread(
        lambda: fit_with_ray(
            cfg,
            RayScaling(workers=2, gpus_per_worker=0, cpus_per_worker=1, max_failures=2, min_workers=1),
            TrackingConfig(enabled=False),
            extra_hooks=[RecordWorld(worlds), StallOnNode(worker_node, epoch=2, marker=marker)],
        )
    )
    remove_node_when(marker, two_nodes, thread)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome
    run_dir, result = outcome["value"]
    assert result.error is None and result.metrics["epoch"] == 3
    assert epochs_in(run_dir) == [1, 2, 3]  # epoch 2 trained again on the node left, once in the results
    starts = [json.loads(line) for line in worlds.read_text().splitlines()]
    assert [(r["world"], r["start"]) for r in starts if r["start"] == 0] == [(2, 0), (2, 0)]
    assert [(r["world"], r["start"]) for r in starts if r["start"] > 0] == [(1, 1)]  # one worker, from epoch 2
    output = capfd.readouterr().out
    assert "restarted after a failure: continuing at epoch 2 on 1 worker" in output, output[-3000:]
    assert "time lost: " in output


def test_a_trial_whose_node_dies_is_retried_and_its_mlflow_run_finishes(two_nodes, tiny_data, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    marker, worlds = tmp_path / "stalled.json", tmp_path / "worlds.jsonl"
    space_path = tmp_path / "space.yaml"
    space_path.write_text("lr0: {loguniform: [1.0e-3, 1.0e-2]}\n")
    base = tiny_config(tiny_data, tmp_path, epochs=3, name="unused")
    settings = TuneSettings(
        samples=2, scheduler="none", name="lost-node", gpus_per_trial=0, max_failures=2, progress_every_s=0
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worker_node = two_nodes.worker_node.node_id
    hooks = [RecordWorld(worlds), StallOnNode(worker_node, epoch=2, marker=marker)]
    thread, outcome = in_thread(
        lambda: run_tune(
            base, load_search_space(space_path), settings, TrackingConfig(uri=uri, experiment="lost"), hooks=hooks
        )
    )
    remove_node_when(marker, two_nodes, thread)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome
    summary = outcome["value"]
    stalled = json.loads(marker.read_text())["run"]
    assert {row["trial"]: row["status"] for row in summary.rows} == {row["trial"]: "TERMINATED" for row in summary.rows}
    assert stalled in {row["trial"] for row in summary.rows}
    for row in summary.rows:
        assert epochs_in(Path(row["run_dir"])) == [1, 2, 3], row["trial"]
    restarts = [json.loads(line) for line in worlds.read_text().splitlines()]
    assert [r["start"] for r in restarts if r["run"] == stalled] == [0, 1]  # again from its epoch-1 checkpoint

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lost").experiment_id])
    children = {r.data.tags["pyseg.trial_id"]: r for r in runs if "pyseg.trial_id" in r.data.tags}
    assert set(children) == {row["trial"] for row in summary.rows}
    assert all(run.info.status == "FINISHED" for run in children.values())
    steps = [m.step for m in client.get_metric_history(children[stalled].info.run_id, "mask/map")]
    assert sorted(set(steps)) == [1, 2, 3]
