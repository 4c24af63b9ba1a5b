"""What a training process on Ray sets up before its first step, for TorchTrainer workers (ray_train) and
in-process Tune trials (trial_process) alike: its device, its run folder (a staging copy when the run is kept on a
storage), its hooks, and the rule of which epochs carry a checkpoint. Ray is imported only by the functions that
ask it something."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyseg.config import TrainConfig
from pyseg.distributed.storage import StorageSyncHook, stage, staging_folder
from pyseg.distributed.tracking import MlflowHook, TrackingConfig
from pyseg.engine.trainer import Hook, default_hooks
from pyseg.errors import ConfigError


def worker_device(requested: str, who: str, train_worker: bool):
    """The torch device a Ray training process trains on: --device as given (requested), on what Ray assigned.

    cpu: the CPU, even where Ray assigned a GPU. '' (the default): the GPU Ray assigned, else the CPU; the CPU,
    said once, when Ray assigned a GPU that torch cannot see (a node that declares GPUs it lacks, a CPU-only
    torch). cuda, cuda:N or N: the GPU Ray assigned (Ray picks which one); ConfigError when it assigned none.
    train_worker: a TorchTrainer worker (its GPU is Ray Train's local one) rather than a trial's own process
    (CUDA_VISIBLE_DEVICES shows it the one GPU Ray gave the trial)."""
    import ray
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and torch.cuda.is_available():
        if train_worker:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", 0)
    if requested:
        raise ConfigError(
            f"--device {requested}: Ray gave {who} no GPU it can use ({no_cuda_reason(gpu_ids)}); give the workers "
            "GPUs (--gpus-per-worker, --gpus-per-trial) or leave out --device"
        )
    if gpu_ids:
        print(no_cuda_message(who, gpu_ids))
    return torch.device("cpu")


def no_cuda_reason(gpu_ids) -> str:
    if not gpu_ids:
        return "it assigned no GPU"
    return f"it assigned GPU {', '.join(map(str, gpu_ids))}, but torch sees no CUDA device there"


def no_cuda_message(who: str, gpu_ids) -> str:
    import ray

    node = ray.get_runtime_context().get_node_id()[:8]
    return (
        f"{who}: Ray assigned GPU {', '.join(map(str, gpu_ids))} of node {node} but torch sees no CUDA device there "
        "(torch.cuda.is_available() is False): training on CPU. Check the node's --num-gpus and that its torch is "
        "a CUDA build."
    )


def check_device_has_gpus(device: str, gpus_per_worker: float) -> None:
    """On the driver, before any worker starts: ConfigError when --device asks for CUDA but the workers get no
    GPU (each would fail alone)."""
    if device not in ("", "cpu") and not gpus_per_worker:
        raise ConfigError(
            f"--device {device}: the workers get no GPU (this cluster has none, or --gpus-per-worker / "
            "--gpus-per-trial is 0); give them GPUs or leave out --device"
        )


def stage_run_folder(cfg: TrainConfig, storage: str | None, rank: int = 0) -> TrainConfig:
    """cfg training in a staging copy of its run folder on this node when the run is kept on a storage (the
    storage holds the truth: a copy a killed run left here may be stale); cfg itself otherwise."""
    if not storage:
        return cfg
    cfg = cfg.updated(project=str(staging_folder(storage, rank)))
    stage(storage, Path(cfg.project) / cfg.name)
    return cfg


def build_hooks(
    tracking: TrackingConfig, extra: Sequence[Hook] = (), storage: str | None = None, report: Hook | None = None
) -> list[Hook]:
    """A training run's hooks, in their order: results, checkpoints and plots, MLflow, the caller's extras, the
    upload of each epoch to the storage (a run kept on one), and last the report to Ray (which sees the epoch's
    files complete)."""
    hooks = default_hooks() + [MlflowHook(tracking), *extra]
    hooks += [StorageSyncHook(storage)] if storage else []
    hooks += [report] if report is not None else []
    return hooks


def checkpoint_due(epoch: int, every: int, epochs: int) -> bool:
    """Whether an epoch's report carries its checkpoint with checkpoint_every `every` (PBT's perturbation
    interval): every every-th epoch and the last; none without (0)."""
    return bool(every) and (epoch % every == 0 or epoch >= epochs)
