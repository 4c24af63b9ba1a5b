"""Training-loader throughput on COCO128-Seg (or shapes-seg when it is absent), with a time breakdown.

    python benchmarks/bench_data.py [--epochs 2] [--batch 16] [--sizes 640 320] [--workers 0 2]
                                    [--modes off buffer ram] [--repeats 5] [--no-ultralytics] [--replicas 1]

Prints images/s for each (imgsz, workers), mosaic on, two epochs after a warm-up epoch (workers started); for
workers 0 also where the time goes (decode, warp = mosaic/letterbox/affine pixels, polygons, colour, masks,
collate); and the cost of the first label verification pass and of the cached second pass.
Three caching modes: off (every mosaic tile decoded from its file), buffer (pyseg's default: up to
buffer_mb (256 MiB) of recently decoded images kept per loader process; all of COCO128 fits) and ram (everything
decoded up front).
When `ultralytics` is importable (the benchmark-only extra: `pip install -e .[bench]`; pyseg itself never imports
it) and COCO128-Seg is present, its training loader runs in this process on the same data and settings
(mosaic 1.0, default augmentation, overlap masks at mask ratio 4, batch 16, same warm-up and epochs) and the
table prints the measured ratio. Ultralytics always keeps a buffer of recently loaded images (up to 8 batches,
127 of COCO128's 128 images) and draws mosaic partners from it, so its default is compared with pyseg's off and
buffer rows, and its cache=ram with pyseg's ram rows. Without it, the figures issue 3 quotes are printed.
Both loaders run with OpenCV single-threaded in this process (Ultralytics sets that on import).
--replicas N makes a larger dataset of N linked copies of every COCO128 image (distinct files to both loaders),
to see the loaders where no buffer holds the whole dataset.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.config import TrainConfig  # noqa: E402
from pyseg.data import dataset as dataset_module  # noqa: E402
from pyseg.data import loader as loader_module  # noqa: E402
from pyseg.data.dataset import SegDataset  # noqa: E402
from pyseg.data.dataset_config import resolve_dataset  # noqa: E402
from pyseg.data.labels import load_split  # noqa: E402

COCO_YAML = Path(os.environ.get("PYSEG_COCO128_SEG", ROOT.parent / "shared/datasets/coco128-seg")).parent / (
    "coco128-seg.yaml"
)
QUOTED_IMG_S = {(640, 0): 75, (640, 2): 110, (320, 0): 117, (320, 2): 182}  # quoted in issue 3, not this run


class Breakdown:
    """Accumulates seconds spent in wrapped functions (workers 0 only: the work runs in this process)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._patches = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)
        self._patches.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


MODES = {  # name -> SegDataset keywords
    "off": {"buffer_mb": 0.0},  # every mosaic tile decoded from its file
    "buffer": {"buffer_mb": TrainConfig.buffer_mb},  # the default: recently decoded images kept per process
    "ram": {"cache_images": True},  # every image decoded up front
}


def run(images, imgsz: int, workers: int, batch: int, epochs: int, mode: str) -> tuple[float, dict]:
    data = SegDataset(images, imgsz, TrainConfig(mosaic=1.0), epochs=100, **MODES[mode])
    breakdown = Breakdown()
    if workers == 0:
        breakdown.wrap(SegDataset, "_read", "decode")
        breakdown.wrap(dataset_module.augment, "warp_into", "warp")
        breakdown.wrap(dataset_module.augment, "transform_instances", "polygons")
        breakdown.wrap(dataset_module.augment, "hsv_jitter", "colour")
        breakdown.wrap(loader_module, "polygon_masks", "masks")
        breakdown.wrap(loader_module.SegCollate, "__call__", "collate (incl. masks)")
    try:
        loader = loader_module.build_dataloader(data, batch, workers=workers, pin_memory=False)
        for _ in loader:  # warm-up epoch 0: workers started, caches filled
            pass
        breakdown.seconds.clear()
        count, start = 0, time.perf_counter()
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch + 1)
            for b in loader:
                count += b["images"].shape[0]
        elapsed = time.perf_counter() - start
    finally:
        breakdown.restore()
    return count / elapsed, {k: v / count * 1e3 for k, v in breakdown.seconds.items()}


def replicate(root: Path, target: Path, copies: int) -> Path:
    """A dataset of `copies` linked copies of every image and label of root's train2017 split (nothing copied)."""
    for kind in ("images", "labels"):
        folder = target / kind / "train2017"
        folder.mkdir(parents=True)
        for source in sorted((root / kind / "train2017").iterdir()):
            for k in range(copies):
                (folder / f"r{k}_{source.name}").symlink_to(source)
    names = yaml.safe_load(COCO_YAML.read_text())["names"]
    (target / "data.yaml").write_text(
        yaml.safe_dump({"path": str(target), "train": "images/train2017", "val": "images/train2017", "names": names})
    )
    return target


def ultralytics_available() -> bool:
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        return False
    return True


