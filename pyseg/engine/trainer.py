"""The training loop: plain train_one_epoch / evaluate functions, and a Trainer that runs them with ordered hooks.

Hooks run in list order at each event (on_fit_start, on_train_epoch_end, on_epoch_end, on_fit_end); the default
order is checkpoint (last.pt right after training, best.pt after evaluation), results writer, early stopping.
Only rank 0 writes files.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pyseg.config import TrainConfig
from pyseg.data.dataset import AugmentConfig, SegDataset
from pyseg.data.dataset_config import DatasetConfig, resolve_dataset
from pyseg.data.labels import load_split
from pyseg.data.loader import SegCollate, build_dataloader, polygon_masks
from pyseg.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from pyseg.engine.coco_eval import CocoEvaluator
from pyseg.engine.loss import SegLoss
from pyseg.engine.optim import ModelEMA, apply_schedule, build_optimizer
from pyseg.engine.predict import detect, masks_in_input, to_original

METRIC_KEYS = ("precision", "recall", "map50", "map")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message holds the loss parts and the batch's image paths."""


def select_device(device: str) -> torch.device:
    if device in ("", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.isdigit():
        device = f"cuda:{device}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    return torch.device(device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    make_masks_on_device: bool = False,
) -> dict:
    """One pass over loader; returns mean losses, images/s, seconds and the iteration count after the epoch."""
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
        if make_masks_on_device:
            batch.update(polygon_masks(batch, cfg.mask_ratio, cfg.overlap_mask))
        images = batch["images"].float().div_(255.0)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast or nullcontext():
            outputs = model(images)
            loss, parts = loss_fn(outputs, batch)
        if not math.isfinite(float(loss.detach())):
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

    The evaluator must be built from the same image list as loader.dataset (image ids are list positions).
    Also returns metrics["detections"]: the number of detections kept and their mean score.
    """
    model.eval()
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


class Hook:
    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...


class CheckpointHook(Hook):
    """weights/last.pt after every training epoch; weights/best.pt when mask mAP50-95 improves."""

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.is_main:
            save_checkpoint(trainer.weights_dir / "last.pt", trainer.checkpoint_state())
            period = trainer.cfg.save_period
            if period and (trainer.epoch + 1) % period == 0:
                save_checkpoint(trainer.weights_dir / f"epoch{trainer.epoch + 1}.pt", trainer.checkpoint_state())

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if not trainer.is_main:
            return
        state = trainer.checkpoint_state()  # again, now with this epoch's evaluation in best_fitness
        save_checkpoint(trainer.weights_dir / "last.pt", state)
        if trainer.improved:
            save_checkpoint(trainer.weights_dir / "best.pt", state)


class ResultsHook(Hook):
    """results.csv (one row per epoch) and results.png."""

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if not trainer.is_main:
            return
        path = trainer.run_dir / "results.csv"
        rows = []
        if path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < row["epoch"]]
        rows.append(dict(row))
        columns = list(dict.fromkeys(key for r in rows for key in r))  # epochs without validation leave blanks
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        plot_results(path)


class EarlyStoppingHook(Hook):
    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        patience = trainer.cfg.patience
        if patience and trainer.epoch - trainer.best_epoch >= patience:
            trainer.stop = True
            if not trainer.is_main:
                return
            print(
                f"early stopping: no better mask mAP50-95 for {patience} epochs (best {trainer.best_fitness:.4f} at "
                f"epoch {trainer.best_epoch + 1})"
            )


class PlotsHook(Hook):
    """train_batch.jpg (the first augmented batch with its masks) and val_predictions.jpg (labels | predictions)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.is_main:
            from pyseg.engine.plots import plot_batch

            trainer.train_loader.sampler.set_epoch(trainer.start_epoch)
            plot_batch(
                next(iter(trainer.train_loader)),
                list(trainer.dataset_config.names),
                trainer.run_dir / "train_batch.jpg",
            )

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.is_main:
            from pyseg.engine.plots import plot_predictions

            plot_predictions(
                trainer.ema.module,
                next(iter(trainer.val_loader)),
                list(trainer.dataset_config.names),
                trainer.run_dir / "val_predictions.jpg",
                conf=max(trainer.cfg.conf, 0.25),
            )


def plot_results(csv_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("epoch",)]
    columns = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / columns), columns, figsize=(16, 3 * math.ceil(len(keys) / columns)))
    epochs = [int(r["epoch"]) for r in rows]
    for ax, key in zip(np.ravel(axes), keys, strict=False):
        points = [(e, float(r[key])) for e, r in zip(epochs, rows, strict=True) if r.get(key) not in ("", None)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key, fontsize=9)
    for ax in np.ravel(axes)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(csv_path.with_suffix(".png"), dpi=100)
    plt.close(fig)


