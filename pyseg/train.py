"""python -m pyseg.train: train a segmentation model, in this process or on Ray Train workers.

Examples:
    python -m pyseg.train                                   # pyseg-n on the built-in shapes-seg
    python -m pyseg.train --data coco128-seg.yaml --epochs 3 --imgsz 320 --batch 16 --device cpu
    python -m pyseg.train --resume --name train             # continue runs/train from weights/last.pt
    python -m pyseg.train --cfg runs/train/args.yaml --epochs 50
    python -m pyseg.train --ray-workers 2 --cpus-per-worker 1   # data-parallel on a local Ray (gloo, CPU)
    python -m pyseg.train --ray-workers 8 --gpus-per-worker 1 --address auto   # on a running Ray cluster (NCCL)

Every run is logged to MLflow (default: sqlite:///runs/mlflow.db; `mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db` shows it); --no-mlflow turns it off. Without MLflow installed a run is not logged (one
line says so). Training in this process (no --ray-workers) never imports Ray: torch and pyseg's own needs suffice.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import signal
import sys
from dataclasses import fields
from pathlib import Path

from pyseg.config import TrainConfig, add_config_arguments, config_from_args, flag
from pyseg.distributed.flags import add_ray_resource_arguments, add_tracking_arguments, remote_storage
from pyseg.engine.run_files import LAST_CHECKPOINT, WEIGHTS_DIR
from pyseg.errors import CommandParser, ConfigError, run_command


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed (Ray Train)")
    group.add_argument(
        "--ray-workers", type=int, default=0, help="data-parallel Ray Train workers (0 = this process, no Ray)"
    )
    group.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per worker (default: 1 if the cluster has GPUs, else 0)",
    )
    add_ray_resource_arguments(
        group, "CPUs per worker (default 1)", "restarts from the last checkpoint after worker failures (default 2)"
    )
    group.add_argument(
        "--min-workers",
        type=int,
        default=None,
        help="elastic: when workers or nodes are lost, go on with as few as this (default: always --ray-workers)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser("python -m pyseg.train", __doc__)
    add_config_arguments(parser)
    add_tracking_arguments(parser)
    add_ray_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0 (done), 1 (training failed), 2 (a user error, one line), 130 (Ctrl-C)."""
    return run_command("pyseg.train", train_command, argv)


def train_command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    storage = remote_storage(args)
    if storage and not args.ray_workers:
        raise ConfigError("--storage URI keeps a run trained by Ray workers: add --ray-workers N")
    if args.ray_workers and not ray_installed():
        raise ConfigError(
            f"--ray-workers {args.ray_workers}: Ray is not installed in this environment; `pip install 'ray[train]'`, "
            "or leave out --ray-workers to train in this process"
        )
    scaling = None
    if args.ray_workers:
        from pyseg.distributed.scaling import RayScaling

        scaling = RayScaling(
            args.ray_workers, args.gpus_per_worker, args.cpus_per_worker, args.address, args.max_failures,
            args.min_workers,
        )  # fmt: skip
    check_checkpoint_flags(args)
    cfg = config_from_args(args)
    if args.resume_elsewhere:
        cfg = continue_elsewhere(cfg, args)
    # --data with --resume points the run at its data's new place (the same classes, checked when the data is read)
    moved_data = args.data if cfg.resume and args.data is not None and not args.ray_workers else None
    given = [key for key in RESUME_IGNORES if getattr(args, key, None) is not None]
    ignored = [flag(key) for key in given if not (key == "data" and moved_data)]
    if cfg.resume and (ignored or args.cfg):
        print(
            f"pyseg.train: --resume continues with the settings the run was started with; ignored: "
            f"{', '.join(ignored + (['--cfg'] if args.cfg else []))} (to change them, start a new run: "
            "--cfg RUN/args.yaml with the new flags)"
        )
    if not args.ray_workers:  # `kill PID` (SIGTERM) ends a run as Ctrl-C does: the message and the continue command
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    from pyseg.distributed.tracking import command_tracking

    tracking = command_tracking("pyseg.train", args.no_mlflow, args.mlflow_uri, args.mlflow_experiment)
    trainer = None
    try:
        if args.ray_workers:
            from pyseg.data.dataset_config import resolve_dataset
            from pyseg.distributed.ray_train import fit_with_ray

            resolve_dataset(cfg.data)  # a bad --data is one line here, not a traceback per Ray worker
            kept = stored_run(storage, cfg) if storage else None
            if kept:  # the name is checked against the storage, not this machine's --project
                cfg = cfg.updated(exist_ok=True)
            run_dir, result = fit_with_ray(cfg, scaling, tracking, storage=kept.uri if kept else None)
            if kept:
                run_dir = kept.display
            if result.error is not None:
                print(f"pyseg.train: training failed: {result.error}", file=sys.stderr)
                return 1
        else:
            from pyseg.distributed.worker import build_hooks
            from pyseg.engine.trainer import Trainer

            trainer = Trainer(
                cfg,
                build_hooks(tracking),
                resume_from=args.resume_from,
                config_overrides={"data": moved_data} if moved_data else None,
            )
            run_dir = trainer.fit()
    except KeyboardInterrupt as interrupt:
        if storage:
            given = list(sys.argv[1:] if argv is None else argv)
            given += ([] if cfg.resume else ["--resume"]) + ([] if "--name" in given else ["--name", cfg.name])
            again = shlex.join(given)
            print(f"\npyseg.train: interrupted; continue with: python -m pyseg.train {again}", file=sys.stderr)
            return 130
        where = getattr(interrupt, "run_dir", None) or getattr(trainer, "run_dir", None)
        last = where / WEIGHTS_DIR / LAST_CHECKPOINT if where else None
        if last is not None and last.is_file():
            print(f"\npyseg.train: interrupted; continue with: {resume_command(last, args)}", file=sys.stderr)
        else:
            print("\npyseg.train: interrupted before the first epoch was saved; start the run again", file=sys.stderr)
        return 130
    print(f"results in {run_dir}")
    return 0


