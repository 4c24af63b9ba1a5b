"""Proof that pyseg learns: train pyseg-n from scratch on CPU and print the mask mAP50 curve.

    python benchmarks/bench_learning.py                      # shapes-seg, imgsz 320, 30-minute budget
    python benchmarks/bench_learning.py --coco128 --epochs 3  # COCO128-Seg at 320: losses, speed, outputs

Prints one line per epoch (losses, images/s, mask/box mAP50) and the run folder; the mask mAP50 curve is also
in RUN/results.csv. Training stops at --minutes of wall time even if epochs remain (the LR schedule is set for
--epochs), so a budget-limited result is reported as such.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.config import make_config  # noqa: E402
from pyseg.engine.trainer import Hook, Trainer  # noqa: E402


class TimeBudget(Hook):
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def on_fit_start(self, trainer) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer, row) -> None:
        elapsed = time.perf_counter() - self.start
        print(
            f"[bench] epoch {row['epoch']}: {elapsed / 60:.1f} min, mask mAP50 {row.get('mask/map50', '-')}, "
            f"box mAP50 {row.get('box/map50', '-')}, {row['images_per_s']:.1f} img/s",
            flush=True,
        )
        if elapsed > self.seconds:
            print(f"[bench] time budget of {self.seconds / 60:.0f} min reached after epoch {row['epoch']}")
            trainer.stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco128", action="store_true", help="COCO128-Seg instead of shapes-seg")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--project", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args()
    data = str(ROOT.parent / "shared/datasets/coco128-seg.yaml") if args.coco128 else "shapes-seg.yaml"
    epochs = args.epochs or (3 if args.coco128 else 60)
    cfg = make_config(
        {
            "data": data,
            "model": "pyseg-n",
            "epochs": epochs,
            "imgsz": args.imgsz,
            "batch": args.batch,
            "device": "cpu",
            "workers": args.workers,
            "project": args.project,
            "name": "coco128" if args.coco128 else "shapes",
            "close_mosaic": min(10, epochs // 4),
            "patience": 0,
        }
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.hooks.append(TimeBudget(args.minutes * 60))
    start = time.perf_counter()
    run_dir = trainer.fit()
    minutes = (time.perf_counter() - start) / 60
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max((float(r["mask/map50"]) for r in rows if r.get("mask/map50")), default=float("nan"))
    print(f"[bench] {len(rows)} epochs in {minutes:.1f} min; best mask mAP50 {best:.3f}; run folder {run_dir}")
    print("[bench] mask mAP50 per epoch: " + ", ".join(f"{r['epoch']}:{r.get('mask/map50') or '-'}" for r in rows))


if __name__ == "__main__":
    main()
