"""The command-line flags of the scale-out that `train` and `tune` share: where Ray runs and what a worker gets,
where runs are kept (--storage), and MLflow. One definition each; importing this module imports neither Ray nor
torch."""

from __future__ import annotations

import argparse


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (MLflow)")
    group.add_argument(
        "--mlflow-uri",
        default="",
        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db)",
    )
    group.add_argument("--mlflow-experiment", default="pyseg", help="MLflow experiment name (default pyseg)")
    group.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def add_ray_resource_arguments(group, cpus_help: str, max_failures_help: str) -> None:
    """The flags of a Ray run's resources and place, in group: --cpus-per-worker, --address, --max-failures and
    --storage (each command says in its help what a worker or a failure is to it)."""
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help=cpus_help)
    group.add_argument(
        "--address", default=None, help="Ray cluster: auto, ray://HOST:10001 (default: $RAY_ADDRESS or a local Ray)"
    )
    group.add_argument("--max-failures", type=int, default=2, help=max_failures_help)
    group.add_argument(
        "--storage",
        default=None,
        help="where runs are kept when nodes share no disk: a URI pyarrow.fs opens (s3://BUCKET/PREFIX, "
        "gs://..., abfs://...); a local folder means --project",
    )


def remote_storage(args: argparse.Namespace) -> str:
    """--storage as a remote URI ("" when not given); a local folder (or file://) becomes --project."""
    if not args.storage:
        return ""
    if "://" in args.storage and not args.storage.startswith("file://"):  # storage.is_remote, without its imports
        return args.storage
    args.project = args.storage.removeprefix("file://")
    return ""
