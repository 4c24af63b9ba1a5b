"""A Tune trial of one worker trains in the trial's own process: no TorchTrainer controller and no worker group to
start (each a Ray actor of its own that imports torch and pyseg; together most of a trial's start-up and of its
memory). Trials of several workers drive a TorchTrainer (pyseg.distributed.ray_train.fit_with_ray).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyseg.config import TrainConfig
from pyseg.distributed.ray_train import RayReportHook, RestartMessageHook
from pyseg.distributed.storage import remove_staged
from pyseg.distributed.tracking import TrackingConfig
from pyseg.distributed.worker import build_hooks, checkpoint_due, stage_run_folder, worker_device
from pyseg.engine.run_files import LAST_CHECKPOINT, WEIGHTS_DIR
from pyseg.engine.trainer import Hook, Trainer


class TuneReportHook(RayReportHook):
    """Reports every epoch's numbers to Tune. With checkpoint_every N (PBT: its perturbation interval), every N-th
    epoch's report and the last carry weights/last.pt as the trial's Tune checkpoint; without, none does (a trial
    Tune starts again continues from its own folder)."""

    def __init__(self, checkpoint_every: int = 0, epochs: int = 0):
        super().__init__()
        self.checkpoint_every, self.epochs = checkpoint_every, epochs

    def wants_checkpoint(self, trainer: Trainer, epoch: int) -> bool:
        return checkpoint_due(epoch, self.checkpoint_every, self.epochs)

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
    cfg = stage_run_folder(cfg, storage)
    run_dir = Path(cfg.project) / cfg.name
    report = TuneReportHook(checkpoint_every, cfg.epochs)
    hooks = build_hooks(tracking, extra_hooks, storage, report)
    if cfg.resume:
        hooks.append(RestartMessageHook(str(run_dir / WEIGHTS_DIR / LAST_CHECKPOINT), search_started_at))
    device = worker_device(cfg.device, "the trial", train_worker=False)
    trainer = Trainer(cfg, hooks, show_progress=False, device=device, cpus=cpus, config_overrides=config_overrides)
    trainer.fit()
    if report.reports == 0:
        report.report_finished_run(trainer)
    if storage:  # everything is in the storage: the node keeps no copy
        remove_staged(run_dir)
