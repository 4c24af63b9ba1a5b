"""Scale-out costs and gains on this machine: training images/s of a plain process against 1 and 2 Ray Train
workers, Ray's overhead per epoch, and a 4-trial Tune search (overhead to a trial's first report, wall time).

    python benchmarks/bench_scaling.py                   # COCO128-Seg from ../shared/datasets (else shapes-seg)
    python benchmarks/bench_scaling.py --skip-tune --epochs 3
    python benchmarks/bench_scaling.py --startup         # a trial's start-up in parts: TorchTrainer vs in-process

Every mode runs the same config (pyseg-n, --imgsz, total batch --batch, no validation, data loading in the
training process, one torch thread per worker), so a worker's CPU is its only CPU. Throughput = the sum over
workers of each rank's training images/s (median over epochs after the first). Epoch period = time between two
epoch ends (training + checkpoint + Ray report); Ray's overhead per epoch = period(Ray, 1 worker) - period(plain).
Targets (issue 5): 2 workers of 1 CPU >= 1.6x one worker of 1 CPU; Ray's overhead <= 10% of an epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.config import make_config  # noqa: E402
from pyseg.engine.trainer import Hook, Trainer, default_hooks  # noqa: E402

COCO128 = ROOT.parent / "shared" / "datasets" / "coco128-seg.yaml"


class EpochClock(Hook):
    """Appends {rank, epoch, images_per_s, t} at every epoch end to a JSON-lines file (works inside Ray workers)."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_start(self, trainer) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": trainer.rank, "epoch": 0, "t": time.time(), "start": True}) + "\n")

    def on_epoch_end(self, trainer, row) -> None:
        record = {"rank": trainer.rank, "epoch": row["epoch"], "images_per_s": row["images_per_s"], "t": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def summarize(path: Path, world: int) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    rank0 = [r for r in records if r["rank"] == 0 and not r.get("start")]
    start = min(r["t"] for r in records if r.get("start") and r["rank"] == 0)
    later = [r for r in rank0 if r["epoch"] > 1] or rank0
    per_rank = {
        rank: statistics.median(r["images_per_s"] for r in records if r["rank"] == rank and r["epoch"] > 1)
        if any(r["rank"] == rank and r["epoch"] > 1 for r in records)
        else statistics.median(r["images_per_s"] for r in records if r["rank"] == rank and not r.get("start"))
        for rank in range(world)
    }
    times = [r["t"] for r in sorted(rank0, key=lambda r: r["epoch"])]
    periods = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "images_per_s": sum(per_rank.values()),
        "per_rank": per_rank,
        "epoch_period_s": statistics.median(periods) if periods else float("nan"),
        "first_epoch_end_s": times[0] - start,
        "epochs": len(later),
    }


def base_config(args, project: Path, name: str):
    return make_config(
        {
            "data": args.data,
            "model": "pyseg-n",
            "epochs": args.epochs,
            "imgsz": args.imgsz,
            "batch": args.batch,
            "workers": 0,
            "device": "cpu",
            "threads": 1,
            "val": False,
            "project": str(project),
            "name": name,
            "close_mosaic": 0,
            "cache_images": False,
        }
    )


def run_plain(args, project: Path) -> dict:
    clock = project / "plain.jsonl"
    hooks = [h for h in default_hooks() if type(h).__name__ != "PlotsHook"] + [EpochClock(str(clock))]
    wall = time.perf_counter()
    Trainer(base_config(args, project, "plain"), hooks, show_progress=False).fit()
    return {**summarize(clock, 1), "wall_s": time.perf_counter() - wall}


def run_ray(args, project: Path, workers: int) -> dict:
    from pyseg.distributed.ray_train import RayScaling, fit_with_ray
    from pyseg.distributed.tracking import TrackingConfig

    clock = project / f"ray{workers}.jsonl"
    wall = time.perf_counter()
    fit_with_ray(
        base_config(args, project, f"ray{workers}"),
        RayScaling(workers=workers, cpus_per_worker=1, max_failures=0),
        TrackingConfig(enabled=False),
        extra_hooks=[EpochClock(str(clock))],
    )
    return {**summarize(clock, workers), "wall_s": time.perf_counter() - wall}


