"""What a training process on Ray sets up before its first step (pyseg.distributed.worker): one decision each."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("ray")

import ray  # noqa: E402

from pyseg.distributed import worker  # noqa: E402
from pyseg.distributed.storage import StorageSyncHook  # noqa: E402
from pyseg.distributed.tracking import MlflowHook, TrackingConfig  # noqa: E402
from pyseg.engine.device import cpu_threads  # noqa: E402
from pyseg.engine.trainer import CheckpointHook, PlotsHook, ResultsHook  # noqa: E402
from pyseg.errors import ConfigError  # noqa: E402


@pytest.fixture
def ray_assigned(monkeypatch):
    """Makes Ray say it assigned these GPU ids, and torch whether it sees CUDA (no GPU needed)."""

    def assign(gpu_ids, cuda_visible: bool) -> list[str]:
        said = []
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(gpu_ids))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
        monkeypatch.setattr(worker, "no_cuda_message", lambda who, ids: said.append(f"{who}: {ids}") or "")
        return said

    return assign


def test_device_cpu_is_honoured_on_ray_even_where_ray_assigned_a_gpu(ray_assigned):
    ray_assigned([0], cuda_visible=True)
    assert worker.worker_device("cpu", "the trial", train_worker=False) == torch.device("cpu")
    # without --device the trial trains on the GPU Ray gave it (the only one CUDA_VISIBLE_DEVICES shows)
    assert worker.worker_device("", "the trial", train_worker=False) == torch.device("cuda", 0)


def test_a_gpu_torch_cannot_see_means_cpu_said_once_and_device_cuda_without_one_is_a_user_error(ray_assigned):
    said = ray_assigned([1], cuda_visible=False)
    assert worker.worker_device("", "rank 0", train_worker=True) == torch.device("cpu")
    assert said == ["rank 0: [1]"]
    with pytest.raises(ConfigError, match="--device cuda: Ray gave rank 0 no GPU it can use .*torch sees no CUDA"):
        worker.worker_device("cuda", "rank 0", train_worker=True)
    ray_assigned([], cuda_visible=True)
    with pytest.raises(ConfigError, match="--device 0: .*it assigned no GPU"):
        worker.worker_device("0", "the trial", train_worker=False)


def test_the_driver_refuses_device_cuda_when_the_workers_get_no_gpu():
    with pytest.raises(ConfigError, match="--device cuda:1: the workers get no GPU"):
        worker.check_device_has_gpus("cuda:1", 0)
    worker.check_device_has_gpus("cuda", 0.25)  # a quarter of a GPU each is a GPU
    worker.check_device_has_gpus("cpu", 0)
    worker.check_device_has_gpus("", 0)


def test_checkpoints_are_due_every_nth_epoch_and_the_last_and_never_without_an_interval():
    assert [e for e in range(1, 11) if worker.checkpoint_due(e, 3, 10)] == [3, 6, 9, 10]
    assert not any(worker.checkpoint_due(e, 0, 10) for e in range(1, 11))


def test_hooks_run_results_checkpoints_plots_mlflow_extras_upload_then_the_report():
    extra, report = ResultsHook(), CheckpointHook()
    hooks = worker.build_hooks(TrackingConfig(enabled=False), [extra], "s3://bucket/run", report)
    kinds = [type(hook) for hook in hooks]
    assert kinds == [ResultsHook, CheckpointHook, PlotsHook, MlflowHook, ResultsHook, StorageSyncHook, CheckpointHook]
    assert hooks[4] is extra and hooks[-1] is report
    assert [type(h) for h in worker.build_hooks(TrackingConfig(enabled=False))][-1] is MlflowHook


def test_cpu_threads_follow_threads_on_the_cpu_else_the_cpus_ray_gave():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert cpu_threads(3, cpu) == 3 and cpu_threads(3, cpu, cpus=8) == 3
    assert cpu_threads(3, cuda) is None  # --threads is about CPU training
    assert cpu_threads(0, cuda, cpus=2.5) == 2 and cpu_threads(0, cpu, cpus=0.5) == 1
    assert cpu_threads(0, cpu) is None  # not on Ray: torch's own default


def test_a_local_rays_folder_left_by_a_killed_command_is_removed_at_the_next_start(tmp_path):
    import subprocess
    import sys

    from pyseg.distributed.ray_train import RAY_DIR_OWNER, remove_stale_ray_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, owner in {"ray-dead1234": dead.stdout.strip(), "ray-alive123": str(os.getpid())}.items():
        (tmp_path / name / "session_x").mkdir(parents=True)
        (tmp_path / name / RAY_DIR_OWNER).write_text(owner)
    (tmp_path / "ray-notours1").mkdir()  # no owner file: someone else's
    assert remove_stale_ray_dirs(tmp_path) == [tmp_path / "ray-dead1234"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-alive123", "ray-notours1"]
