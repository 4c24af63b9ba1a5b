"""python -m pyseg.val: COCO box and mask mAP of a checkpoint on a dataset split.

    python -m pyseg.val --weights runs/train/weights/best.pt [--data D] [--split val] [--imgsz 640] [--batch 16]

Prints a per-class table and writes metrics_<split>.json (and data_problems.txt when the data has problems) to
--project/--name (default runs/val, runs/val2, ...); --out names the metrics file instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from pyseg.config import TrainConfig, check_value, make_config
from pyseg.errors import CheckpointError, CommandParser, ConfigError, run_command
from pyseg.files import atomic_write_text


def load_model(weights: str | Path, device: torch.device):
    """(model with the checkpoint's EMA weights, its TrainConfig, class names) from a pyseg checkpoint or an
    Ultralytics one (whose config is pyseg's defaults with its model and image size)."""
    from pyseg.models.weights import build_from_weights, load_weights

    loaded = load_weights(weights)
    if loaded.config is not None:
        try:
            cfg = make_config(loaded.config)
        except ConfigError as error:  # a value stored in the file, not a flag the user gave
            stored = str(error).removeprefix("--")  # it names a key of the file, not a flag
            raise CheckpointError(f"{weights}: the training config stored in it is invalid ({stored})") from error
    else:
        recorded = {"imgsz": loaded.imgsz, "data": loaded.data}  # what the Ultralytics file says, where it does
        cfg = make_config({"model": loaded.model_name, **{k: v for k, v in recorded.items() if v}})
    model, _ = build_from_weights(loaded)
    return model.to(device).eval(), cfg, loaded.names


def validate(
    weights: str | Path,
    data: str | None = None,
    split: str = "val",
    imgsz: int | None = None,
    batch: int | None = None,
    device: str = "",
    workers: int = 2,
    conf: float | None = None,
    iou: float | None = None,
    problems_file: Path | None = None,
) -> tuple[dict, list[str]]:
    """(metrics {'box': {...}, 'mask': {...}}, class names) of a checkpoint; settings default to the checkpoint's.

    The split's data problems are printed (the first few) and all written to problems_file when given.
    """
    from pyseg.data.dataset import SegDataset
    from pyseg.data.dataset_config import resolve_dataset
    from pyseg.data.labels import load_split, report_problems
    from pyseg.data.loader import SegCollate, build_dataloader
    from pyseg.engine.coco_eval import CocoEvaluator
    from pyseg.engine.device import select_device
    from pyseg.engine.trainer import evaluate

    torch_device = select_device(device)
    model, train_cfg, names = load_model(weights, torch_device)
    values = train_cfg.to_dict()
    for key, value in (("data", data), ("imgsz", imgsz), ("batch", batch), ("conf", conf), ("iou", iou)):
        if value is not None:
            values[key] = value
    cfg: TrainConfig = make_config(values)
    dataset_config = resolve_dataset(cfg.data)
    if split not in dataset_config.splits:
        raise ConfigError(f"--split {split}: {cfg.data} has no such split (it has {', '.join(dataset_config.splits)})")
    if dataset_config.nc != len(names):
        raise ConfigError(
            f"{weights} has {len(names)} classes but {cfg.data} has {dataset_config.nc}: pass the --data it was "
            "trained on"
        )
    if list(dataset_config.names) != list(names):
        print(
            f"note: {weights} names its classes {', '.join(names[:4])}, ...; {cfg.data} names them "
            f"{', '.join(dataset_config.names[:4])}, ...: the table uses the checkpoint's names"
        )
    labels = load_split(dataset_config.splits[split], len(names), split)
    print(labels.summary())
    problems = report_problems([labels], problems_file)
    if problems:
        print(f"data problems (each handled as said):\n{problems}")
    if not labels.images:
        raise ConfigError(f"{cfg.data}: the {split!r} split has no readable images")
    loader = build_dataloader(
        SegDataset(labels.images, cfg.imgsz, None),
        cfg.batch,
        workers=workers,
        shuffle=False,
        collate=SegCollate(make_masks=False),
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    evaluator = CocoEvaluator(labels.images, names)
    # a progress bar only where it redraws in place (a terminal), as in train
    return evaluate(model, loader, evaluator, cfg, torch_device, show_progress=sys.stderr.isatty()), names


def add_output_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """--project/--name, the output folder of every command (project/name, then name2, name3, ...)."""
    parser.add_argument("--project", default="runs", help="parent folder of output folders (default runs)")
    parser.add_argument("--name", default=default_name, help=f"output folder: project/name (default {default_name})")
    parser.add_argument("--exist-ok", action="store_true", help="write into project/name even if it exists")


def output_dir(args: argparse.Namespace) -> Path:
    """The checked, not yet created output folder of --project/--name/--exist-ok."""
    from pyseg.engine.trainer import unique_run_dir

    check_value("name", args.name)
    return unique_run_dir(args.project, args.name, args.exist_ok)


def make_folder(folder: Path, flags: str) -> None:
    """Creates an output folder; one that cannot be made is a user error naming the flags that chose it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{flags}: cannot create {folder} ({error.strerror}); pick a writable folder") from error


@contextlib.contextmanager
def output_folder(folder: Path, flags: str):
    """Creates folder before the work (make_folder), and removes it again when the work fails and the folder was
    created here and is still empty: a failed command leaves no empty output folder behind."""
    existed = folder.exists()
    make_folder(folder, flags)
    try:
        yield folder
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser("python -m pyseg.val", __doc__)
    parser.add_argument(
        "--weights",
        required=True,
        help="a pyseg checkpoint (runs/NAME/weights/best.pt) or an Ultralytics YOLO11/YOLOv8-seg .pt",
    )
    parser.add_argument("--data", default=None, help="dataset (default: the one it was trained on)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--conf", type=float, default=None)
    parser.add_argument("--iou", type=float, default=None)
    add_output_arguments(parser, "val")
    parser.add_argument(
        "--out", default=None, help="metrics JSON (default PROJECT/NAME/metrics_SPLIT.json); data problems go beside it"
    )
    args = parser.parse_args(argv)
    for key in ("workers", "imgsz", "batch", "conf", "iou"):
        if getattr(args, key) is not None:
            check_value(key, getattr(args, key))
    return args


def val_command(argv: list[str] | None) -> int:
    from pyseg.engine.coco_eval import format_metrics_table
    from pyseg.engine.trainer import DATA_PROBLEMS_FILE

    args = parse_args(argv)
    out = Path(args.out) if args.out else output_dir(args) / f"metrics_{args.split}.json"
    if out.is_dir():  # a folder: the metrics file goes into it
        out = out / f"metrics_{args.split}.json"
    with output_folder(out.parent, "--out" if args.out else "--project/--name"):  # made before the work
        metrics, names = validate(
            args.weights,
            args.data,
            args.split,
            args.imgsz,
            args.batch,
            args.device,
            args.workers,
            args.conf,
            args.iou,
            problems_file=out.parent / DATA_PROBLEMS_FILE,
        )
    print(format_metrics_table(metrics, names))
    atomic_write_text(out, json.dumps(metrics, indent=2))
    print(f"metrics written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line for a user error."""
    return run_command("pyseg.val", val_command, argv)


if __name__ == "__main__":
    sys.exit(main())
