"""One typed, flat training config. Every key is a CLI flag (`--lr0 0.01`); unknown keys are errors.

A saved config (`runs/NAME/args.yaml`, or the tuner's best config) is read with `--cfg file.yaml`; flags given
on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # --- run
    data: str = "shapes-seg.yaml"  # dataset YAML, built-in name or dataset folder
    model: str = "pyseg-n"  # pyseg-n | pyseg-s | pyseg-m
    weights: str = ""  # a pyseg checkpoint to start from ("" = from scratch)
    epochs: int = 100  # training epochs
    imgsz: int = 640  # square input size, pixels (multiple of 32)
    batch: int = 16  # images per batch, in total (split evenly over data-parallel workers)
    device: str = ""  # cpu | cuda | 0 | 1 ...; "" = cuda when available
    workers: int = 2  # data loader worker processes
    project: str = "runs"  # parent folder of run folders
    name: str = "train"  # run folder name: project/name
    exist_ok: bool = False  # reuse an existing run folder instead of making name2, name3, ...
    resume: bool = False  # continue project/name from weights/last.pt
    seed: int = 0  # seed of everything random
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    patience: int = 50  # stop after this many epochs without a better mask mAP50-95 (0 = never)
    val: bool = True  # validate after every epoch
    val_period: int = 1  # validate every N epochs (and always on the last)
    cache_images: bool = False  # decode every image once, up front, and keep it in RAM
    buffer_mb: float = 256.0  # RAM (MiB) per loader process for recently decoded training images (0 = none)
    save_period: int = 0  # also keep weights/epochN.pt every N epochs (0 = never)
    threads: int = 0  # torch intra-op threads on CPU (0 = all cores)
    # --- optimization
    optimizer: str = "auto"  # sgd | adamw | auto (adamw for short runs, sgd otherwise)
    lr0: float = 0.01  # initial learning rate (sgd; adamw uses lr0 / 10 when auto picks it)
    lrf: float = 0.01  # final learning rate = lr0 * lrf
    cos_lr: bool = False  # cosine instead of linear decay
    momentum: float = 0.937  # sgd momentum / adam beta1
    weight_decay: float = 0.0005  # on conv/linear weights only (not norms, not biases)
    warmup_epochs: float = 3.0  # linear warmup, epochs (fractions allowed)
    warmup_momentum: float = 0.8  # momentum at the start of warmup
    warmup_bias_lr: float = 0.1  # bias learning rate at the start of warmup
    nbs: int = 64  # nominal batch size: gradients accumulate up to it
    grad_clip: float = 10.0  # max gradient norm
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a scaler)
    channels_last: bool = True  # channels_last memory format
    compile: bool = False  # torch.compile the model
    sync_bn: bool = False  # SyncBatchNorm across data-parallel workers (CUDA only)
    ema_decay: float = 0.9999  # EMA of weights (ramped up over the first updates)
    # --- loss
    box: float = 7.5  # CIoU box loss gain
    cls: float = 0.5  # class BCE gain
    dfl: float = 1.5  # distribution focal loss gain
    mask: float = 7.5  # mask BCE gain
    overlap_mask: bool = True  # ground truth as one index map per image (smaller instances on top)
    mask_ratio: int = 4  # mask resolution = imgsz / mask_ratio (must match the prototype stride, 4)
    # --- augmentation
    hsv_h: float = 0.015  # hue rotation, +/- fraction of the colour circle
    hsv_s: float = 0.7  # saturation gain, +/- fraction
    hsv_v: float = 0.4  # value (brightness) gain, +/- fraction
    degrees: float = 0.0  # rotation, +/- degrees
    translate: float = 0.1  # translation, +/- fraction
    scale: float = 0.5  # scale gain, +/- fraction
    shear: float = 0.0  # shear, +/- degrees
    perspective: float = 0.0  # perspective, +/- fraction (0..0.001)
    flipud: float = 0.0  # up-down flip probability
    fliplr: float = 0.5  # left-right flip probability
    mosaic: float = 1.0  # mosaic probability
    mixup: float = 0.0  # mixup probability
    copy_paste: float = 0.0  # copy-paste probability per instance
    close_mosaic: int = 10  # mosaic off for the last N epochs
    # --- evaluation
    conf: float = 0.001  # score threshold for validation predictions
    iou: float = 0.7  # NMS IoU threshold
    max_det: int = 300  # detections per image

    def augment_kwargs(self) -> dict:
        from pyseg.data.dataset import AugmentConfig

        return {f.name: getattr(self, f.name) for f in fields(AugmentConfig)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(TrainConfig)
    kind = hints[field.name]
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _coerce(name: str, value, kind: type):
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from error


def make_config(values: dict) -> TrainConfig:
    """A TrainConfig from a dict; unknown keys and wrong types raise ValueError naming the key."""
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}")
    return TrainConfig(**{k: _coerce(k, v, _field_type(known[k])) for k, v in values.items()})


def load_config_file(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"cannot read config file {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(raw).__name__}")
    return raw


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig key (defaults left unset so that --cfg values are not overridden)."""
    parser.add_argument("--cfg", default=None, help="a YAML config (e.g. runs/NAME/args.yaml); flags override it")
    for field in fields(TrainConfig):
        kind = _field_type(field)
        flag = f"--{field.name.replace('_', '-')}"
        if kind is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                nargs="?",
                const=True,
                default=None,
                type=lambda v, name=field.name: _coerce(name, v, bool),
                help=f"(default {field.default})",
            )
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=f"(default {field.default!r})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_config_file(args.cfg) if args.cfg else {}
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None})
    return make_config(values)
