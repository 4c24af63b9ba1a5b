"""python -m pyseg.tune: hyperparameter search on Ray Tune, every trial a Ray Train run, every run in MLflow.

Examples:
    python -m pyseg.tune --space tune/quick.yaml --samples 4 --epochs 50 --imgsz 160 --time-budget 450
                                                                    # the quick start: 7.5 minutes on 2 CPU cores
    python -m pyseg.tune --scheduler pbt --samples 8                # population based training
    python -m pyseg.tune --data coco128-seg.yaml --samples 16 --epochs 30 --imgsz 320
    python -m pyseg.tune --data coco128-seg.yaml --address auto --gpus-per-trial 1 --samples 64   # on a cluster
    python -m pyseg.tune --resume --name tune                       # continue an interrupted search

Results: runs/<name>/tune_results.csv, runs/<name>/best.yaml (python -m pyseg.train --cfg runs/<name>/best.yaml),
the best checkpoint runs/<name>/trials/<trial>/weights/best.pt, and MLflow (parent run + one child per trial):
mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
Any training flag (--imgsz, --batch, --model, ...) sets the value shared by all trials.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from pyseg.config import RULES, add_config_arguments, config_from_args, resume_target
from pyseg.distributed.flags import add_ray_resource_arguments, add_tracking_arguments, remote_storage
from pyseg.distributed.search_options import DEFAULT_SEARCH, SCHEDULERS, SEARCHES
from pyseg.errors import CommandParser, ConfigError, run_command

DEFAULT_SPACE = "tune/default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser("python -m pyseg.tune", __doc__)
    group = parser.add_argument_group("search")
    group.add_argument("--space", default=None, help=f"search-space YAML (default {DEFAULT_SPACE})")
    group.add_argument("--samples", type=int, default=16, help="trials to sample (default 16)")
    group.add_argument(
        "--scheduler",
        default="asha",
        choices=SCHEDULERS,
        help="asha: stop weak trials early; pbt: population based training; none (default asha)",
    )
    group.add_argument(
        "--search",
        default=None,
        choices=SEARCHES,
        help=f"optuna: Optuna's TPE; random (default {DEFAULT_SEARCH}; random under --scheduler pbt)",
    )
    group.add_argument(
        "--perturbation-interval", type=int, default=0, help="pbt: epochs between perturbations (0 = epochs // 5)"
    )
    group.add_argument("--grace-period", type=int, default=0, help="ASHA: epochs before stopping (0 = epochs // 10)")
    group.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    group.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs per trial, split over its workers (default: 1 per worker when the cluster has GPUs, else 0)",
    )
    group.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0 = what the cluster fits)")
    group.add_argument("--time-budget", type=float, default=0.0, help="stop the search after S seconds (0 = none)")
    group.add_argument(
        "--epoch-budget", type=int, default=0, help="stop the search after N trial-epochs in all (0 = none)"
    )
    add_ray_resource_arguments(
        group, "CPUs per Train worker (default 1)", "restarts of a trial's workers after a failure (default 2)"
    )
    group.add_argument("--verbose", action="store_true", help="also show Ray's and Tune's own output")
    add_tracking_arguments(parser)
    add_config_arguments(
        parser,
        {  # a search's own meaning of these training flags
            "name": "the search's folder: project/name (default tune)",
            "epochs": "epochs per trial (default 30)",
            "resume": "continue the search --name (finished trials are kept)",
        },
    )
    parser.set_defaults(name=None, epochs=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 (a best trial), 1 (no trial finished), 2 (a user error, one line), 130 (Ctrl-C: the
    search stopped with trials unfinished; it printed the command that continues it)."""
    return run_command("pyseg.tune", tune_command, argv)


