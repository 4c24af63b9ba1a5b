"""A Tune trial of one worker trains in the trial's own process: no TorchTrainer controller and no worker group to
start (each a Ray actor of its own that imports torch and pyseg; together most of a trial's start-up and of its
memory). Trials of several workers drive a TorchTrainer (pyseg.distributed.ray_train.fit_with_ray).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyseg.config import TrainConfig
from pyseg.distributed.ray_train import CHECKPOINT_FILE, RayReportHook, RestartMessageHook, trial_device
from pyseg.engine.trainer import Hook, Trainer, default_hooks
from pyseg.storage import StorageSyncHook, remove_staged, stage, staging_folder
from pyseg.tracking import MlflowHook, TrackingConfig


class TuneReportHook(RayReportHook):
    """Reports every epoch's numbers to Tune. With checkpoint_every N (PBT: its perturbation interval), every N-th
    epoch's report and the last carry weights/last.pt as the trial's Tune checkpoint; without, none does (a trial
    Tune starts again continues from its own folder)."""

    def __init__(self, checkpoint_every: int = 0, epochs: int = 0):
        super().__init__()
        self.checkpoint_every, self.epochs = checkpoint_every, epochs

    def wants_checkpoint(self, trainer: Trainer, epoch: int) -> bool:
        every = self.checkpoint_every
        return bool(every) and (epoch % every == 0 or epoch >= self.epochs)

    def send(self, metrics: dict, checkpoint_folder: Path | None, epoch: int) -> None:
        import ray.tune

        checkpoint = None if checkpoint_folder is None else ray.tune.Checkpoint.from_directory(str(checkpoint_folder))
        ray.tune.report(metrics, checkpoint=checkpoint)


def train_in_trial(
    cfg: TrainConfig,
    tracking: TrackingConfig,
    *,
    extra_hooks: Sequence[Hook] = (),
    cpus: float = 1.0,
    checkpoint_every: int = 0,
    config_overrides: dict | None = None,
    storage: str = "",
    search_started_at: float = 0.0,
) -> None:
    """Trains cfg (its run folder project/name; cfg.resume continues it from weights/last.pt) in this Tune trial's
    process, on the GPU Ray gave the trial or on CPU, reporting every epoch to Tune. storage: the URI that keeps
    the run folder (nodes share no disk); the run then trains in a staging copy on this node. A run that continues
    a checkpoint written since search_started_at (Tune restarted the trial after a failure) says so, with the time
    lost."""
    import torch

    if cfg.threads == 0:
        torch.set_num_threads(max(int(cpus), 1))
    if storage:  # the storage holds the truth: a copy left on this node by a killed trial may be stale
        cfg = cfg.updated(project=str(staging_folder(storage)))
        stage(storage, Path(cfg.project) / cfg.name)
    run_dir = Path(cfg.project) / cfg.name
    report = TuneReportHook(checkpoint_every, cfg.epochs)
    hooks = default_hooks() + [MlflowHook(tracking), *extra_hooks]
    hooks += [StorageSyncHook(storage)] if storage else []
    hooks.append(report)
    if cfg.resume:
        hooks.append(RestartMessageHook(str(run_dir / "weights" / CHECKPOINT_FILE), search_started_at))
    trainer = Trainer(cfg, hooks, show_progress=False, device=trial_device(), config_overrides=config_overrides)
    trainer.fit()
    if report.reports == 0:
        report.report_finished_run(trainer)
    if storage:  # everything is in the storage: the node keeps no copy
        remove_staged(run_dir)
