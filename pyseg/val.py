"""python -m pyseg.val: COCO box and mask mAP of a checkpoint on a dataset split.

    python -m pyseg.val --weights runs/train/weights/best.pt [--data D] [--split val] [--imgsz 640] [--batch 16]

Prints a per-class AP table and writes metrics.json next to the weights' run folder (or to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyseg.config import TrainConfig, make_config


def load_model(weights: str | Path, device: torch.device):
    """(model with the checkpoint's EMA weights, its TrainConfig, class names) from a pyseg checkpoint."""
    from pyseg.engine.checkpoint import load_checkpoint
    from pyseg.models import build_model

    state = load_checkpoint(weights)
    cfg = make_config(state["config"])
    names = list(state["names"])
    model = build_model(state.get("model_name", cfg.model), len(names))
    model.load_state_dict(state.get("ema") or state["model"])
    return model.to(device).eval(), cfg, names


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
) -> tuple[dict, list[str]]:
    """(metrics {'box': {...}, 'mask': {...}}, class names) of a checkpoint; settings default to the checkpoint's."""
    from pyseg.data.dataset import SegDataset
    from pyseg.data.dataset_config import resolve_dataset
    from pyseg.data.labels import load_split
    from pyseg.data.loader import SegCollate, build_dataloader
    from pyseg.engine.coco_eval import CocoEvaluator
    from pyseg.engine.trainer import evaluate, select_device

    torch_device = select_device(device)
    model, train_cfg, names = load_model(weights, torch_device)
    values = train_cfg.to_dict()
    for key, value in (("data", data), ("imgsz", imgsz), ("batch", batch), ("conf", conf), ("iou", iou)):
        if value is not None:
            values[key] = value
    cfg: TrainConfig = make_config(values)
    dataset_config = resolve_dataset(cfg.data)
    if split not in dataset_config.splits:
        raise ValueError(f"{cfg.data} has no split {split!r} (it has {', '.join(dataset_config.splits)})")
    if dataset_config.nc != len(names):
        raise ValueError(f"{weights} was trained on {len(names)} classes but {cfg.data} has {dataset_config.nc}")
    images = load_split(dataset_config.splits[split], len(names), split).images
    loader = build_dataloader(
        SegDataset(images, cfg.imgsz, None),
        cfg.batch,
        workers=workers,
        shuffle=False,
        collate=SegCollate(make_masks=False),
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return evaluate(model, loader, CocoEvaluator(images, names), cfg, torch_device), names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyseg.val", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="a pyseg checkpoint (runs/NAME/weights/best.pt)")
    parser.add_argument("--data", default=None, help="dataset (default: the one it was trained on)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--conf", type=float, default=None)
    parser.add_argument("--iou", type=float, default=None)
    parser.add_argument("--out", default=None, help="metrics JSON path (default: RUN/metrics_<split>.json)")
    args = parser.parse_args(argv)
    from pyseg.engine.coco_eval import format_table

    try:
        metrics, names = validate(
            args.weights, args.data, args.split, args.imgsz, args.batch, args.device, args.workers, args.conf, args.iou
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"pyseg.val: {error}", file=sys.stderr)
        return 2
    print(format_table(metrics, names))
    out = Path(args.out) if args.out else Path(args.weights).resolve().parents[1] / f"metrics_{args.split}.json"
    out.write_text(json.dumps(metrics, indent=2))
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