def run_tune_search(args, project: Path) -> dict:
    from pyseg.distributed.search import run_tune
    from pyseg.distributed.search_settings import TuneSettings
    from pyseg.distributed.search_space import load_search_space
    from pyseg.distributed.tracking import TrackingConfig

    values = {**base_config(args, project, "unused").to_dict(), "val": True}
    cfg = make_config({**values, "epochs": args.tune_epochs, "imgsz": args.tune_imgsz})
    space = load_search_space(ROOT / "tune" / "full.yaml")
    settings = TuneSettings(samples=4, scheduler="none", name="tune4", max_concurrent=2, progress_every_s=60)
    wall = time.perf_counter()
    summary = run_tune(cfg, space, settings, TrackingConfig(enabled=False))
    wall = time.perf_counter() - wall
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(summary.experiment_dir))
    overheads = []
    for frame in analysis.trial_dataframes.values():
        first = frame.sort_values("epoch").iloc[0]
        # time_total_s of the first report runs from the trial's start; the epoch itself took epoch_seconds
        # (training) plus validation; what is left is Ray's start-up: driver, TorchTrainer, worker group, setup.
        overheads.append(float(first["time_total_s"]) - float(first["epoch_seconds"]))
    return {"wall_s": wall, "trials": len(summary.rows), "start_to_first_report_minus_training_s": overheads}


class StartupClock(Hook):
    """Records, per trial, when its training process got the trial's config (this hook, unpickled there), when the
    Trainer finished its setup and when the first epoch ended, to a JSON-lines file."""

    def __init__(self, path: str):
        self.path, self.arrived = path, time.time()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.arrived = time.time()  # the last unpickling is in the process that trains

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_fit_start(self, trainer) -> None:
        if trainer.is_main:
            self.write({"trial": trainer.run_dir.name, "arrived": self.arrived, "setup_done": time.time()})

    def on_epoch_end(self, trainer, row) -> None:
        if trainer.is_main and row["epoch"] == trainer.start_epoch + 1:
            self.write({"trial": trainer.run_dir.name, "first_epoch_end": time.time(), **row})


def run_startup(args, project: Path, torch_trainer: bool) -> list[dict]:
    """A search of args.startup_trials trials of 1 epoch, 2 at a time; per trial: its start-up in parts."""
    from ray.tune import ExperimentAnalysis

    from pyseg.distributed.search import run_tune
    from pyseg.distributed.search_settings import TuneSettings
    from pyseg.distributed.search_space import load_search_space
    from pyseg.distributed.tracking import TrackingConfig

    name = "startup-torchtrainer" if torch_trainer else "startup-in-process"
    clock = project / f"{name}.jsonl"
    values = {**base_config(args, project, "unused").to_dict(), "val": True, "epochs": 1, "imgsz": args.startup_imgsz}
    settings = TuneSettings(
        samples=args.startup_trials, scheduler="none", name=name, max_concurrent=2, progress_every_s=600,
        torch_trainer_per_trial=torch_trainer,
    )  # fmt: skip
    space = load_search_space(ROOT / "tune" / "default.yaml")
    summary = run_tune(
        make_config(values), space, settings, TrackingConfig(enabled=False), hooks=[StartupClock(str(clock))]
    )
    records: dict[str, dict] = {}
    for line in clock.read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["trial"], {}).update(record)
    parts = []
    for frame in ExperimentAnalysis(str(summary.experiment_dir)).trial_dataframes.values():
        first = frame.sort_values("epoch").iloc[0]
        r = records[str(first["trial_id"])]
        # Tune's time_total_s runs from the trial's start to its first report (which follows the epoch's end)
        started = r["first_epoch_end"] - float(first["time_total_s"])
        parts.append(
            {
                "process_ready_s": r["arrived"] - started,  # Ray: trial actor (+ TorchTrainer controller, workers)
                "setup_s": r["setup_done"] - r["arrived"],  # labels, data, model, optimizer, first batch plot
                "first_epoch_s": r["first_epoch_end"] - r["setup_done"],  # training + validation + checkpoint
                "training_s": float(first["epoch_seconds"]),
                "total_s": float(first["time_total_s"]),
            }
        )
    return parts


