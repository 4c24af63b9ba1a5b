"""What a large search costs per trial, measured on a simulated cluster: a search of many short trials on a local
Ray cluster of several declared nodes, kept on S3 (a moto server on 127.0.0.1) and logged to an `mlflow server`.

    python benchmarks/bench_cluster.py                      # 64 trials of 1 epoch at imgsz 32 on 4 nodes of 1 CPU
    python benchmarks/bench_cluster.py --trials 16 --nodes 2

Prints, per trial and per trial-epoch: the search's wall time and trials per minute; the scheduling gap (a node's
slot idle between one trial's end and the next trial's start there); the Trainer's setup; the driver's CPU seconds
(the head node's share: Tune's bookkeeping, results, callbacks); S3 requests by method and by what they touched
(checkpoints, run files, Tune's records and state); MLflow REST requests by endpoint; the size of a checkpoint.
The nodes are raylets on this machine (declared CPUs, no real isolation), so the times are those of a loaded
2-core machine; the counts do not depend on it. --tune-logs turns Tune's per-trial log files back on (pyseg
turns them off) to count what they cost. docs/scaling.md turns these numbers into a 1,000-trial estimate.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.engine.trainer import Hook  # noqa: E402

BUCKET = "pyseg-bench"


class TrialClock(Hook):
    """Records per trial: its node, when its training process got the config (this hook, unpickled there), when
    setup ended, and when training ended, to a JSON-lines file."""

    def __init__(self, path: str):
        self.path, self.arrived = path, time.time()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.arrived = time.time()

    def on_fit_start(self, trainer) -> None:
        import ray

        self.setup_done = time.time()
        self.node = ray.get_runtime_context().get_node_id()

    def on_fit_end(self, trainer) -> None:
        record = {"trial": trainer.run_dir.name, "node": self.node, "arrived": self.arrived}
        record.update(setup_done=self.setup_done, fit_end=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CountingS3:
    """A moto S3 server on 127.0.0.1, in a process of its own (its CPU is not the driver's), whose request log is
    counted afterwards (requests())."""

    def __init__(self, folder: Path):
        from pyseg.distributed.ray_train import free_local_port

        port = free_local_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = folder / "s3-server.log"
        with open(self.log_path, "wb") as log:
            command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.3)

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request served so far."""
        served = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            for method in ("GET", "PUT", "POST", "HEAD", "DELETE"):
                marker = f'"{method} /'
                if marker in line:
                    served.append((method, "/" + line.split(marker, 1)[1].split(" ", 1)[0]))
        return served

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def s3_categories(requests: list[tuple[str, str]]) -> collections.Counter:
    """Requests by what they touched: pyseg's run folders (weights, results, plots), Tune's per-trial records, Tune's
    experiment state, or the rest (bucket and folder lookups)."""
    counts: collections.Counter = collections.Counter()
    for method, path in requests:
        key = path.split("?", 1)[0]
        name = key.rsplit("/", 1)[-1]
        if "/trials/" in key and name.endswith((".pt",)):
            kind = "checkpoints (.pt)"
        elif (
            "/trials/" in key
            and name in ("result.json", "params.json", "params.pkl", "progress.csv")
            or "events.out" in name
        ):
            kind = "Tune's trial records"
        elif "/trials/" in key and "." in name:
            kind = "run folder files (results, args, plots)"
        elif "experiment_state" in name or name.endswith((".pkl", ".json")):
            kind = "Tune's experiment state"
        else:
            kind = "listings and folder lookups"
        counts[f"{kind}: {method}"] += 1
    return counts


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` (SQLite store, 1 worker) on a free port; yields (URI, its log file: one line per request)."""
    from pyseg.distributed.ray_train import free_local_port

    port = free_local_port()
    log_path = folder / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(folder / "mlflow-artifacts")]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield uri, log_path
    finally:
        server.terminate()
        server.wait(timeout=30)


def mlflow_requests(log_path: Path) -> collections.Counter:
    """Requests to MLflow's REST API in the server's access log, by endpoint."""
    counts: collections.Counter = collections.Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        for method in ("POST", "GET", "PATCH", "DELETE"):
            marker = f'"{method} /'
            if marker in line and "/api/" in line:
                path = line.split(marker, 1)[1].split(" ", 1)[0].split("?", 1)[0]
                counts[f"{method} /{path.split('/mlflow/', 1)[-1]}"] += 1
    return counts


def scheduling_gaps(records: list[dict]) -> list[float]:
    """Per node, seconds between a trial's end and the next trial's process getting its config there."""
    gaps = []
    by_node: dict[str, list[dict]] = collections.defaultdict(list)
    for record in records:
        by_node[record["node"]].append(record)
    for trials in by_node.values():
        trials.sort(key=lambda r: r["arrived"])
        gaps += [b["arrived"] - a["fit_end"] for a, b in zip(trials, trials[1:], strict=False)]
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=4, help="worker nodes of 1 declared CPU each")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--imgsz", type=int, default=32)
    parser.add_argument("--tune-logs", action="store_true", help="Tune's result.json, progress.csv, ... on")
    args = parser.parse_args()
    if args.tune_logs:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"

    import boto3
    import ray
    from ray.cluster_utils import Cluster

    from pyseg.config import make_config
    from pyseg.data.synthetic import SHAPES_CLASSES, generate_shapes_seg
    from pyseg.distributed.search import run_tune
    from pyseg.distributed.search_settings import TuneSettings
    from pyseg.distributed.search_space import load_search_space
    from pyseg.distributed.storage import Storage
    from pyseg.distributed.tracking import TrackingConfig

    work = Path(tempfile.mkdtemp(prefix="pyseg-bench-cluster-", dir="/tmp"))
    s3 = CountingS3(work)
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(aws)
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=BUCKET)
    generate_shapes_seg(work / "shapes", train=16, val=8, imgsz=64, seed=1)
    data = work / "shapes.yaml"
    names = "".join(f"\n  {i}: {name}" for i, name in enumerate(SHAPES_CLASSES))
    data.write_text(f"path: shapes\ntrain: images/train\nval: images/val\nnames:{names}\n")
    clock = work / "trials.jsonl"
    os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = str(work)
    # the head runs no trial (as on a real cluster, where it runs the driver, GCS and dashboard)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": aws})
    for _ in range(args.nodes):
        nodes.add_node(num_cpus=1, env_vars=aws)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        with mlflow_server(work) as (mlflow_uri, mlflow_log):
            base = make_config(
                {
                    "data": str(data),
                    "model": "pyseg-n",
                    "epochs": args.epochs,
                    "imgsz": args.imgsz,
                    "batch": 8,
                    "workers": 0,
                    "device": "cpu",
                    "threads": 1,
                    "close_mosaic": 0,
                    "project": str(work / "driver"),
                }
            )
            settings = TuneSettings(
                samples=args.trials,
                scheduler="none",
                name="sim",
                max_concurrent=args.nodes,
                progress_every_s=600,
                storage=f"s3://{BUCKET}/runs",
                max_failures=0,
            )
            space = load_search_space(ROOT / "tune" / "default.yaml")
            before = len(s3.requests())
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.perf_counter()
            summary = run_tune(
                base, space, settings, TrackingConfig(uri=mlflow_uri, experiment="sim"), hooks=[TrialClock(str(clock))]
            )
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
            driver_cpu = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
            requests = mlflow_requests(mlflow_log)
        sizes = [
            size
            for path, size in Storage(f"s3://{BUCKET}/runs/sim/trials").files().items()
            if path.endswith("weights/last.pt")
        ]
    finally:
        ray.shutdown()
        nodes.shutdown()
        s3.served = s3.requests()
        s3.stop()

    records = [json.loads(line) for line in clock.read_text().splitlines()]
    trials, trial_epochs = len(summary.rows), sum(int(row.get("epochs") or 0) for row in summary.rows)
    print(
        f"{trials} trials x {args.epochs} epoch(s) at imgsz {args.imgsz} on {args.nodes} nodes of 1 CPU: "
        f"{wall:.0f} s wall, {60 * trials / wall:.1f} trials/min"
    )
    setup = [r["setup_done"] - r["arrived"] for r in records]
    gaps = scheduling_gaps(records)
    print(
        f"scheduling gap per trial (a node idle between two trials), median {statistics.median(gaps):.2f} s, "
        f"p90 {statistics.quantiles(gaps, n=10)[-1]:.2f} s; Trainer setup median {statistics.median(setup):.2f} s"
    )
    print(
        f"driver (head node) CPU: {driver_cpu:.1f} s in all, {driver_cpu / trials:.2f} s per trial, "
        f"{driver_cpu / max(trial_epochs, 1):.2f} s per trial-epoch"
    )
    served = s3.served[before:]
    by_method = collections.Counter(method for method, _ in served)
    print(
        f"S3: {len(served)} requests ({dict(by_method)}), {len(served) / trials:.1f} per trial, "
        f"{len(served) / max(trial_epochs, 1):.1f} per trial-epoch; by what they touched:"
    )
    for kind, count in sorted(s3_categories(served).items(), key=lambda item: -item[1]):
        print(f"  {kind:<55}{count:>7}{count / max(trial_epochs, 1):>9.1f} per trial-epoch")
    ml_total = sum(requests.values())
    print(
        f"MLflow: {ml_total} REST requests, {ml_total / trials:.1f} per trial, "
        f"{ml_total / max(trial_epochs, 1):.1f} per trial-epoch; by endpoint: {dict(requests.most_common())}"
    )
    if sizes:
        print(f"checkpoint (weights/last.pt: model, EMA, optimizer) {statistics.median(sizes) / 2**20:.1f} MiB")
    (work / "bench_cluster.json").write_text(
        json.dumps({"wall_s": wall, "records": records, "s3": served, "mlflow": dict(requests)}, indent=1)
    )
    print(f"details: {work / 'bench_cluster.json'}")


if __name__ == "__main__":
    main()