def default_hooks() -> list[Hook]:
    return [CheckpointHook(), ResultsHook(), EarlyStoppingHook(), PlotsHook()]


# ------------------------------------------------------------------ trainer


def unique_run_dir(project: str, name: str, exist_ok: bool) -> Path:
    base = Path(project) / name
    if exist_ok or not base.exists():
        return base
    for n in range(2, 10_000):
        candidate = Path(project) / f"{name}{n}"
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"no free run folder name under {project}")


@dataclass
class Trainer:
    """Runs training for a TrainConfig: data, model, loss, optimizer, EMA, hooks, checkpoints, resume.

    Data-parallel use (pyseg.distributed): one Trainer per process with its rank and world_size, the process group
    already initialized, device set to the process's device and wrap_model wrapping the model (e.g. in DDP).
    cfg.batch is the total batch; each rank takes cfg.batch // world_size. resume_from loads a checkpoint file
    (e.g. one restored by Ray) instead of project/name/weights/last.pt.
    """

    cfg: TrainConfig
    hooks: list[Hook] = field(default_factory=default_hooks)
    rank: int = 0
    world_size: int = 1
    show_progress: bool = True
    device: torch.device | None = None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    resume_from: Path | None = None

    def __post_init__(self):
        self.is_main = self.rank == 0
        self.stop = False
        self.epoch = 0
        self.start_epoch = 0
        self.iteration = 0
        self.best_fitness = -1.0
        self.best_epoch = -1
        self.improved = False

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        resume_state = None
        if cfg.resume or self.resume_from is not None:
            self.run_dir = Path(cfg.project) / cfg.name
            last = self.resume_from or self.run_dir / "weights" / "last.pt"
            resume_state = load_checkpoint(last)
            saved = dict(resume_state["config"])
            saved.update(resume=True, project=cfg.project, name=cfg.name, exist_ok=True)
            self.cfg = cfg = TrainConfig(**saved)
        else:
            self.run_dir = unique_run_dir(cfg.project, cfg.name, cfg.exist_ok)
        self.weights_dir = self.run_dir / "weights"
        self.device = self.device or select_device(cfg.device)
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._seed(cfg.seed + self.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.dataset_config: DatasetConfig = resolve_dataset(cfg.data)
        names = self.dataset_config.names
        train_split = load_split(self.dataset_config.splits["train"], len(names), "train")
        val_split = load_split(self.dataset_config.splits["val"], len(names), "val")
        if self.is_main:
            print(train_split.summary())
            print(val_split.summary())
        self.train_split, self.val_split = train_split, val_split
        on_cuda = self.device.type == "cuda"
        self.masks_on_device = on_cuda
        train_set = SegDataset(
            train_split.images,
            cfg.imgsz,
            AugmentConfig(**cfg.augment_kwargs()),
            epochs=cfg.epochs,
            seed=cfg.seed,
            cache_images=cfg.cache_images,
            buffer_mb=cfg.buffer_mb,
        )
        val_set = SegDataset(val_split.images, cfg.imgsz, None, cache_images=cfg.cache_images)
        collate = SegCollate(cfg.mask_ratio, cfg.overlap_mask, make_masks=not on_cuda)
        self.batch_per_rank = max(cfg.batch // self.world_size, 1)
        if self.is_main and cfg.batch % self.world_size:
            print(f"batch {cfg.batch} does not split evenly over {self.world_size} ranks: {self.batch_per_rank} each")
        self.train_loader = build_dataloader(
            train_set,
            self.batch_per_rank,
            workers=cfg.workers,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            collate=collate,
        )
        self.val_loader = build_dataloader(
            val_set, cfg.batch, workers=cfg.workers, shuffle=False, collate=SegCollate(make_masks=False)
        )

        from pyseg.models import build_model, model_info

        self.model = build_model(cfg.model, len(names)).to(self.device)
        if cfg.weights and resume_state is None:
            state = load_checkpoint(cfg.weights)
            skipped = self.model.load_state_dict_partial(state.get("ema") or state["model"])
            if self.is_main:
                print(
                    f"weights {cfg.weights}: loaded"
                    + (f", skipped {len(skipped)} tensors of other shapes" if skipped else "")
                )
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.world_size > 1:
            if on_cuda:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif self.is_main:
                print("sync_bn: SyncBatchNorm needs CUDA; BatchNorm statistics stay per rank on CPU")
        if self.is_main:
            info = model_info(self.model, 640)
            print(f"{cfg.model}: {info['parameters'] / 1e6:.2f} M parameters, {info['gflops']:.1f} GFLOPs at 640")
        self.loss_fn = SegLoss(
            len(names),
            self.model.reg_max,
            self.model.strides,
            {"box": cfg.box, "cls": cfg.cls, "dfl": cfg.dfl, "mask": cfg.mask},
            cfg.overlap_mask,
        )
        total_batch = self.batch_per_rank * self.world_size
        self.accumulate = max(round(cfg.nbs / total_batch), 1)
        weight_decay = cfg.weight_decay * total_batch * self.accumulate / cfg.nbs
        optimizer_name, lr = cfg.optimizer, cfg.lr0
        if optimizer_name == "auto":
            steps = cfg.epochs * math.ceil(len(train_set) / total_batch) / self.accumulate
            optimizer_name, lr = ("sgd", cfg.lr0) if steps > 10_000 else ("adamw", 0.002)
        self.optimizer = build_optimizer(self.model, optimizer_name, lr, cfg.momentum, weight_decay)
        if optimizer_name == "adamw" and cfg.optimizer == "auto":
            self.cfg.lr0 = lr
        self.ema = ModelEMA(self.model, cfg.ema_decay)
        amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = torch.autocast("cuda", dtype=amp_dtype) if on_cuda and cfg.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if on_cuda and cfg.amp and amp_dtype == torch.float16 else None
        self.train_model = self.wrap_model(self.model) if self.wrap_model else self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if resume_state is not None:
            self._load_state(resume_state)
        if self.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "args.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch,  # the last finished epoch (0-based)
            "iteration": self.iteration,
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "config": self.cfg.to_dict(),
            "names": list(self.dataset_config.names),
            "model_name": self.cfg.model,
            "rng": rng_state(),
        }

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"] + 1
        self.iteration = state["iteration"]
        self.best_fitness, self.best_epoch = state["best_fitness"], state["best_epoch"]
        restore_rng_state(state["rng"])

    def _share_evaluation(self, metrics: dict) -> dict:
        """Rank 0 evaluates; the other ranks wait here and receive its metrics and best-so-far bookkeeping."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return metrics
        shared = [metrics, self.best_fitness, self.best_epoch, self.improved]
        torch.distributed.broadcast_object_list(shared, src=0)
        metrics, self.best_fitness, self.best_epoch, self.improved = shared
        return metrics

    # ---------------------------------------------------------------- loop

    def fit(self) -> Path:
        """Trains (or resumes) to cfg.epochs; returns the run folder."""
        self.setup()
        cfg = self.cfg
        if self.start_epoch >= cfg.epochs:
            print(f"{self.run_dir} already finished {cfg.epochs} epochs; nothing to resume (start a new run instead)")
            return self.run_dir
        for hook in self.hooks:
            hook.on_fit_start(self)
        for epoch in range(self.start_epoch, cfg.epochs):
            self.epoch = epoch
            self.train_loader.sampler.set_epoch(epoch)
            train = train_one_epoch(
                self.train_model,
                self.train_loader,
                self.loss_fn,
                self.optimizer,
                cfg,
                epoch,
                self.device,
                ema=self.ema,
                scaler=self.scaler,
                autocast=self.autocast,
                iteration=self.iteration,
                accumulate=self.accumulate,
                show_progress=self.show_progress and self.is_main,
                make_masks_on_device=self.masks_on_device,
            )
            self.iteration = train.pop("iteration")
            for hook in self.hooks:  # checkpoint before evaluation
                hook.on_train_epoch_end(self)
            lr = self.optimizer.param_groups[0]["lr"]
            last_epoch = epoch + 1 == cfg.epochs
            metrics = {}
            if cfg.val and ((epoch + 1) % cfg.val_period == 0 or last_epoch) and self.is_main:
                evaluator = CocoEvaluator(self.val_split.images, list(self.dataset_config.names))
                metrics = flat_metrics(
                    evaluate(self.ema.module, self.val_loader, evaluator, cfg, self.device, self.show_progress)
                )
            fitness = metrics.get("mask/map", -1.0)
            self.improved = fitness > self.best_fitness or self.best_epoch < 0
            if self.improved:
                self.best_fitness, self.best_epoch = fitness, epoch
            metrics = self._share_evaluation(metrics)
            row = {
                "epoch": epoch + 1,
                **{k: round(v, 5) for k, v in train.items()},
                **{k: round(v, 5) for k, v in metrics.items()},
                "lr": lr,
            }
            if self.is_main:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            for hook in self.hooks:
                hook.on_epoch_end(self, row)
            if self.stop:
                break
        for hook in self.hooks:
            hook.on_fit_end(self)
        return self.run_dir
