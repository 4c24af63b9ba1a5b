"""The training loop: plain train_one_epoch / evaluate functions, and a Trainer that runs them with ordered hooks.

An epoch has two halves, and a run killed at any moment resumes without losing or repeating either:
1. train: train_one_epoch, then `on_train_epoch_end` (CheckpointHook writes weights/last.pt marked
   "trained", holding this epoch's training metrics);
2. finish: validation when due, the early-stopping bookkeeping, then `on_epoch_end` in hook order: ResultsHook
   (results.csv row), CheckpointHook (best.pt when better, last.pt marked "finished"), then extra hooks
   (MLflow, Ray reports) that expect both on disk.
`--resume` from a "trained" last.pt runs the finish half of that epoch again (same EMA weights, same row), so
results.csv holds exactly one row per epoch. Only rank 0 writes files.
"""

from __future__ import annotations

import csv
import io
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pyseg.config import TrainConfig, canonical_model_name, make_config
from pyseg.data.dataset import SegDataset
from pyseg.data.dataset_config import DatasetConfig, resolve_dataset
from pyseg.data.labels import SplitLabels, load_split, report_problems
from pyseg.data.loader import MASK_RATIO, SegCollate, build_dataloader, polygon_masks
from pyseg.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from pyseg.engine.coco_eval import METRIC_KEYS, CocoEvaluator
from pyseg.engine.console import EpochTable
from pyseg.engine.device import autocast_dtype, cpu_threads, masks_made_by_loader, select_device, to_device
from pyseg.engine.loss import SegLoss
from pyseg.engine.optim import ModelEMA, apply_schedule, build_optimizer, resolve_optimizer
from pyseg.engine.plots import plot_results
from pyseg.engine.predict import detect, masks_in_input, to_original
from pyseg.engine.run_files import BEST_CHECKPOINT, BEST_METRIC, LAST_CHECKPOINT, WEIGHTS_DIR
from pyseg.errors import ConfigError, UserError
from pyseg.files import FolderLock, atomic_write_text, kill_point, remove_stale_temporaries
from pyseg.ops import device_errors
from pyseg.ops.device_errors import deferred_device_checks

PHASE_TRAINED = "trained"  # last.pt after the training half of its epoch: validation and results row still due
PHASE_FINISHED = "finished"  # last.pt after the whole epoch
DATA_PROBLEMS_FILE = "data_problems.txt"  # every problem verification found in the run's data, one per line
PLOT_CONF = 0.25  # val_predictions.jpg draws detections above this score (validation keeps down to cfg.conf)
REFERENCE_IMGSZ = 640  # model size is reported in GFLOPs at this input size, the one model tables quote
RUN_OUTPUTS = ("results.csv", "weights/last.pt", "weights/best.pt")  # what --exist-ok must never overwrite


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message holds the loss parts and the batch's image paths."""


def step_values(loss: torch.Tensor, parts: dict[str, torch.Tensor], device: torch.device) -> tuple[float, dict]:
    """The loss and its parts as floats, with the device error flag of pyseg's CUDA ops: one host copy per step.

    Raises ValueError when a CUDA op of this step met bad input values (see pyseg.ops.device_errors).
    """
    flag = device_errors.error_flag(device)
    values = [loss.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in parts.values())]
    if flag is not None:
        values.append(flag.float().reshape(()))
    host = torch.stack(values).tolist()
    if flag is not None and host[-1]:
        device_errors.check_device_errors(device)
    return host[0], dict(zip(parts, host[1 : 1 + len(parts)], strict=True))


