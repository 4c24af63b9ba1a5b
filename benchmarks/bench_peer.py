"""The same model side by side: yolo11n-seg trained from scratch by pyseg and by Ultralytics, same settings.

    python benchmarks/bench_peer.py                                   # shapes-seg, 30 epochs at 320, CPU
    python benchmarks/bench_peer.py --data ../shared/datasets/coco128-seg.yaml --epochs 30 --imgsz 320
    python benchmarks/bench_peer.py --device cuda --imgsz 640         # on a GPU

Both tools get the same data, epochs, image size, batch, optimizer (AdamW) and learning rate, the same
augmentation switches, no validation during training and the same seed. Each trains in a fresh process of its own
(its peak memory is that process's), then predicts the val images with its own predictor (conf 0.001, iou 0.7, up
to 300 per image, masks at the original size). Both sets of predictions go through one evaluator: pyseg's
CocoEvaluator (pycocotools) over the same verified ground truth.

Prints, per tool: wall time (process start to the end of the last training epoch: setup and data loading included,
Ultralytics' final validation excluded), training images/s (the training loop alone),
peak memory (CPU: max RSS of the process and its loader workers; CUDA: max allocated), box and mask mAP50 and
mAP50-95; then the ratios pyseg / Ultralytics and the goal (at most 0.5x the wall time, at or above the mask
mAP50-95). Ultralytics is the test-only peer (requirements-peer.txt); without it only pyseg runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "yolo11n-seg"
# the settings both tools train with (names as in pyseg's TrainConfig; Ultralytics uses the same ones)
SHARED = {
    "optimizer": "adamw",
    "lrf": 0.01,
    "momentum": 0.937,
    "weight_decay": 0.0005,
    "warmup_epochs": 3.0,
    "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
    "nbs": 64,
    "box": 7.5,
    "cls": 0.5,
    "dfl": 1.5,
    "overlap_mask": True,
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
    "degrees": 0.0,
    "translate": 0.1,
    "scale": 0.5,
    "shear": 0.0,
    "perspective": 0.0,
    "flipud": 0.0,
    "fliplr": 0.5,
    "mosaic": 1.0,
    "mixup": 0.0,
    "copy_paste": 0.0,
    "seed": 0,
}
PREDICT = {"conf": 0.001, "iou": 0.7, "max_det": 300}


def peak_memory_mib(device: str) -> float:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024  # KiB on Linux


# ------------------------------------------------------------------ pyseg's side


def run_pyseg(settings: dict, out: Path) -> dict:
    from pyseg.config import make_config
    from pyseg.engine.trainer import Hook, Trainer, default_hooks
    from pyseg.predict import Predictor, coco_results

    class LoopTimer(Hook):
        def on_fit_start(self, trainer) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer) -> None:
            self.end = time.perf_counter()

    timer = LoopTimer()
    cfg = make_config(
        {
            **SHARED,
            "data": settings["data"],
            "model": MODEL,
            "epochs": settings["epochs"],
            "imgsz": settings["imgsz"],
            "batch": settings["batch"],
            "lr0": settings["lr0"],
            "close_mosaic": settings["close_mosaic"],
            "device": settings["device"],
            "workers": settings["workers"],
            "val": False,
            "patience": 0,
            "project": str(out),
            "name": "pyseg",
            "exist_ok": True,
        }
    )
    trainer = Trainer(cfg, [timer] + default_hooks(), show_progress=False)  # its end: before the epoch's last.pt
    run_dir = trainer.fit()
    wall = timer.end - settings["started"]
    images = len(trainer.train_split.images) * settings["epochs"]
    memory = peak_memory_mib(settings["device"])
    predictor = Predictor(run_dir / "weights" / "last.pt", settings["imgsz"], device=settings["device"], **PREDICT)
    results = []
    from pyseg.data.images import read_image

    for index, path in enumerate(settings["val_images"]):
        results += coco_results(index, predictor.predict(read_image(Path(path))))
    return {
        "wall_s": wall,
        "train_images_per_s": images / (timer.end - timer.start),
        "peak_mib": memory,
        "results": results,
    }


# ------------------------------------------------------------------ Ultralytics' side


def run_ultralytics(settings: dict, out: Path) -> dict:
    os.environ.setdefault("YOLO_CONFIG_DIR", str(out / "ultralytics-settings"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO
    from ultralytics import settings as ultralytics_settings

    from pyseg.engine.coco_eval import encode_masks

    # no experiment loggers (pyseg trains without MLflow here too)
    loggers = ("mlflow", "raytune", "tensorboard", "wandb", "comet", "clearml", "dvc", "neptune", "hub", "sync")
    ultralytics_settings.update({key: False for key in loggers if key in ultralytics_settings})

    marks: dict[str, float] = {}
    model = YOLO(f"{MODEL}.yaml")
    model.add_callback("on_train_start", lambda trainer: marks.__setitem__("start", time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda trainer: marks.__setitem__("end", time.perf_counter()))
    train_args = {k: v for k, v in SHARED.items()}
    train_args["optimizer"] = "AdamW"
    model.train(
        data=settings["ultralytics_yaml"],
        epochs=settings["epochs"],
        imgsz=settings["imgsz"],
        batch=settings["batch"],
        lr0=settings["lr0"],
        close_mosaic=settings["close_mosaic"],
        device=settings["device"] or None,
        workers=settings["workers"],
        val=False,
        plots=False,
        deterministic=False,  # as pyseg's default
        amp=settings["device"].startswith("cuda"),
        project=str(out),
        name="ultralytics",
        exist_ok=True,
        verbose=False,
        **train_args,
    )
    wall = marks["end"] - settings["started"]  # its final validation excluded
    memory = peak_memory_mib(settings["device"])
    weights = Path(model.trainer.last)
    images = len(model.trainer.train_loader.dataset) * settings["epochs"]
    trained = YOLO(str(weights))
    results = []
    for index, path in enumerate(settings["val_images"]):
        found = trained.predict(
            path,
            imgsz=settings["imgsz"],
            retina_masks=True,
            verbose=False,
            device=settings["device"] or None,
            **PREDICT,
        )[0]
        if found.boxes is None or len(found.boxes) == 0:
            continue
        boxes = found.boxes.xyxy.cpu().numpy()
        masks = found.masks.data.cpu().numpy().astype(bool) if found.masks is not None else None
        for box, score, cls, rle in zip(
            boxes, found.boxes.conf.cpu().numpy(), found.boxes.cls.cpu().numpy(), encode_masks(masks), strict=True
        ):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": index,
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                    "segmentation": rle,
                }
            )
    return {
        "wall_s": wall,
        "train_images_per_s": images / (marks["end"] - marks["start"]),
        "peak_mib": memory,
        "results": results,
    }


# ------------------------------------------------------------------ the driver


def ultralytics_yaml(config, out: Path) -> Path:
    """A dataset YAML Ultralytics reads: the same image folders (YOLO layout) and names as pyseg resolved.

    Each image folder is reached through a mirror under out: real folders images/X and labels/X holding a link
    to each file (Ultralytics resolves folder paths, so linked folders would lead it back), so that the label cache
    Ultralytics writes beside labels/X lands in out, never in the dataset's own folder.
    """
    import yaml

    def folders(split: str) -> list[str]:
        mirrored = []
        for index, source in enumerate(config.splits[split]):
            if not source.is_dir() or source.parent.name != "images":
                mirrored.append(str(source))
                continue
            mirror = out / "ultralytics-data" / f"{split}{index}"
            for kind in ("images", "labels"):
                real = source.parent.parent / kind / source.name
                for file in real.rglob("*") if real.is_dir() else []:
                    link = mirror / kind / source.name / file.relative_to(real)
                    if file.is_file() and not link.is_symlink():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(file)
            mirrored.append(str(mirror / "images" / source.name))
        return mirrored

    path = out / "ultralytics-data.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "path": str(config.root),
                "train": folders("train"),
                "val": folders("val"),
                "names": dict(enumerate(config.names)),
            }
        )
    )
    return path


def evaluate(results: list[dict], val_split, names: list[str]) -> dict:
    from pyseg.engine.coco_eval import CocoEvaluator

    evaluator = CocoEvaluator(val_split.images, names)
    evaluator.predictions = [dict(r) for r in results]
    evaluator.box_only = False
    metrics = evaluator.evaluate()
    return {f"{kind}/{key}": metrics[kind][key] for kind in ("box", "mask") for key in ("map50", "map")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes-seg.yaml", help="dataset YAML or built-in name")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr0", type=float, default=0.002, help="AdamW's initial learning rate, both tools")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--only", choices=("pyseg", "ultralytics"), default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "peer"))
    parser.add_argument("--worker", choices=("pyseg", "ultralytics"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.worker:  # one tool's side, in a process of its own
        settings = json.loads(Path(args.settings).read_text())
        settings["started"] = time.perf_counter()
        side = run_pyseg if args.worker == "pyseg" else run_ultralytics
        result = side(settings, out)
        (out / f"{args.worker}.json").write_text(json.dumps(result))
        return

    from pyseg.data.dataset_config import resolve_dataset
    from pyseg.data.labels import load_split

    out.mkdir(parents=True, exist_ok=True)
    config = resolve_dataset(args.data)
    val_split = load_split(config.splits["val"], config.nc, "val")
    settings = {
        "data": str(config.yaml_path or config.root),
        "ultralytics_yaml": str(ultralytics_yaml(config, out)),
        "epochs": args.epochs,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "lr0": args.lr0,
        "close_mosaic": min(10, args.epochs // 4),
        "workers": args.workers,
        "device": args.device,
        "val_images": [item.image for item in val_split.images],
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    tools = [args.only] if args.only else ["pyseg", "ultralytics"]
    if "ultralytics" in tools:
        try:
            import ultralytics  # noqa: F401
        except ImportError:
            print("bench_peer: ultralytics is not installed (requirements-peer.txt): pyseg only")
            tools.remove("ultralytics")
    rows = {}
    for tool in tools:
        print(
            f"bench_peer: training {MODEL} with {tool} ({args.epochs} epochs at {args.imgsz}, {args.device})",
            flush=True,
        )
        command = [
            sys.executable,
            __file__,
            "--worker",
            tool,
            "--settings",
            str(out / "settings.json"),
            "--out",
            str(out),
        ]
        completed = subprocess.run(command, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (out / f"{tool}.log").write_text(completed.stdout)
        if completed.returncode != 0:
            sys.exit(
                f"bench_peer: {tool} failed (exit {completed.returncode}); log: {out / f'{tool}.log'}\n"
                + completed.stdout[-3000:]
            )
        result = json.loads((out / f"{tool}.json").read_text())
        rows[tool] = {**result, **evaluate(result.pop("results"), val_split, config.names)}
    print_table(rows, args, config)


def print_table(rows: dict, args, config) -> None:
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{MODEL} from scratch on {config.yaml_path or config.root}: {args.epochs} epochs at {args.imgsz}, batch "
        f"{args.batch}, AdamW lr0 {args.lr0}, {device}"
    )
    columns = [
        ("wall_s", "wall s", ".0f"),
        ("train_images_per_s", "train img/s", ".1f"),
        ("peak_mib", "peak MiB", ".0f"),
        ("box/map50", "box mAP50", ".3f"),
        ("box/map", "box 50-95", ".3f"),
        ("mask/map50", "mask mAP50", ".3f"),
        ("mask/map", "mask 50-95", ".3f"),
    ]
    print(f"{'tool':<12}" + "".join(f"{title:>12}" for _, title, _ in columns))
    for tool, row in rows.items():
        print(f"{tool:<12}" + "".join(f"{format(row[key], fmt):>12}" for key, _, fmt in columns))
    if len(rows) == 2:
        ours, theirs = rows["pyseg"], rows["ultralytics"]
        ratios = [ours[key] / theirs[key] if theirs[key] else float("nan") for key, _, _ in columns]
        print(f"{'ratio p/u':<12}" + "".join(f"{r:>12.2f}" for r in ratios))
        wall_ok = ours["wall_s"] <= 0.5 * theirs["wall_s"]
        map_ok = ours["mask/map"] >= theirs["mask/map"]
        print(
            f"goal: wall time <= 0.5x Ultralytics: {'met' if wall_ok else 'NOT met'} "
            f"({ours['wall_s'] / theirs['wall_s']:.2f}x); mask mAP50-95 >= Ultralytics: "
            f"{'met' if map_ok else 'NOT met'} ({ours['mask/map']:.3f} vs {theirs['mask/map']:.3f})"
        )


if __name__ == "__main__":
    main()
