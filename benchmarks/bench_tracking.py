"""MLflow's default SQLite store under concurrent writers: what a search of many trials at once does to it.

    python benchmarks/bench_tracking.py                        # 1, 8 and 32 writers; 30 epochs of 40 metrics each
    python benchmarks/bench_tracking.py --writers 1 8 --epochs 10

Each writer is a process that logs like a trial (pyseg.distributed.tracking.MlflowRun: create a run, 60 params, then one
log_batch of --metrics metrics per epoch, then close it), all to one new sqlite:/// store, started together. Prints
per writer count: metric points stored against points sent (lost = sent - stored), writes that failed and were
retried, and the median and 95th-percentile seconds of one epoch's write, with the ratio to a single writer measured
in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.distributed.tracking import MlflowRun  # noqa: E402

EXPERIMENT = "load"


def writer(uri: str, index: int, epochs: int, metrics: int, start, results) -> None:
    """One trial's worth of MLflow writes; puts (seconds per epoch write, failed flushes) on results."""
    run = MlflowRun(uri, EXPERIMENT)
    start.wait()
    run.start(f"writer {index}", {"bench": "tracking"})
    run.log_params({f"param{i}": i for i in range(60)})
    failures, seconds = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.flush()
        for epoch in range(1, epochs + 1):
            run.log_metrics({f"metric{i}": float(epoch * i) for i in range(metrics)}, epoch)
            began = time.perf_counter()
            failures += not run.flush()
            seconds.append(time.perf_counter() - began)
        run.finish()
        failures += not run.flush()
    results.put((seconds, failures, len(run.pending)))


def stored_points(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    total = 0
    for run in client.search_runs([experiment.experiment_id], max_results=10_000):
        for key in run.data.metrics:
            total += len(client.get_metric_history(run.info.run_id, key))
    return total


def measure(writers: int, epochs: int, metrics: int, folder: Path) -> dict:
    uri = f"sqlite:///{folder / f'mlflow-{writers}.db'}"
    first = MlflowRun(uri, EXPERIMENT)  # the store and experiment exist before the writers start, as in a search
    first.start("setup", {})
    first.finish()
    assert first.flush(), "could not create the store"
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=writer, args=(uri, i, epochs, metrics, start, results)) for i in range(writers)]
    for process in processes:
        process.start()
    time.sleep(3.0)  # every writer imported MLflow and is waiting
    began = time.perf_counter()
    start.set()
    outcomes = [results.get(timeout=1800) for _ in processes]
    wall = time.perf_counter() - began
    for process in processes:
        process.join()
    seconds = sorted(s for outcome in outcomes for s in outcome[0])
    sent = writers * epochs * metrics
    return {
        "writers": writers,
        "sent": sent,
        "stored": stored_points(uri),
        "failed_flushes": sum(outcome[1] for outcome in outcomes),
        "left_queued": sum(outcome[2] for outcome in outcomes),
        "p50": statistics.median(seconds),
        "p95": seconds[int(0.95 * (len(seconds) - 1))],
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--metrics", type=int, default=40, help="metrics per epoch (a trial logs about 25)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyseg-bench-tracking-") as folder:
        rows = [measure(n, args.epochs, args.metrics, Path(folder)) for n in sorted(set(args.writers))]
    single = rows[0]["p50"]
    print(f"{'writers':>7} {'sent':>7} {'stored':>7} {'lost':>5} {'retried':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'p50 / 1 writer':>14} {'wall s':>7}")  # fmt: skip
    for row in rows:
        print(
            f"{row['writers']:>7} {row['sent']:>7} {row['stored']:>7} {row['sent'] - row['stored']:>5} "
            f"{row['failed_flushes']:>7} {row['p50']:>7.3f} {row['p95']:>7.3f} {row['p50'] / single:>14.1f} "
            f"{row['wall']:>7.1f}"
        )


if __name__ == "__main__":
    main()