def train_one_epoch(
    model,
    loader,
    loss_fn: SegLoss,
    optimizer,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    *,
    ema: ModelEMA | None = None,
    scaler=None,
    autocast=None,
    iteration: int = 0,
    accumulate: int = 1,
    show_progress: bool = True,
    make_masks: bool = False,
) -> dict:
    """One pass over loader; returns mean losses, images/s, seconds and the iteration count after the epoch.

    make_masks: rasterize the ground-truth masks here, on device, from the batch's polygons (the loader did not).
    """
    model.train()
    iterations_per_epoch = len(loader)
    totals: dict[str, float] = {}
    images_seen, start = 0, time.perf_counter()
    bar = tqdm(
        loader,
        total=iterations_per_epoch,
        disable=not show_progress,
        leave=False,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        dynamic_ncols=True,
    )
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(bar):
        apply_schedule(optimizer, cfg, iteration, iterations_per_epoch)
        batch = to_device(batch, device)
        with deferred_device_checks():  # pyseg's CUDA ops report bad values through a flag, read below
            if make_masks:
                batch.update(polygon_masks(batch, MASK_RATIO, cfg.overlap_mask))
            images = batch["images"].float().div_(255.0)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast or nullcontext():
                outputs = model(images)
                loss, parts = loss_fn(outputs, batch)
        loss_value, parts = step_values(loss, parts, device)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, batch {step}: {parts}; images: {batch['paths']}"
            )
        (scaler.scale(loss) if scaler else loss).backward()
        if (step + 1) % accumulate == 0 or step + 1 == iterations_per_epoch:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
        iteration += 1
        images_seen += images.shape[0]
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value
        rate = images_seen / (time.perf_counter() - start)
        postfix = {k: f"{v / (step + 1):.3f}" for k, v in totals.items()}
        postfix.update(inst=int(batch["classes"].numel()), img_s=f"{rate:.1f}")
        if device.type == "cuda":
            postfix["mem"] = f"{torch.cuda.max_memory_reserved(device) / 2**30:.1f}G"
        bar.set_postfix(postfix)
    seconds = time.perf_counter() - start
    means = {f"train/{k}": v / max(iterations_per_epoch, 1) for k, v in totals.items()}
    return {**means, "images_per_s": images_seen / seconds, "epoch_seconds": seconds, "iteration": iteration}


@torch.no_grad()
def evaluate(
    model, loader, evaluator: CocoEvaluator, cfg: TrainConfig, device: torch.device, show_progress: bool = True
) -> dict:
    """COCO box and mask metrics of model on a letterboxed (augmentation-free) loader.

    The evaluator must be built from the same image list as loader.dataset (image ids are list positions); its
    ground truth is reused, its detections are consumed. Also returns metrics["detections"]: the number of
    detections kept and their mean score.
    """
    model.eval()
    evaluator.reset()  # detections of an interrupted earlier pass
    count, score_sum = 0, 0.0
    image_ids = {item.image: index for index, item in enumerate(loader.dataset.images)}  # the evaluator's images
    for batch in tqdm(loader, disable=not show_progress, leave=False, desc="val", dynamic_ncols=True):
        images = batch["images"].to(device).float().div_(255.0)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = model(images)
        detections = detect(outputs, model.strides, model.reg_max, cfg.conf, cfg.iou, cfg.max_det)
        masks = masks_in_input(outputs.protos.float(), detections, tuple(images.shape[2:]))
        for i, det in enumerate(detections):
            count += int(det.scores.numel())
            score_sum += float(det.scores.float().sum())
            boxes, full_masks = to_original(det.boxes, masks[i], batch["ratio_pads"][i], batch["orig_sizes"][i])
            evaluator.add(
                image_ids[batch["paths"][i]],
                boxes,
                det.scores.float().cpu().numpy(),
                det.classes.cpu().numpy(),
                full_masks,
            )
    metrics = evaluator.evaluate()
    metrics["detections"] = {"count": count, "mean_score": score_sum / max(count, 1)}
    return metrics


def flat_metrics(metrics: dict) -> dict:
    """The results.csv columns of an evaluation."""
    flat = {f"{kind}/{key}": float(metrics[kind][key]) for kind in ("box", "mask") for key in METRIC_KEYS}
    flat["val/detections"] = float(metrics["detections"]["count"])
    flat["val/mean_score"] = float(metrics["detections"]["mean_score"])
    return flat


# ------------------------------------------------------------------ hooks


# what --resume needs from a checkpoint besides CHECKPOINT_KEYS (a pyseg last.pt holds all of it)
RESUME_KEYS = ("model", "ema", "ema_updates", "optimizer", "epoch", "iteration", "best_fitness", "best_epoch", "rng")


