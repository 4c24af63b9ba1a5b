"""Which search finds the better model at the same compute: random + ASHA, Optuna's TPE + ASHA and PBT, each given
the same number of trial-epochs (`pyseg.tune --epoch-budget`), on shapes-seg.

    python benchmarks/bench_search.py          # random, optuna, pbt; seeds 0 1; tune/default.yaml; 64 trial-epochs
    python benchmarks/bench_search.py --methods random optuna --seeds 0 1 2 --budget 96
    python benchmarks/bench_search.py --importance --space tune/full.yaml --samples 16 --epochs 15  # importance

Each search runs as `python -m pyseg.tune ... --no-mlflow` in a folder of its own under --project; the best mask
mAP50-95 of its trials (tune_results.csv) is what it reached. Prints one row per search and, per method, the mean
over the seeds and its ratio to random's mean measured in the same run. With --importance: one search over --space
without early stopping (every trial trains all its epochs), then Optuna's fANOVA importance of each searched value
for the final mask mAP50-95, most important first.
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.distributed.search import load_search_space  # noqa: E402

METRIC = "mask/map"
RECIPE = ["--optimizer", "adamw", "--nbs", "16"]  # tune/quick.yaml's short-run recipe: trials that learn in minutes
METHODS = {  # name: pyseg.tune flags
    "random": ["--search", "random", "--scheduler", "asha"],
    "optuna": ["--search", "optuna", "--scheduler", "asha"],
    "pbt": ["--search", "random", "--scheduler", "pbt"],
}


def run_search(name: str, flags: list[str], args, seed: int) -> dict:
    """One `pyseg.tune` search; its best mask mAP50-95, trial-epochs used, trials and wall time."""
    samples = args.population if "pbt" in flags else args.samples  # PBT evolves one population trained at once
    command = [
        sys.executable, "-m", "pyseg.tune", "--no-mlflow", "--project", str(args.project), "--name", name,
        "--space", str(args.space), "--samples", str(samples), "--epochs", str(args.epochs),
        "--cpus-per-worker", str(args.cpus_per_worker), "--max-concurrent", str(args.population),
        "--imgsz", str(args.imgsz), "--seed", str(seed), "--workers", str(args.loader_workers), *RECIPE, *flags,
    ]  # fmt: skip
    if args.budget:
        command += ["--epoch-budget", str(args.budget)]
    if args.grace_period:
        command += ["--grace-period", str(args.grace_period)]
    start = time.perf_counter()
    log = Path(args.project) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        code = subprocess.run(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    rows = read_rows(Path(args.project) / name / "tune_results.csv")
    if code != 0 or not rows:
        print(f"[bench] {name}: exit {code}, {len(rows)} trials; log {log}", flush=True)
    scores = [number(row.get(METRIC)) for row in rows]
    scores = [score for score in scores if score is not None]
    return {
        "search": name,
        "best": max(scores) if scores else math.nan,
        "trial_epochs": trial_epochs(Path(args.project) / name / "trials"),
        "trials": len(rows),
        "seconds": seconds,
        "rows": rows,
    }


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def trial_epochs(trials_dir: Path) -> int:
    """Epochs trained over all trials: the rows of every trial's results.csv."""
    return sum(len(read_rows(path)) for path in trials_dir.glob("*/results.csv"))


def compare(args) -> None:
    results = []
    for method in args.methods:
        for seed in args.seeds:
            result = run_search(f"{method}-seed{seed}", METHODS[method], args, seed)
            results.append((method, seed, result))
            print(
                f"[bench] {method:7s} seed {seed}: best mask mAP50-95 {result['best']:.4f}, "
                f"{result['trial_epochs']} trial-epochs, {result['trials']} trials, {result['seconds']:.0f} s",
                flush=True,
            )
    print(
        f"\nsame compute: --epoch-budget {args.budget} trial-epochs per search, {args.samples} samples (PBT: a "
        f"population of {args.population}) of {args.epochs} epochs at {args.imgsz} px, {args.population} at once, "
        f"space {args.space}, seeds {' '.join(map(str, args.seeds))}"
    )
    means = {}
    for method in args.methods:
        bests = [r["best"] for m, _, r in results if m == method and not math.isnan(r["best"])]
        means[method] = sum(bests) / len(bests) if bests else math.nan
    baseline = means.get("random", math.nan)
    print(f"{'method':8s} {'mean best':>10s} {'per seed':>24s} {'vs random':>10s}")
    for method in args.methods:
        per_seed = " ".join(f"{r['best']:.4f}" for m, _, r in results if m == method)
        ratio = means[method] / baseline if baseline and not math.isnan(baseline) else math.nan
        print(f"{method:8s} {means[method]:10.4f} {per_seed:>24s} {ratio:10.2f}")


def importance(args) -> None:
    """One search without early stopping over --space; fANOVA importance of each searched value."""
    import optuna

    space = load_search_space(args.space)
    result = run_search("importance", ["--search", "random", "--scheduler", "none"], args, args.seeds[0])
    distributions = optuna_distributions(space)
    study = optuna.create_study(direction="maximize")
    for row in result["rows"]:
        value = number(row.get(METRIC))
        params = {key: parse_value(row.get(key), distributions[key]) for key in distributions}
        if value is None or any(v is None for v in params.values()):
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    print(f"\n{len(study.trials)} trials of {args.epochs} epochs at {args.imgsz} px, space {args.space}")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    ranked = optuna.importance.get_param_importances(study, evaluator=evaluator)
    print(f"{'value':14s} {'importance':>10s}   (fANOVA: share of the variance of final mask mAP50-95)")
    for key, share in ranked.items():
        print(f"{key:14s} {share:10.3f}")


def optuna_distributions(space: dict) -> dict:
    import optuna.distributions as d

    made = {}
    for key, (kind, args) in space.items():
        if kind == "uniform" or kind == "quniform":
            made[key] = d.FloatDistribution(args[0], args[1])
        elif kind == "loguniform":
            made[key] = d.FloatDistribution(args[0], args[1], log=True)
        elif kind == "randint":
            made[key] = d.IntDistribution(args[0], args[1] - 1)
        elif kind == "choice":
            made[key] = d.CategoricalDistribution(args)
    return made


def parse_value(text, distribution):
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        matches = [choice for choice in distribution.choices if str(choice) == text]
        return matches[0] if matches else None
    value = number(text)
    if value is None:
        return None
    return int(value) if isinstance(distribution, d.IntDistribution) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["random", "optuna", "pbt"], choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--space", default=str(ROOT / "tune" / "default.yaml"))
    parser.add_argument("--samples", type=int, default=12, help="trials random and optuna may start")
    parser.add_argument("--epochs", type=int, default=16, help="epochs per trial")
    parser.add_argument("--budget", type=int, default=64, help="trial-epochs per search (the same compute)")
    parser.add_argument("--grace-period", type=int, default=3, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--population", type=int, default=4, help="trials at once (PBT: its population)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per trial (4 at once on 2 cores)")
    parser.add_argument("--loader-workers", type=int, default=0, help="data loader workers per trial")
    parser.add_argument("--importance", action="store_true", help="fANOVA importance of --space instead")
    parser.add_argument("--project", default=str(ROOT / "benchmarks" / "out" / f"search-{time.strftime('%H%M%S')}"))
    args = parser.parse_args()
    args.space = Path(args.space).resolve()
    if args.importance:
        args.budget = 0
        importance(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