def tune_command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    tune_resume, _ = resume_target(args.resume)
    if tune_resume:
        ignored = ignored_on_resume(list(sys.argv[1:] if argv is None else argv))
        if ignored:
            print(
                f"pyseg.tune --resume: the search continues with its own config and settings (its search.json); "
                f"ignored: {', '.join(ignored)}"
            )  # --resume continues the experiment --name (not one training)
    if _ is not None:
        raise ConfigError("pyseg.tune --resume continues a search: give --resume --name NAME, not a checkpoint")
    args.resume = None
    from pyseg.distributed.search_settings import TuneSettings
    from pyseg.distributed.search_space import load_search_space

    storage = remote_storage(args)
    args_name, name = args.name, "tune" if args.name is None else args.name  # --name "" is refused below
    args.name = None
    if args.epochs is None:
        args.epochs = 30
    base = config_from_args(args)
    if not RULES["name"][0](name):
        raise ConfigError(f"--name must be {RULES['name'][1]}, got {name!r}")
    flags = (
        "samples", "scheduler", "search", "workers_per_trial", "gpus_per_trial", "cpus_per_worker", "max_concurrent",
        "time_budget", "address", "grace_period", "verbose", "epoch_budget", "max_failures", "perturbation_interval",
    )  # fmt: skip
    settings = TuneSettings(
        **{key: getattr(args, key) for key in flags}, resume=tune_resume, name=name, seed=base.seed, storage=storage
    )
    space = load_search_space(args.space or _default_space())
    from pyseg.data.dataset_config import resolve_dataset

    dataset = resolve_dataset(base.data)  # a bad --data is one line here, not a failed trial per sample
    val_images = next((source for source in dataset.splits.get("val", []) if source.is_dir()), None)
    if base.weights:  # a bad --weights too (a pyseg or an Ultralytics checkpoint)
        from pyseg.distributed.search_space import SearchSpaceError
        from pyseg.models.weights import build_from_weights, load_weights

        weights = load_weights(base.weights)
        if "model" in space:
            raise SearchSpaceError(
                f"search space {space.path}: `model` is searched, but --weights {base.weights} fixes the model "
                f"({weights.model_name}); remove `model` from the space, or leave out --weights"
            )
        base = dataclasses.replace(base, model=weights.model_name)  # as the trials record it, so best.yaml too
        print(f"pyseg.tune: every trial starts from {build_from_weights(weights, dataset.nc)[1]}")
    if base.device not in ("", "cpu") and not (args.address or os.environ.get("RAY_ADDRESS")):
        from pyseg.engine.device import select_device

        select_device(base.device)  # a local search: --device cuda needs a GPU here
    if base.optimizer == "auto" and "lr0" in space and "optimizer" not in space:
        # auto (pyseg.engine.optim.resolve_optimizer) sets its own lr0 for short runs: keep the sampled one
        # (README: the trials use AdamW)
        base = dataclasses.replace(base, optimizer="adamw")
    from pyseg.distributed.tracking import command_tracking

    tracking = command_tracking("pyseg.tune", args.no_mlflow, args.mlflow_uri, args.mlflow_experiment)
    from pyseg.distributed.search import failed_trial_causes, run_tune  # Ray, Tune and torch: after every check

    summary = run_tune(base, space, settings, tracking)
    causes = failed_trial_causes(summary)
    for trial, (cause, _) in causes.items():
        print(f"pyseg.tune: trial {trial} failed: {cause}", file=sys.stderr)
    if causes:
        print(f"pyseg.tune: {len(causes)} of {len(summary.rows)} trials failed (Ray's error files: "
              f"{summary.experiment_dir}/<trial>/error.txt); mend the cause and continue with --resume")  # fmt: skip
    interrupted = summary.unfinished and not summary.budget_spent
    if summary.unfinished:
        given = list(sys.argv[1:] if argv is None else argv)
        again = given + (["--name", name] if args_name is None else []) + ([] if tune_resume else ["--resume"])
        command = f"python -m pyseg.tune {shlex.join(again)}"
        if interrupted:
            print(
                f"pyseg.tune: interrupted with {summary.unfinished} of {summary.samples} trials unfinished; "
                f"continue the search with:\n  {command}"
            )
        else:  # a restored search keeps its spent budget: no command to print, a new search runs more
            flag = "--time-budget" if summary.budget_spent == "time" else "--epoch-budget"
            print(
                f"pyseg.tune: the {summary.budget_spent} budget ended the search before {summary.unfinished} of "
                f"{summary.samples} trials ran (a larger {flag} in a new search runs more)"
            )
    if causes and all(user for _, user in causes.values()) and not interrupted:
        return 2  # the machine's or the user's fault (a full disk, a damaged checkpoint): said above, line by line
    if summary.best_config:
        print(next_steps(summary, summary.epochs, val_images))
    if interrupted:  # Ctrl-C (or SIGTERM): the search stopped with trials unfinished
        return 130
    return 0 if summary.best_config else 1


# flags a resumed search takes from the command (where it runs and is kept, what it prints); the rest are the search's
RESUME_FLAGS = {
    "--resume", "--name", "--project", "--storage", "--address", "--verbose", "--no-mlflow", "--mlflow-uri",
    "--mlflow-experiment",
}  # fmt: skip


def ignored_on_resume(argv: list[str]) -> list[str]:
    """The flags given with --resume that a resumed search does not use (its record decides them)."""
    flags = [token.split("=", 1)[0] for token in argv if token.startswith("--")]
    return sorted({flag for flag in flags if flag not in RESUME_FLAGS})


def next_steps(summary, epochs: int, images=None) -> str:
    """The commands that take a finished search further: train the best config longer, compare the trials in
    MLflow's UI, predict with the best weights (on images: the dataset's validation folder, when it has one)."""
    lines = [
        "next:",
        f"  train the best config longer:  python -m pyseg.train --cfg {summary.best_config} --epochs {3 * epochs}",
    ]
    if summary.tracking_uri:
        from pyseg.distributed.tracking import experiment_url

        remote = summary.tracking_uri.startswith(("http://", "https://"))
        page = experiment_url(
            summary.tracking_uri if remote else "http://127.0.0.1:5000", summary.mlflow_experiment_id or "0"
        )
        if not remote:
            lines.append(f"  compare the trials in MLflow:  mlflow ui --backend-store-uri {summary.tracking_uri}")
            lines.append(f"                                 then open {page}")
        else:
            lines.append(f"  compare the trials in MLflow:  open {page}")
    if summary.best_checkpoint:
        lines.append(
            f"  predict with the best weights: python -m pyseg.predict --weights {summary.best_checkpoint} "
            f"--source {images or 'IMAGES'}"
        )
    return "\n".join(lines)


def _default_space() -> str:
    from pathlib import Path

    local = Path(DEFAULT_SPACE)
    if local.is_file():
        return str(local)
    return str(Path(__file__).resolve().parent.parent / DEFAULT_SPACE)


if __name__ == "__main__":
    sys.exit(main())