def check_checkpoint_flags(args: argparse.Namespace) -> None:
    """--weights read in full and --resume FILE told from an Ultralytics checkpoint, before any data is read: a bad
    file is one line naming it, not a failure after the dataset was loaded (or on every Ray worker)."""
    resume = args.resume if isinstance(args.resume, str) else None
    if resume and Path(resume).expanduser().is_file():
        from pyseg.engine.checkpoint import load_checkpoint
        from pyseg.models.ultralytics_import import is_ultralytics_file, read_ultralytics_checkpoint

        if is_ultralytics_file(Path(resume).expanduser()):
            read_ultralytics_checkpoint(Path(resume).expanduser())  # a bad one is refused, not recommended
            raise ConfigError(
                f"--resume {resume} is an Ultralytics checkpoint, not the last.pt of a pyseg run: start from it with "
                f"--weights {resume}"
            )
        load_checkpoint(Path(resume).expanduser())  # damaged, foreign, unsafe: one line before anything is said
    resuming = args.resume not in (None, False) and str(args.resume).strip().lower() not in ("0", "false", "no", "off")
    if args.weights and not resuming:  # (a resumed run takes its weights from its own last.pt)
        from pyseg.models.weights import load_weights

        load_weights(args.weights)


def continue_elsewhere(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """The config that continues a --resume FILE which is not inside its run folder: a new run folder under
    --project (--name, or train, train2, ...), said on the console; never the folder the file lies in."""
    from pyseg.engine.trainer import unique_run_dir

    if args.ray_workers:
        raise ConfigError(
            f"--resume {args.resume_from}: with --ray-workers, give the last.pt inside its run folder "
            "(NAME/weights/last.pt beside NAME/args.yaml), or continue it in this process (leave out --ray-workers)"
        )
    run_dir = unique_run_dir(cfg.project, cfg.name, False)
    print(
        f"pyseg.train: {args.resume_from} is not inside its run folder (NAME/weights/last.pt beside NAME/args.yaml): "
        f"continuing it in a new run folder, {run_dir}"
    )
    return cfg.updated(name=run_dir.name)


def ray_installed() -> bool:
    """True when `import ray` can find Ray (not imported here: only --ray-workers needs it)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as none
        return False


# Training settings a resumed run takes from its checkpoint, whatever the command line says.
RESUME_IGNORES = tuple(f.name for f in fields(TrainConfig) if f.name not in ("resume", "project", "name", "exist_ok"))


def stored_run(storage: str, cfg: TrainConfig):
    """The Storage of the run --name under the --storage URI; ConfigError when a new run would overwrite one."""
    from pyseg.distributed.storage import Storage

    kept = Storage.open(storage).child(cfg.name)
    if not cfg.resume and kept.exists("results.csv"):
        raise ConfigError(
            f"{kept.display} already holds a run: pass --resume --name {cfg.name} to continue it, or another --name"
        )
    return kept


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def resume_command(last: Path, args: argparse.Namespace) -> str:
    """The command that continues an interrupted run from its last.pt, logged and placed as before."""
    words = ["python", "-m", "pyseg.train", "--resume", str(last)]
    if args.no_mlflow:
        words.append("--no-mlflow")
    words += ["--mlflow-uri", args.mlflow_uri] if args.mlflow_uri else []
    words += ["--mlflow-experiment", args.mlflow_experiment] if args.mlflow_experiment != "pyseg" else []
    if args.ray_workers:
        words += ["--ray-workers", str(args.ray_workers)]
        words += ["--min-workers", str(args.min_workers)] if args.min_workers else []
        words += ["--address", args.address] if args.address else []
    return shlex.join(words)


if __name__ == "__main__":
    sys.exit(main())
