"""Scale-out on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head node and a worker node,
each a raylet of its own with 1 CPU; the worker node declares one GPU, which Ray schedules on whether or not it is
real): where training workers and trials land, and GPUs shared by trials."""

from __future__ import annotations

import json
import sys
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


@pytest.fixture(scope="module")
def cluster():
    """The head (1 CPU) and a worker node (1 CPU, 1 declared GPU)."""
    with ray_cluster(head_cpus=1, worker_cpus=1, worker_gpus=1) as nodes:
        yield nodes


class RecordPlacement(Hook):
    """Appends where each worker ran to a JSON-lines file: its run folder, rank, Ray node, device, the GPU ids Ray
    gave it, and when it started and ended."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.started = 0.0

    def on_fit_start(self, trainer):
        self.started = time.time()

    def on_fit_end(self, trainer):
        record = {
            "run": trainer.run_dir.name,
            "rank": trainer.rank,
            "node": ray.get_runtime_context().get_node_id(),
            "device": str(trainer.device),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "start": self.started,
            "end": time.time(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def node_ids() -> dict[str, str]:
    """{"head": id, "worker": id} of the cluster's alive nodes (the worker node is the one with a GPU)."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return {("worker" if node["Resources"].get("GPU") else "head"): node["NodeID"] for node in nodes}


def most_at_once(records: list[dict]) -> int:
    """The most intervals [start, end] that overlap at one moment."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def test_two_training_workers_run_one_on_each_node(cluster, tiny_data, tmp_path):
    placements = tmp_path / "placements.jsonl"
    cfg = tiny_config(tiny_data, tmp_path, epochs=1, name="two-nodes")
    run_dir, result = fit_with_ray(
        cfg,
        RayScaling(workers=2, gpus_per_worker=0, cpus_per_worker=1),
        TrackingConfig(enabled=False),
        extra_hooks=[RecordPlacement(placements)],
    )
    assert result.error is None and result.metrics["epoch"] == 1
    records = read_records(placements)
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert {r["node"] for r in records} == set(node_ids().values())  # one worker on each node
    assert all(r["device"] == "cpu" and not r["gpu_ids"] for r in records)


def four_trial_search(tiny_data, tmp_path, device="cpu", **settings) -> tuple[list[dict], list[dict]]:
    """A 4-trial, 1-epoch search of lr0 with the given TuneSettings on --device device; (its rows, where each
    trial's worker ran)."""
    placements = tmp_path / "placements.jsonl"
    space_path = tmp_path / "space.yaml"
    space_path.write_text("lr0: {loguniform: [1.0e-3, 1.0e-2]}\n")
    base = tiny_config(tiny_data, tmp_path, epochs=1, name="unused", device=device)
    summary = run_tune(
        base,
        load_search_space(space_path),
        TuneSettings(samples=4, scheduler="none", progress_every_s=0, **settings),
        TrackingConfig(enabled=False),
        hooks=[RecordPlacement(placements)],
    )
    assert len(summary.rows) == 4 and all(row["status"] == "TERMINATED" for row in summary.rows)
    records = read_records(placements)
    assert sorted(r["run"] for r in records) == sorted(row["trial"] for row in summary.rows)
    return summary.rows, records


def test_a_search_spreads_its_trials_over_both_nodes(cluster, tiny_data, tmp_path):
    _, records = four_trial_search(tiny_data, tmp_path, name="spread", gpus_per_trial=0)
    assert {r["node"] for r in records} == set(node_ids().values()), records  # trials ran on both nodes
    assert most_at_once(records) == 2  # one CPU each: two trials at a time, one per node


def test_trials_share_a_gpu_in_quarters_and_fall_back_to_cpu_when_it_is_not_real(cluster, tiny_data, tmp_path, capfd):
    _, records = four_trial_search(
        tiny_data,
        tmp_path,
        name="quarters",
        device="",  # what Ray assigned (--device cpu would train on the CPU without a word, as asked)
        gpus_per_trial=0.25,
        cpus_per_worker=0.25,
        verbose=True,  # the workers' output reaches this process (the fallback message)
    )
    gpu_node = node_ids()["worker"]
    assert all(r["node"] == gpu_node and r["gpu_ids"] == ["0"] for r in records), records
    assert most_at_once(records) == 4  # a quarter GPU each: all four at once on the one GPU
    # torch sees no CUDA device on this machine: the trials trained on the CPU and said why (Ray prints the four
    # identical lines once)
    assert all(r["device"] == "cpu" for r in records)
    output = capfd.readouterr()
    assert "Ray assigned GPU 0 of node" in output.out and "training on CPU" in output.out, output.out[-3000:]