class Hook:
    """Extras plugged into Trainer.fit; each event runs the hooks in list order."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...


RESULTS_PLOT_INTERVAL_S = 30.0  # results.png is redrawn at most this often between its first and last epoch


class ResultsHook(Hook):
    """results.csv (one row per epoch, rewritten atomically; a repeated epoch replaces its row) and results.png,
    drawn after the first epoch, the last one (and an early stop) and otherwise at most every
    RESULTS_PLOT_INTERVAL_S seconds: a drawing costs about a second of CPU, more than a small epoch."""

    def __init__(self):
        self.drawn_at: float | None = None  # time.monotonic() of the last drawing
        self.drawn_epoch = 0  # the last epoch results.png shows
        self.written_epoch = 0  # the last epoch results.csv holds

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if not trainer.is_main:
            return
        path = trainer.run_dir / "results.csv"
        rows = [r for r in read_results(path) if int(r["epoch"]) < row["epoch"]]
        rows.append(dict(row))
        columns = list(dict.fromkeys(key for r in rows for key in r))  # epochs without validation leave blanks
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        self.written_epoch = row["epoch"]
        last = row["epoch"] >= trainer.cfg.epochs or trainer.stop
        if self.drawn_at is None or last or time.monotonic() - self.drawn_at >= RESULTS_PLOT_INTERVAL_S:
            self.draw(path)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.is_main and self.drawn_epoch != self.written_epoch:  # stopped by a later hook (a search)
            self.draw(trainer.run_dir / "results.csv")

    def draw(self, path: Path) -> None:
        plot_results(path)
        self.drawn_at, self.drawn_epoch = time.monotonic(), self.written_epoch


class CheckpointHook(Hook):
    """weights/last.pt after each half of an epoch; best.pt when validation improved (or every epoch without
    validation); weights/epochN.pt every save_period epochs."""

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.is_main:
            save_checkpoint(trainer.weights_dir / LAST_CHECKPOINT, trainer.checkpoint_state(PHASE_TRAINED))

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if not trainer.is_main:
            return
        state = trainer.checkpoint_state(PHASE_FINISHED)
        if trainer.improved:
            save_checkpoint(trainer.weights_dir / BEST_CHECKPOINT, state)
        period = trainer.cfg.save_period
        if period and (trainer.epoch + 1) % period == 0:
            save_checkpoint(trainer.weights_dir / f"epoch{trainer.epoch + 1}.pt", state)
        save_checkpoint(trainer.weights_dir / LAST_CHECKPOINT, state)


class PlotsHook(Hook):
    """train_batch.jpg (the first augmented batch with its masks) and val_predictions.jpg (labels | predictions of
    the best epoch's model, drawn whenever validation improves, so that a run stopped early has it too; without
    validation, of the final model)."""

    def __init__(self):
        self.drew_best = False

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.is_main:
            from pyseg.engine.plots import plot_batch

            trainer.train_loader.sampler.set_epoch(trainer.start_epoch)
            plot_batch(
                next(iter(trainer.train_loader)),
                list(trainer.dataset_config.names),
                trainer.run_dir / "train_batch.jpg",
            )

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if trainer.is_main and trainer.improved and trainer.cfg.val:
            self.draw_predictions(trainer)
            self.drew_best = True

    def on_fit_end(self, trainer: Trainer) -> None:
        if not self.drew_best:
            self.draw_predictions(trainer)

    def draw_predictions(self, trainer: Trainer) -> None:
        if trainer.is_main:
            from pyseg.engine.plots import plot_predictions

            plot_predictions(
                trainer.ema.module,
                next(iter(trainer.val_loader)),
                list(trainer.dataset_config.names),
                trainer.run_dir / "val_predictions.jpg",
                conf=max(trainer.cfg.conf, PLOT_CONF),
            )


def default_hooks() -> list[Hook]:
    return [ResultsHook(), CheckpointHook(), PlotsHook()]


def read_results(path: Path) -> list[dict]:
    """The rows of a results.csv ([] when there is none)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse_number(text) -> int | float | None:
    """A results.csv cell as a number: int when it is one, else float (nan included); None when it is neither."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return None


# ------------------------------------------------------------------ run folders


def unique_run_dir(project: str, name: str, exist_ok: bool) -> Path:
    """project/name; without exist_ok, the first free of name, name2, name3, ...

    With exist_ok, a folder that already holds a run's results or weights is refused (ConfigError saying what
    would be lost and how to keep it): pyseg never overwrites a run unless the user removes it.
    """
    base = Path(project) / name
    if exist_ok or not base.exists():
        if exist_ok:
            refuse_to_overwrite(base)
        return base
    for n in range(2, 10_000):
        candidate = Path(project) / f"{name}{n}"
        if not candidate.exists():
            return candidate
    raise ConfigError(f"no free run folder name under {project}: pass another --name")


def refuse_to_overwrite(run_dir: Path) -> None:
    found = [name for name in RUN_OUTPUTS if (run_dir / name).is_file()]
    if not found:
        return
    epochs = len(read_results(run_dir / "results.csv"))
    what = ", ".join(f"{name} ({epochs} epochs)" if name == "results.csv" else name for name in found)
    raise ConfigError(
        f"--exist-ok: {run_dir} already holds a run ({what}); training into it would overwrite them. Continue it "
        f"with --resume --name {run_dir.name}, leave out --exist-ok to train into a new folder "
        f"({run_dir.name}2, ...), or move {run_dir} away first if you really want to replace it."
    )


# ------------------------------------------------------------------ trainer


@dataclass
class RunData:
    """What build_data builds: the dataset, its verified splits, the loaders and the evaluator (rank 0, with val)."""

    dataset_config: DatasetConfig
    train_split: SplitLabels
    val_split: SplitLabels
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    evaluator: CocoEvaluator | None
    batch_per_rank: int
    loader_makes_masks: bool


class Trainer:
    """Runs training for a TrainConfig: data, model, loss, optimizer, EMA, hooks, checkpoints, resume.

    Data-parallel use (pyseg.distributed): one Trainer per process with its rank and world_size, the process group
    already initialized, device set to the process's device and wrap_model wrapping the model (e.g. in DDP).
    cfg.batch is the total batch; each rank takes cfg.batch // world_size. resume_from loads a checkpoint file
    (e.g. one restored by Ray) instead of project/name/weights/last.pt. cpus: the CPUs Ray gave the process.
    """

    # set by __init__
    cfg: TrainConfig
    hooks: list[Hook]
    rank: int
    world_size: int
    is_main: bool
    show_progress: bool
    device: torch.device | None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None
    resume_from: Path | None
    # progress, saved in checkpoints
    epoch: int  # the current (0-based) epoch
    start_epoch: int  # the first epoch this process trains
    iteration: int  # optimizer schedule position: batches seen since the start of the run
    best_fitness: float  # best mask mAP50-95 so far (-1 before the first validation)
    best_epoch: int  # its epoch (0-based; -1 before any)
    validations_since_best: int  # validations without improvement: early stopping counts these
    improved: bool  # this epoch's weights are the new best.pt
    stop: bool  # set by early stopping or a hook: end after this epoch
    pending_train: dict | None  # the training metrics of an epoch trained but not finished (resume)
    # built by setup(); also every field of RunData (dataset_config, the splits, the loaders, the evaluator, ...)
    run_dir: Path
    weights_dir: Path
    model: torch.nn.Module
    train_model: torch.nn.Module  # model as trained: wrapped (DDP) and/or compiled
    loss_fn: SegLoss
    optimizer: torch.optim.Optimizer
    accumulate: int  # batches per optimizer step (nominal batch nbs)
    ema: ModelEMA
    autocast: torch.autocast | None
    scaler: torch.amp.GradScaler | None

    def __init__(
        self,
        cfg: TrainConfig,
        hooks: list[Hook] | None = None,
        rank: int = 0,
        world_size: int = 1,
        show_progress: bool = True,
        device: torch.device | None = None,
        wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        resume_from: Path | None = None,
        config_overrides: dict | None = None,
        cpus: float | None = None,
    ):
        self.cfg = cfg
        self.cpus = cpus  # the CPUs Ray gave this process (torch's threads when --threads is 0); None: not on Ray
        # on resume, values that replace the checkpoint's own (a PBT trial continues another trial's checkpoint
        # with its own, perturbed hyperparameters)
        self.config_overrides = dict(config_overrides or {})
        self.hooks = default_hooks() if hooks is None else hooks
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        # progress bars only where they redraw in place (a terminal); a log gets the epoch rows alone
        self.show_progress = show_progress and sys.stderr.isatty()
        self.device, self.wrap_model = device, wrap_model
        self.table, self.table_started = EpochTable(cfg.epochs), False
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.epoch = self.start_epoch = self.iteration = 0
        self.restored_saved_at: float | None = None  # when the checkpoint this run continues from was written
        self.best_fitness, self.best_epoch, self.validations_since_best = -1.0, -1, 0
        self.improved = self.stop = False
        self.pending_train = None
        self.evaluator = None
        self.lock: FolderLock | None = None  # held on a resumed run's folder while this process trains it

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        """Every build step, in order; a user error in any of them raises before any training. Each step returns
        what it builds; the config the run trains with is decided here, in the open: the run folder's name, the
        checkpoint's config on resume, the weights' model, the optimizer that `auto` resolves to."""
        self.run_dir, resume_state = self.build_run_dir()
        self.weights_dir = self.run_dir / WEIGHTS_DIR
        self.cfg = self.run_config(resume_state)
        self.table = EpochTable(self.cfg.epochs)  # the run's epochs, not the command line's default
        self.device = self.build_runtime()
        data = self.build_data(resume_state["names"] if resume_state is not None else None)
        vars(self).update(vars(data))  # dataset_config, train_split, ..., loader_makes_masks
        weights = self.build_weights()
        if weights is not None and canonical_model_name(self.cfg.model) != weights.model_name:
            if self.is_main and self.cfg.model != TrainConfig.model:
                print(f"--model {self.cfg.model}: the weights are {weights.model_name}; training {weights.model_name}")
            self.cfg = self.cfg.updated(model=weights.model_name)
        self.model = self.build_model(weights)
        self.loss_fn = self.build_loss()
        self.accumulate, steps = self.build_accumulation()
        optimizer, lr0 = resolve_optimizer(self.cfg.optimizer, self.cfg.lr0, steps)
        if (optimizer, lr0) != (self.cfg.optimizer, self.cfg.lr0):
            if self.is_main:
                print(f"optimizer auto: {optimizer} with lr0 {lr0:g} for {steps} optimizer steps")
            self.cfg = self.cfg.updated(optimizer=optimizer, lr0=lr0)
        self.optimizer = self.build_optimizer()
        self.ema = ModelEMA(self.model, self.cfg.ema_decay)
        self.autocast, self.scaler = self.build_precision()
        self.train_model = self.build_train_model()
        if resume_state is not None:
            self.restore_state(resume_state)
        if self.is_main:
            try:
                self.weights_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ConfigError(
                    f"--project/--name: cannot create {self.weights_dir} ({error.strerror}); pick a writable --project"
                ) from error
            atomic_write_text(self.run_dir / "args.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def build_run_dir(self) -> tuple[Path, dict | None]:
        """(the run folder, the checkpoint state it continues from, or None for a new run). A new run takes the
        first free of name, name2, ...; a resumed one loads last.pt (or resume_from) after removing temporaries
        left by killed writes."""
        cfg = self.cfg
        if not (cfg.resume or self.resume_from is not None):
            return unique_run_dir(cfg.project, cfg.name, cfg.exist_ok), None
        run_dir = Path(cfg.project) / cfg.name
        last = self.resume_from or run_dir / WEIGHTS_DIR / LAST_CHECKPOINT
        if self.resume_from is None and not last.is_file():
            raise ConfigError(
                f"--resume: {run_dir} has no weights/last.pt to continue from; start a new run (leave out "
                "--resume) or give the run's folder with --project/--name, or --resume PATH/TO/last.pt"
            )
        if self.is_main:
            # one process continues a run at a time (a second would remove the first one's live temporaries)
            self.lock = FolderLock(run_dir, "--resume: the run")
            for folder in (run_dir, run_dir / WEIGHTS_DIR):  # checkpoints, and results.csv, args.yaml, ...
                for stale in remove_stale_temporaries(folder):
                    print(f"removed {stale}, left by an interrupted write")
        state = load_checkpoint(last)
        missing = [key for key in RESUME_KEYS if key not in state]
        if missing:
            raise ConfigError(
                f"--resume: {last} holds weights but not the training state a run continues from (no "
                f"{', '.join(missing)}); start a new run from it with --weights {last}"
            )
        return run_dir, state

    def run_config(self, resume_state: dict | None) -> TrainConfig:
        """The config of the run in self.run_dir: the given one named as its folder, or on resume the one its
        checkpoint was trained with (config_overrides replacing its values)."""
        cfg = self.cfg
        if resume_state is None:
            return cfg.updated(name=self.run_dir.name) if self.run_dir.name != cfg.name else cfg
        saved = dict(resume_state["config"])
        saved.update(self.config_overrides)
        saved.update(resume=True, project=cfg.project, name=cfg.name, exist_ok=True)
        return make_config(saved)

    def build_runtime(self) -> torch.device:
        """The device (the one given, else --device); CPU threads, seeds and determinism set for this process."""
        cfg = self.cfg
        device = self.device or select_device(cfg.device)
        threads = cpu_threads(cfg.threads, device, self.cpus)
        if threads:
            torch.set_num_threads(threads)
        seed = cfg.seed + self.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        return device

    def build_data(self, trained_names: list[str] | None = None) -> RunData:
        """Dataset, verified labels of both splits, loaders and the evaluator (ground truth built once per run).

        trained_names: on resume, the classes the run was trained on; the data must have the same ones.
        """
        cfg = self.cfg
        try:
            dataset_config = resolve_dataset(cfg.data)
            names = dataset_config.names
            if trained_names is not None and list(names) != list(trained_names):
                raise ConfigError(
                    f"--data {cfg.data}: its {len(names)} classes ({', '.join(names[:4])}, ...) are not the "
                    f"{len(trained_names)} classes the run was trained on ({', '.join(trained_names[:4])}, ...); a "
                    "resumed run continues on the same classes: give its data, or start a new run with --weights"
                )
            for split in ("train", "val"):
                if split not in dataset_config.splits:
                    raise ConfigError(f"dataset {cfg.data} has no {split!r} split: add `{split}:` to its YAML")
            train_split = load_split(dataset_config.splits["train"], len(names), "train")
            val_split = load_split(dataset_config.splits["val"], len(names), "val")
        except UserError as error:
            if not cfg.resume or trained_names is not None and "classes the run was trained on" in str(error):
                raise
            raise ConfigError(
                f"{error}; if the data moved, point the run at its new place: --resume --name {cfg.name} --data NEW"
            ) from error
        if self.is_main:
            print(train_split.summary())
            print(val_split.summary())
            problems = report_problems([train_split, val_split], self.run_dir / DATA_PROBLEMS_FILE)
            if problems:
                print(f"data problems (each handled as said; the run goes on):\n{problems}")
        for split in (train_split, val_split):
            if not split.images:
                raise ConfigError(f"dataset {cfg.data}: the {split.name} split has no readable images")
        if not train_split.num_instances:
            raise ConfigError(
                f"dataset {cfg.data}: the train split has no labelled instances (every image is a background): "
                "nothing to learn; check that its labels/ folder sits beside images/ and holds YOLO polygon lines"
            )
        loader_makes_masks = masks_made_by_loader(self.device)
        train_set = SegDataset(
            train_split.images,
            cfg.imgsz,
            cfg,
            epochs=cfg.epochs,
            seed=cfg.seed,
            cache_images=cfg.cache_images,
            buffer_mb=cfg.buffer_mb,
        )
        val_set = SegDataset(val_split.images, cfg.imgsz, None, cache_images=cfg.cache_images)
        batch_per_rank = max(cfg.batch // self.world_size, 1)
        if self.is_main and cfg.batch % self.world_size:
            print(f"batch {cfg.batch} does not split evenly over {self.world_size} ranks: {batch_per_rank} each")
        train_loader = build_dataloader(
            train_set,
            batch_per_rank,
            workers=cfg.workers,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            collate=SegCollate(MASK_RATIO, cfg.overlap_mask, make_masks=loader_makes_masks),
        )
        val_loader = build_dataloader(
            val_set, cfg.batch, workers=cfg.workers, shuffle=False, collate=SegCollate(make_masks=False)
        )
        evaluator = CocoEvaluator(val_split.images, list(names)) if self.is_main and cfg.val else None
        return RunData(
            dataset_config, train_split, val_split, train_loader, val_loader, evaluator, batch_per_rank,
            loader_makes_masks,
        )  # fmt: skip

    def build_weights(self):
        """The checkpoint of --weights (a pyseg or Ultralytics file, loaded safely) that a new run starts from;
        None without --weights and on resume (the run's own checkpoint holds its weights)."""
        from pyseg.models.weights import load_weights

        return load_weights(self.cfg.weights) if self.cfg.weights and not self.cfg.resume else None

    def build_model(self, weights=None) -> torch.nn.Module:
        """The model on the device: from weights when given (its architecture, every tensor that fits the data's
        classes), else cfg.model from scratch; channels_last, SyncBatchNorm."""
        from pyseg.models import build_model, model_info
        from pyseg.models.weights import build_from_weights

        cfg, names = self.cfg, self.dataset_config.names
        if weights is not None:
            model, loaded = build_from_weights(weights, len(names))
            model = model.to(self.device)
            if self.is_main:
                print(loaded)
                if weights.nc == len(names) and list(weights.names) != list(names):
                    print(
                        f"note: the weights' classes ({', '.join(weights.names[:4])}, ...) are not the data's "
                        f"({', '.join(names[:4])}, ...); class k of the data starts from the weights' class k"
                    )
        else:
            model = build_model(cfg.model, len(names)).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.world_size > 1:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.is_main:
                print("sync_bn: SyncBatchNorm needs CUDA; BatchNorm statistics stay per rank on CPU")
        if self.is_main:
            info = model_info(model, REFERENCE_IMGSZ)
            print(
                f"{cfg.model}: {info['parameters'] / 1e6:.2f} M parameters, {info['gflops']:.1f} GFLOPs at "
                f"{REFERENCE_IMGSZ}"
            )
        return model

    def build_loss(self) -> SegLoss:
        cfg = self.cfg
        gains = {"box": cfg.box, "cls": cfg.cls, "dfl": cfg.dfl, "mask": cfg.mask}
        return SegLoss(len(self.dataset_config.names), self.model.reg_max, self.model.strides, gains, cfg.overlap_mask)

    def build_accumulation(self) -> tuple[int, int]:
        """(batches per optimizer step, to the nominal batch cfg.nbs; optimizer steps in the whole run)."""
        cfg = self.cfg
        total_batch = self.batch_per_rank * self.world_size
        accumulate = max(round(cfg.nbs / total_batch), 1)
        # an epoch steps every `accumulate` batches and once more for a remainder at its end
        steps = cfg.epochs * math.ceil(math.ceil(len(self.train_loader.dataset) / total_batch) / accumulate)
        return accumulate, steps

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer cfg names (auto already resolved), weight decay scaled to the batch and accumulation."""
        cfg = self.cfg
        total_batch = self.batch_per_rank * self.world_size
        weight_decay = cfg.weight_decay * total_batch * self.accumulate / cfg.nbs
        return build_optimizer(self.model, cfg.optimizer, cfg.lr0, cfg.momentum, weight_decay)

    def build_precision(self) -> tuple[torch.autocast | None, torch.amp.GradScaler | None]:
        """(autocast context, gradient scaler) of --amp on this device: none on the CPU, a scaler for float16."""
        amp_dtype = autocast_dtype(self.device, self.cfg.amp)
        autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else None
        return autocast, torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def build_train_model(self) -> torch.nn.Module:
        """The model as trained: wrapped (DDP on Ray) and/or compiled (--compile)."""
        model = self.wrap_model(self.model) if self.wrap_model else self.model
        return torch.compile(model) if self.cfg.compile else model

    def restore_state(self, state: dict) -> None:
        """Weights, EMA, optimizer, scaler, schedule position, best-so-far and RNG from a checkpoint."""
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.best_fitness, self.best_epoch = state["best_fitness"], state["best_epoch"]
        self.validations_since_best = state.get("validations_since_best", 0)
        self.stop = state.get("stopped_early", False)
        if state.get("phase", PHASE_FINISHED) == PHASE_TRAINED:
            self.start_epoch = state["epoch"]  # trained, not finished: finish it first
            self.pending_train = dict(state["train_metrics"])
        else:
            self.start_epoch = state["epoch"] + 1
        restore_rng_state(state["rng"])
        self.restored_saved_at = state.get("saved_at")

    def checkpoint_state(self, phase: str) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,  # 0-based
            "phase": phase,  # PHASE_TRAINED or PHASE_FINISHED
            "train_metrics": self.pending_train,  # PHASE_TRAINED: the row's training half
            "iteration": self.iteration,
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "validations_since_best": self.validations_since_best,
            "stopped_early": self.stop,
            "config": self.cfg.to_dict(),
            "names": list(self.dataset_config.names),
            "saved_at": time.time(),  # wall clock, s: a restart after a failure says how much time it lost
            "model_name": self.cfg.model,
            "rng": rng_state(),
        }

    # ---------------------------------------------------------------- loop

    def fit(self) -> Path:
        """Trains (or resumes) to cfg.epochs; returns the run folder."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> Path:
        self.setup()
        cfg = self.cfg
        if self.pending_train is None and (self.start_epoch >= cfg.epochs or self.stop):
            why = "stopped early" if self.stop else f"finished {cfg.epochs} epochs"
            print(f"{self.run_dir} already {why}; nothing to resume (start a new run instead)")
            return self.run_dir
        for hook in self.hooks:
            hook.on_fit_start(self)
        for epoch in range(self.start_epoch, cfg.epochs):
            self.epoch = epoch
            if self.pending_train is None:
                self.train_epoch()
            self.finish_epoch()
            if self.stop:
                break
        for hook in self.hooks:
            hook.on_fit_end(self)
        return self.run_dir

    def train_epoch(self) -> None:
        """The training half of self.epoch; leaves its metrics in pending_train."""
        self.train_loader.sampler.set_epoch(self.epoch)
        train = train_one_epoch(
            self.train_model,
            self.train_loader,
            self.loss_fn,
            self.optimizer,
            self.cfg,
            self.epoch,
            self.device,
            ema=self.ema,
            scaler=self.scaler,
            autocast=self.autocast,
            iteration=self.iteration,
            accumulate=self.accumulate,
            show_progress=self.show_progress and self.is_main,
            make_masks=not self.loader_makes_masks,
        )
        self.iteration = train.pop("iteration")
        self.pending_train = {**train, "lr": self.optimizer.param_groups[0]["lr"]}
        kill_point("train-end")
        for hook in self.hooks:
            hook.on_train_epoch_end(self)

    def validation_due(self) -> bool:
        cfg = self.cfg
        return cfg.val and ((self.epoch + 1) % cfg.val_period == 0 or self.epoch + 1 == cfg.epochs)

    def finish_epoch(self) -> None:
        """The second half of self.epoch: validation when due, best/early-stopping bookkeeping, the epoch hooks."""
        cfg = self.cfg
        validated = self.validation_due()
        metrics = {}
        if validated and self.is_main:
            kill_point("validation")
            metrics = flat_metrics(
                evaluate(self.ema.module, self.val_loader, self.evaluator, cfg, self.device, self.show_progress)
            )
        if validated:
            fitness = metrics.get(BEST_METRIC, -1.0)
            self.improved = fitness > self.best_fitness or self.best_epoch < 0
            if self.improved:
                self.best_fitness, self.best_epoch, self.validations_since_best = fitness, self.epoch, 0
            else:
                self.validations_since_best += 1
        else:
            self.improved = not cfg.val  # without validation best.pt is the latest epoch
        metrics = self._share_evaluation(metrics)
        if validated and cfg.patience and self.validations_since_best >= cfg.patience:
            self.stop = True
            if self.is_main:
                print(
                    f"early stopping: no better mask mAP50-95 in {cfg.patience} validations (best "
                    f"{self.best_fitness:.4f} at epoch {self.best_epoch + 1})"
                )
        train = dict(self.pending_train)
        lr = train.pop("lr")
        row = {
            "epoch": self.epoch + 1,
            **{k: round(v, 5) for k, v in train.items()},
            **{k: round(v, 5) for k, v in metrics.items()},
            "lr": lr,
        }
        if self.is_main:
            if not self.table_started:
                print(self.table.header())
                self.table_started = True
            print(self.table.row(row), flush=True)
        self.pending_train = None
        for hook in self.hooks:
            hook.on_epoch_end(self, row)
        kill_point("epoch-end")

    def _share_evaluation(self, metrics: dict) -> dict:
        """Rank 0 evaluates; the other ranks wait here and receive its metrics and best-so-far bookkeeping."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return metrics
        shared = [metrics, self.best_fitness, self.best_epoch, self.improved, self.validations_since_best]
        torch.distributed.broadcast_object_list(shared, src=0)
        metrics, self.best_fitness, self.best_epoch, self.improved, self.validations_since_best = shared
        return metrics
