"""One typed, flat training config. Every key is a CLI flag (`--lr0 0.01`); unknown keys are errors.

A saved config (`runs/NAME/args.yaml`, or the tuner's best config) is read with `--cfg file.yaml`; flags given
on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from pyseg.errors import ConfigError
from pyseg.files import read_yaml_mapping


@dataclass
class TrainConfig:
    # --- run
    data: str = "shapes-seg.yaml"  # dataset YAML, built-in name or dataset folder
    model: str = "pyseg-n"  # pyseg-n|s|m, yolo11n|s|m|l|x-seg, yolov8n|s|m|l|x-seg (--weights decides when given)
    weights: str = ""  # a pyseg or Ultralytics checkpoint to start from ("" = from scratch)
    epochs: int = 100  # training epochs
    imgsz: int = 640  # square input size, pixels (multiple of 32)
    batch: int = 16  # images per batch, in total (split evenly over data-parallel workers)
    device: str = ""  # cpu | cuda | 0 | 1 ...; "" = cuda when available
    workers: int = 2  # data loader worker processes
    project: str = "runs"  # parent folder of run folders
    name: str = "train"  # run folder name: project/name
    exist_ok: bool = False  # reuse an existing run folder instead of making name2, ... (never one holding a run)
    resume: bool = False  # continue project/name from weights/last.pt (the flag also takes PATH/TO/last.pt)
    seed: int = 0  # seed of everything random
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    patience: int = 50  # stop after this many validations without a better mask mAP50-95 (0 = never)
    val: bool = True  # validate (every val_period epochs); false: no early stopping, best.pt = last epoch
    val_period: int = 1  # validate every N epochs (and always on the last)
    cache_images: bool = False  # decode every image once, up front, and keep it in RAM
    buffer_mb: float = 256.0  # RAM (MiB) per loader process for recently decoded training images (0 = none)
    save_period: int = 0  # also keep weights/epochN.pt every N epochs (0 = never)
    threads: int = 0  # torch intra-op threads on CPU (0 = all cores)
    # --- optimization
    optimizer: str = "auto"  # sgd | adamw | auto (adamw for short runs, sgd otherwise)
    lr0: float = 0.01  # initial learning rate (ignored when optimizer auto picks adamw: see engine/optim.py)
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

    def __post_init__(self) -> None:
        for key in ("project", "data", "weights"):  # "~/runs" from a quoted flag or a YAML file means the home folder
            value = getattr(self, key)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, key, os.path.expanduser(value))
        check_config(self)
        self.model = canonical_model_name(self.model)  # as recorded: "YOLO11n-seg.yaml" -> "yolo11n-seg"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, **changes) -> TrainConfig:
        """A checked copy with changes applied (values coerced to each key's type, as from a file or a sampler)."""
        return make_config({**self.to_dict(), **changes})


# Keys that older pyseg versions saved in args.yaml and checkpoints, with the only value they could hold.
RETIRED_KEYS = {"mask_ratio": 4}
DEVICE_PATTERN = re.compile(r"^(|cpu|cuda|cuda:\d+|\d+)$")
MAX_STRIDE = 32  # the model's largest stride: input sizes must be multiples of it


def flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """A rule (allowed, what) for low <= value <= high (open ends when asked)."""

    def allowed(value: float) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    text = f"{'>' if low_open else '>='} {low} and {'<' if high_open else '<='} {high}"
    return allowed, text


def at_least(low: float, *, strictly: bool = False, note: str = ""):
    """A rule (allowed, what) for value >= low (> low when strictly); note follows the bound, e.g. "(-1: unlimited)"."""
    allowed = (lambda value: value > low) if strictly else (lambda value: value >= low)
    return allowed, f"{'>' if strictly else '>='} {low}" + (f" {note}" if note else "")


def one_of(choices) -> tuple:
    """A rule (allowed, what) for a value among choices."""
    return (lambda value: value in choices), f"one of {', '.join(map(str, choices))}"


def unset_or(rule: tuple) -> tuple:
    """rule, with None allowed as well (a setting left to its automatic choice)."""
    allowed, what = rule
    return (lambda value: value is None or allowed(value)), what


PYSEG_SCALES = ("n", "s", "m")
YOLO_SCALES = ("n", "s", "m", "l", "x")
YOLO_FAMILIES = ("yolo11", "yolov8")
MODEL_NAMES = tuple(f"pyseg-{s}" for s in PYSEG_SCALES) + tuple(
    f"{family}{scale}-seg" for family in YOLO_FAMILIES for scale in YOLO_SCALES
)
_YOLO_NAME = re.compile(r"^(yolo11|yolov8)([nslmx])-seg(\.yaml)?$")


def canonical_model_name(model: str) -> str | None:
    """The name a model is recorded under ('n' -> 'pyseg-n', 'YOLO11n-seg.yaml' -> 'yolo11n-seg'), or None when
    no model has that name."""
    name = str(model).strip().lower()
    if name.removeprefix("pyseg-") in PYSEG_SCALES:
        return f"pyseg-{name.removeprefix('pyseg-')}"
    match = _YOLO_NAME.match(name)
    return f"{match.group(1)}{match.group(2)}-seg" if match else None


MAX_NAME_BYTES = 128  # run names become folder names (with suffixes: name2, trial ids) and MLflow run names


def _single_path_component(value: str) -> bool:
    return (
        value not in ("", ".", "..")
        and "/" not in value
        and "\\" not in value
        and value == value.strip()
        and value.isprintable()  # no newline, tab or NUL: a name is printed in one-line messages
        and len(value.encode("utf-8", "replace")) <= MAX_NAME_BYTES
    )


def _multiple_of_stride(value: int) -> bool:
    return value >= MAX_STRIDE and value % MAX_STRIDE == 0


_FRACTION = between(0.0, 1.0)
RULES: dict[str, tuple] = {
    "data": (lambda v: v.strip() != "", "a dataset YAML, a built-in name or a dataset folder"),
    "model": (
        lambda v: canonical_model_name(v) is not None,
        "one of pyseg-n, pyseg-s, pyseg-m, yolo11{n,s,m,l,x}-seg, yolov8{n,s,m,l,x}-seg (a .pt file of weights goes "
        "to --weights)",
    ),
    "epochs": at_least(1),
    "imgsz": (
        _multiple_of_stride,
        f"a positive multiple of {MAX_STRIDE} (the model's largest stride), e.g. 320 or 640",
    ),
    "batch": at_least(1),
    "device": (DEVICE_PATTERN.match, "cpu, cuda, cuda:N, a GPU index N, or empty for cuda when available"),
    "workers": at_least(0),
    "project": (lambda v: v.strip() != "", "a folder"),
    "name": (
        _single_path_component,
        f"a single folder name of at most {MAX_NAME_BYTES} bytes (no '/', no control characters, not '.' or '..'); "
        "use --project for the parent",
    ),
    "seed": between(0, 2**32 - 1),
    "patience": at_least(0),
    "val_period": at_least(1),
    "buffer_mb": at_least(0.0),
    "save_period": at_least(0),
    "threads": at_least(0),
    "optimizer": one_of(("sgd", "adamw", "auto")),
    "lr0": at_least(0.0, strictly=True),
    "lrf": between(0.0, 1.0, low_open=True),
    "momentum": between(0.0, 1.0, high_open=True),
    "weight_decay": at_least(0.0),
    "warmup_epochs": at_least(0.0),
    "warmup_momentum": between(0.0, 1.0, high_open=True),
    "warmup_bias_lr": at_least(0.0),
    "nbs": at_least(1),
    "grad_clip": at_least(0.0, strictly=True),
    "ema_decay": between(0.0, 1.0, high_open=True),
    "box": at_least(0.0),
    "cls": at_least(0.0),
    "dfl": at_least(0.0),
    "mask": at_least(0.0),
    "hsv_h": _FRACTION,
    "hsv_s": _FRACTION,
    "hsv_v": _FRACTION,
    "degrees": between(0.0, 180.0),
    "translate": _FRACTION,
    "scale": between(0.0, 1.0, high_open=True),
    "shear": between(0.0, 45.0),
    "perspective": between(0.0, 0.001),
    "flipud": _FRACTION,
    "fliplr": _FRACTION,
    "mosaic": _FRACTION,
    "mixup": _FRACTION,
    "copy_paste": _FRACTION,
    "close_mosaic": at_least(0),
    "conf": _FRACTION,
    "iou": between(0.0, 1.0, low_open=True),
    "max_det": at_least(1),
}


def check_config(cfg: TrainConfig) -> None:
    """Raises ConfigError for the first value outside what is allowed, naming the flag, the value and the range."""
    for field in fields(cfg):
        value = getattr(cfg, field.name)
        kind = _field_type(field)
        if (
            kind is float
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and not math.isfinite(value)
        ):
            raise ConfigError(f"{flag(field.name)} must be a finite number, got {value!r}")
        if not isinstance(value, kind) and not (
            kind is float and isinstance(value, int) and not isinstance(value, bool)
        ):
            raise ConfigError(f"{flag(field.name)} must be a {kind.__name__}, got {value!r}")
        if isinstance(value, str) and "\0" in value:  # a NUL byte ends a path for the OS: no file can be named so
            raise ConfigError(f"{flag(field.name)} must not contain a NUL character, got {value!r}")
        if field.name in RULES:
            check_value(field.name, value)


def check_value(key: str, value) -> None:
    """Raises ConfigError when value is outside RULES[key]: the check of a TrainConfig field, also used by val's
    and predict's flags of the same name."""
    check_rules({key: value}, {key: RULES[key]})


def check_rules(values: dict, rules: dict[str, tuple], flags: dict[str, str] | None = None) -> None:
    """Raises ConfigError for the first of values outside its rule (key -> (allowed, what)): "FLAG must be WHAT, got
    VALUE", FLAG being flags[key] or --key. Every settings object (TrainConfig, TuneSettings, RayScaling) is checked
    by this, so a bad value gets one message shape everywhere. A float must be finite."""
    for key, (allowed, what) in rules.items():
        value = values[key]
        name = (flags or {}).get(key) or flag(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not allowed(value):
            raise ConfigError(f"{name} must be {what}, got {value!r}")


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
        raise ConfigError(f"{flag(name)} must be true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{flag(name)} must be a {kind.__name__}, got {value!r}") from error


def make_config(values: dict) -> TrainConfig:
    """A checked TrainConfig from a dict; unknown keys, wrong types and values out of range raise ConfigError."""
    known = {f.name: f for f in fields(TrainConfig)}
    values = {k: v for k, v in values.items() if not (k in RETIRED_KEYS and v == RETIRED_KEYS[k])}
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}")
    return TrainConfig(**{k: _coerce(k, v, _field_type(known[k])) for k, v in values.items()})


def load_config_file(path: str | Path) -> dict:
    """The key/value mapping of a config YAML (e.g. runs/NAME/args.yaml); ConfigError names the file."""
    return read_yaml_mapping(path, "config file", ConfigError)


def field_comments() -> dict[str, str]:
    """{key: the comment at its default in TrainConfig's source}: each flag's help."""
    import inspect

    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        match = re.match(r"\s+(\w+): [^=]+= .*?  # (.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).replace("%", "%%")
    return comments


def add_config_arguments(parser: argparse.ArgumentParser, help_overrides: dict[str, str] | None = None) -> None:
    """One --flag per TrainConfig key, its help the comment at its default (defaults left unset so that --cfg
    values are not overridden); help_overrides: {key: help} where a command uses a key its own way."""
    comments = field_comments()
    overrides = help_overrides or {}
    parser.add_argument("--cfg", default=None, help="a YAML config (e.g. runs/NAME/args.yaml); flags override it")
    for field in fields(TrainConfig):
        kind = _field_type(field)
        if field.name == "resume":
            parser.add_argument(
                flag(field.name),
                dest=field.name,
                nargs="?",
                const="true",
                default=None,
                metavar="true|false|PATH/TO/last.pt",
                help=overrides.get(
                    field.name, "continue project/name from weights/last.pt, or continue the run of the given last.pt"
                ),
            )
        elif kind is bool:
            parser.add_argument(
                flag(field.name),
                dest=field.name,
                nargs="?",
                const=True,
                default=None,
                type=_true_or_false,
                help=overrides.get(field.name, f"{comments.get(field.name, '')} (default {field.default})".strip()),
            )
        else:
            parser.add_argument(
                flag(field.name),
                dest=field.name,
                type=kind,
                default=None,
                help=overrides.get(field.name, f"{comments.get(field.name, '')} (default {field.default!r})".strip()),
            )


def _true_or_false(value: str) -> bool:
    return _coerce("flag", value, bool)


_true_or_false.__name__ = "true/false"  # argparse names the expected kind by it: "invalid true/false value"


def resume_target(value: str | bool | None) -> tuple[bool, Path | None]:
    """--resume's value: (resume?, the checkpoint file it names, if it names one)."""
    if value is None or isinstance(value, bool):
        return bool(value), None
    if value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return _coerce("resume", value, bool), None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--resume {value}: no such checkpoint; give PATH/TO/weights/last.pt, or --resume --name NAME"
        )
    return True, path


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of --cfg (if given) with the flags given on the command line on top; --resume PATH is turned
    into --resume with the --project/--name of that checkpoint's run folder (args.resume_from keeps the file). A
    checkpoint outside its run folder (no NAME/weights/ with NAME/args.yaml) sets args.resume_elsewhere: the run
    continues in a new folder under --project, never beside the file."""
    args.resume, args.resume_from = resume_target(args.resume)
    args.resume_elsewhere = False
    if args.resume_from is not None:
        run_dir = args.resume_from.resolve().parent.parent
        if args.resume_from.resolve().parent.name == "weights" and (run_dir / "args.yaml").is_file():
            args.project, args.name = str(run_dir.parent), run_dir.name
        else:  # not inside its run folder (NAME/weights/last.pt beside NAME/args.yaml): a new run folder continues it
            args.resume_elsewhere = True
    values = load_config_file(args.cfg) if args.cfg else {}
    # commands, not settings: a saved args.yaml of a resumed run (resume, exist_ok true) starts a new run
    values.pop("resume", None)
    values.pop("exist_ok", None)
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None})
    return make_config(values)
