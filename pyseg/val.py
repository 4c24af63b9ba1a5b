"""python -m pyseg.val: COCO box and mask mAP of a checkpoint on a dataset split.

    python -m pyseg.val --weights runs/train/weights/best.pt [--data D] [--split val] [--imgsz 640] [--batch 16]

Prints a per-class table and writes metrics_<split>.json (and data_problems.txt when the data has problems) to
--project/--name (default runs/val, runs/val2, ...); --out names the metrics file instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyseg.config import TrainConfig, check_value, make_config
from pyseg.engine.output_folders import add_output_arguments, output_dir, output_folder
from pyseg.errors import CommandParser, ConfigError, run_command
from pyseg.files import atomic_write_text
from pyseg.models.weights import load_model


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
