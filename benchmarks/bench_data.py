"""Training-loader throughput on COCO128-Seg (or shapes-seg when it is absent), with a time breakdown.

    python benchmarks/bench_data.py [--epochs 2] [--batch 16] [--sizes 640 320] [--workers 0 2] [--cache]

Prints images/s for each (imgsz, workers), mosaic on, two epochs after a warm-up batch; for workers 0 also where
the time goes (decode, warp = mosaic/letterbox/affine pixels, polygons, colour, masks, collate); and the cost of
the first label verification pass and of the cached second pass.
When `ultralytics` is importable it is not used yet: the reference figures below were measured for it on this
kind of machine earlier (Ultralytics 8.4, same data and settings, median of 5) and are printed for scale only.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.data import dataset as dataset_module  # noqa: E402
from pyseg.data import loader as loader_module  # noqa: E402
from pyseg.data.dataset import AugmentConfig, SegDataset  # noqa: E402
from pyseg.data.dataset_config import resolve_dataset  # noqa: E402
from pyseg.data.labels import load_split  # noqa: E402

COCO_YAML = Path(os.environ.get("PYSEG_COCO128_SEG", ROOT.parent / "shared/datasets/coco128-seg")).parent / (
    "coco128-seg.yaml"
)
REFERENCE_IMG_S = {(640, 0): 75, (640, 2): 110, (320, 0): 117, (320, 2): 182}  # quoted in issue 3, not this run


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


def run(images, imgsz: int, workers: int, batch: int, epochs: int, cache: bool) -> tuple[float, dict]:
    data = SegDataset(images, imgsz, AugmentConfig(mosaic=1.0), epochs=100, cache_images=cache)
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
        next(iter(loader))  # warm-up: workers started, caches filled
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 320])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", action="store_true", help="also run with decoded images cached in RAM")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["PYSEG_CACHE_DIR"] = cache_dir  # a cold label cache, measured
        config = resolve_dataset(COCO_YAML if COCO_YAML.is_file() else "shapes-seg.yaml")
        start = time.perf_counter()
        split = load_split(config.splits["train"], config.nc, "train")
        first = time.perf_counter() - start
        start = time.perf_counter()
        cached = load_split(config.splits["train"], config.nc, "train")
        second = time.perf_counter() - start
    assert cached.from_cache
    print(f"dataset: {config.yaml_path}; {split.summary()}")
    print(f"label verification: first pass {first * 1e3:.0f} ms, cached second pass {second * 1e3:.0f} ms")
    print("| imgsz | workers | cache | img/s | reference img/s (quoted) | ratio | ms per image: breakdown |")
    print("|---|---|---|---|---|---|---|")
    for imgsz in args.sizes:
        for workers in args.workers:
            for cache in [False, True] if args.cache else [False]:
                rate, parts = run(split.images, imgsz, workers, args.batch, args.epochs, cache)
                ref = REFERENCE_IMG_S.get((imgsz, workers))
                ratio = f"{rate / ref:.2f}x" if ref and COCO_YAML.is_file() else ""
                detail = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
                print(
                    f"| {imgsz} | {workers} | {'ram' if cache else 'no'} | {rate:.1f} | {ref or ''} | {ratio} | "
                    f"{detail} |"
                )


if __name__ == "__main__":
    main()