def run_ultralytics(
    dataset_root: Path, split_dir: str, imgsz: int, workers: int, batch: int, epochs: int, cache: bool
) -> float:
    """Images/s of Ultralytics' segmentation training loader on the same images and labels.

    Ultralytics writes a label cache next to the labels folder; it gets a temporary tree of links to the dataset
    so nothing is written into the dataset itself.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_dataloader, build_yolo_dataset

    with tempfile.TemporaryDirectory() as tree:
        for kind in ("images", "labels"):
            (Path(tree) / kind).mkdir()
            (Path(tree) / kind / Path(split_dir).name).symlink_to(dataset_root / kind / Path(split_dir).name)
        img_path = str(Path(tree) / "images" / Path(split_dir).name)
        overrides = {"task": "segment", "imgsz": imgsz, "mosaic": 1.0, "workers": workers, "batch": batch}
        cfg = get_cfg(overrides={**overrides, "cache": "ram" if cache else False})
        data = {"names": {i: str(i) for i in range(80)}, "nc": 80, "channels": 3}
        dataset = build_yolo_dataset(cfg, img_path, batch, data, mode="train")
        loader = build_dataloader(dataset, batch, workers, shuffle=True, device="cpu")
        for _ in loader:  # warm-up epoch: workers started, caches filled
            pass
        count, start = 0, time.perf_counter()
        for _ in range(epochs):
            for b in loader:  # one epoch per iteration (its workers persist)
                count += b["img"].shape[0]
        elapsed = time.perf_counter() - start
        loader.reset() if hasattr(loader, "reset") else None
        del loader
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 320])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--modes", nargs="+", default=["off", "buffer", "ram"], choices=list(MODES), help="decoded-image caching"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per row; the median is printed")
    parser.add_argument("--no-ultralytics", action="store_true", help="skip the Ultralytics loader even if installed")
    parser.add_argument(
        "--replicas", type=int, default=1, help="a larger dataset: N linked copies of every COCO128 image and label"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    coco = COCO_YAML.is_file()
    workspace = tempfile.TemporaryDirectory()
    dataset_root = COCO_YAML.parent / "coco128-seg"
    data = COCO_YAML if coco else "shapes-seg.yaml"
    if coco and args.replicas > 1:
        dataset_root = replicate(dataset_root, Path(workspace.name) / "replicas", args.replicas)
        data = dataset_root / "data.yaml"

    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["PYSEG_CACHE_DIR"] = cache_dir  # a cold label cache, measured
        config = resolve_dataset(data)
        start = time.perf_counter()
        split = load_split(config.splits["train"], config.nc, "train")
        first = time.perf_counter() - start
        start = time.perf_counter()
        cached = load_split(config.splits["train"], config.nc, "train")
        second = time.perf_counter() - start
    assert cached.from_cache
    print(f"dataset: {config.yaml_path}; {split.summary()}")
    print(f"label verification: first pass {first * 1e3:.0f} ms, cached second pass {second * 1e3:.0f} ms")
    measure_peer = coco and ultralytics_available() and not args.no_ultralytics
    peer = "Ultralytics img/s (measured)" if measure_peer else "Ultralytics img/s (quoted)"
    print(f"median of {args.repeats} runs each; cv2 single-threaded in this process")
    print("cache: off = every tile decoded, buffer = pyseg's default buffer of recent images, ram = all decoded")
    print("Ultralytics: its default (it always buffers recent images) for off/buffer, its cache=ram for ram")
    print(f"| imgsz | workers | cache | pyseg img/s | {peer} | ratio | ms per image: breakdown |")
    print("|---|---|---|---|---|---|---|")
    peer_rates = {}

    def peer_rate(imgsz: int, workers: int, ram: bool) -> float | None:
        """Ultralytics' img/s: its default (which always keeps a buffer of recent images) or its RAM cache."""
        if not measure_peer:
            return None if ram or not coco else QUOTED_IMG_S.get((imgsz, workers))
        key = (imgsz, workers, ram)
        if key not in peer_rates:
            peer_rates[key] = statistics.median(
                run_ultralytics(dataset_root, "train2017", imgsz, workers, args.batch, args.epochs, ram)
                for _ in range(args.repeats)
            )
            cv2.setNumThreads(1)  # Ultralytics' import set 0; keep both sides alike
        return peer_rates[key]

    for imgsz in args.sizes:
        for workers in args.workers:
            for mode in args.modes:
                reference = peer_rate(imgsz, workers, ram=mode == "ram")
                runs = [run(split.images, imgsz, workers, args.batch, args.epochs, mode) for _ in range(args.repeats)]
                rate = statistics.median(r for r, _ in runs)
                parts = min(runs, key=lambda r: abs(r[0] - rate))[1]
                ratio = f"{rate / reference:.2f}x" if reference else ""
                detail = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
                print(
                    f"| {imgsz} | {workers} | {mode} | {rate:.1f} | {f'{reference:.1f}' if reference else ''} | "
                    f"{ratio} | {detail} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