def print_startup(results: dict) -> None:
    keys = ("process_ready_s", "setup_s", "first_epoch_s", "total_s")
    print(
        f"{'trial start-up, median of trials':<34}"
        + "".join(f"{k.removesuffix('_s'):>15}" for k in keys)
        + f"{'minus training':>16}"
    )
    medians = {}
    for mode, parts in results.items():
        medians[mode] = {k: statistics.median(p[k] for p in parts) for k in (*keys, "training_s")}
        m = medians[mode]
        row = "".join(f"{m[k]:>15.2f}" for k in keys)
        print(f"{mode:<34}{row}{m['total_s'] - m['training_s']:>16.2f}")
    base, new = medians["TorchTrainer per trial"], medians["in the trial's process"]
    ratio = (new["total_s"] - new["training_s"]) / (base["total_s"] - base["training_s"])
    print(f"start-up (total minus training), in-process / TorchTrainer: {ratio:.2f}x (target <= 0.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(COCO128) if COCO128.is_file() else "shapes-seg.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tune-epochs", type=int, default=2)
    parser.add_argument("--tune-imgsz", type=int, default=160)
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--startup", action="store_true", help="only the trial start-up breakdown (two searches)")
    parser.add_argument("--startup-trials", type=int, default=4)
    parser.add_argument("--startup-imgsz", type=int, default=64)
    args = parser.parse_args()

    import os

    import ray

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"  # this benchmark reads Tune's progress.csv
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    project = Path(tempfile.mkdtemp(prefix="pyseg-bench-scaling-"))
    if args.startup:
        print(f"data {args.data}: {args.startup_trials} trials of 1 epoch at imgsz {args.startup_imgsz}, 2 at a time")
        startup = {
            "TorchTrainer per trial": run_startup(args, project, torch_trainer=True),
            "in the trial's process": run_startup(args, project, torch_trainer=False),
        }
        print_startup(startup)
        (project / "bench_startup.json").write_text(json.dumps(startup, indent=1))
        ray.shutdown()
        return
    print(f"data {args.data}, imgsz {args.imgsz}, batch {args.batch} in total, {args.epochs} epochs, out {project}")
    results = {"plain": run_plain(args, project)}
    results["ray1"] = run_ray(args, project, 1)
    results["ray2"] = run_ray(args, project, 2)
    plain, one, two = results["plain"], results["ray1"], results["ray2"]
    print(f"{'mode':<28}{'img/s':>8}{'epoch period s':>16}{'start->1st epoch end s':>24}{'wall s':>9}")
    for name, label in (
        ("plain", "plain process, 1 thread"),
        ("ray1", "Ray Train, 1 worker x 1 CPU"),
        ("ray2", "Ray Train, 2 workers x 1 CPU"),
    ):
        r = results[name]
        print(
            f"{label:<28}{r['images_per_s']:>8.2f}{r['epoch_period_s']:>16.2f}{r['first_epoch_end_s']:>24.1f}"
            f"{r['wall_s']:>9.1f}"
        )
    print(f"2 workers / 1 worker: {two['images_per_s'] / one['images_per_s']:.2f}x (target >= 1.6x)")
    print(f"1 Ray worker / plain: {one['images_per_s'] / plain['images_per_s']:.2f}x")
    overhead = one["epoch_period_s"] - plain["epoch_period_s"]
    print(
        f"Ray overhead per epoch: {overhead:+.2f} s = {100 * overhead / plain['epoch_period_s']:+.1f}% of a plain "
        f"epoch of {plain['epoch_period_s']:.1f} s (target <= 10%); start-up before the first epoch ends: "
        f"{one['first_epoch_end_s'] - plain['first_epoch_end_s']:+.1f} s"
    )
    if not args.skip_tune:
        tune = run_tune_search(args, project)
        results["tune4"] = tune
        lags = ", ".join(f"{v:.1f}" for v in tune["start_to_first_report_minus_training_s"])
        print(
            f"4-trial search (default space, {args.tune_epochs} epochs at {args.tune_imgsz}, 2 at a time): "
            f"{tune['wall_s']:.1f} s wall; per trial, start to first report minus its training: {lags} s"
        )
    (project / "bench_scaling.json").write_text(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
