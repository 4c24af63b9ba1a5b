"""Hyperparameter search with Ray Tune: search spaces from YAML, one TorchTrainer per trial, ASHA early stopping,
MLflow parent and child runs, and the results (table, tune_results.csv, best config, best checkpoint).

Layout of an experiment <project>/<name>/: search.json (pyseg's record of the search: what --resume continues
from; Ray's own state beside it is never read), trials/<trial>/ (each trial's run folder: args.yaml, results.csv,
weights/, ray_train/), tune_results.csv, best.yaml.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from pyseg.config import TrainConfig
from pyseg.distributed.ray_train import (
    CHECKPOINT_FILE,
    RayScaling,
    absolute_paths,
    drop_worker_pool_warnings,
    fit_with_ray,
    init_ray,
    remove_staged_on_every_node,
)
from pyseg.distributed.search_results import TRIALS, TuneSummary, summarize
from pyseg.distributed.search_resume import (
    SearchPlan,
    check_trial_folders,
    read_search_record,
    remove_ray_state,
    resumed_search,
    search_defining_settings,
)
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import (
    check_search_space,
    clip_to_space,
    pbt_mutations,
    space_as_yaml,
    to_tune_space,
)
from pyseg.distributed.search_state import (
    SEARCH_FILE,
    RecordKeeper,
    SearchRecord,
    sampled_values,
    trial_folder,
)
from pyseg.distributed.search_view import SearchView, activate
from pyseg.distributed.storage import Storage, is_remote
from pyseg.distributed.tracking import MlflowRun, TrackingConfig, read_run_id, resolve_tracking_uri, write_run_id
from pyseg.distributed.trial_process import train_in_trial
from pyseg.distributed.worker import check_device_has_gpus, checkpoint_due
from pyseg.engine.run_files import BEST_METRIC as METRIC
from pyseg.engine.trainer import read_results
from pyseg.errors import ConfigError
from pyseg.files import LOCK_FILE, FolderLock

PARENT_RUN_FILE = "mlflow_parent.json"
TRIAL_DRIVER_MEMORY = 64 * 2**20  # bytes reserved for each trial's driver process
TRIAL_STOP_GRACE_S = 20  # seconds a stopped trial gets before Tune kills it
# ------------------------------------------------------------------ trials


def trial_config(base: TrainConfig, sampled: dict, trials_dir: str, trial_id: str, resume: bool = False) -> TrainConfig:
    """The TrainConfig of one trial: the base config with the sampled values, in the run folder trials/<trial_id>."""
    run = {"project": trials_dir, "name": trial_id, "exist_ok": True, "resume": resume, "val": True, "val_period": 1}
    return base.updated(**sampled, **run)


def run_trial(
    config: dict,
    *,
    base: TrainConfig,
    scaling: dict,
    tracking: dict,
    trials_dir: str,
    hooks=(),
    checkpoint_every: int = 0,
    storage: str = "",
    search_started_at: float = 0.0,
    in_process: bool = True,
) -> None:
    """Tune function trainable: trains one sampled config, reporting each epoch to Tune; in this process with
    in_process (a trial of one worker: pyseg.distributed.trial_process), else on its own TorchTrainer.

    A trial Tune runs again (--resume, or after a failure) continues in its own folder: from the latest Ray
    checkpoint in trials/<trial>/ray_train, which Ray Train restores, or, without one, from weights/last.pt.
    With checkpoint_every N (PBT: its perturbation interval), every N-th epoch's report and the last carry their
    checkpoint to Tune, and a trial Tune starts from a checkpoint (another trial's, when PBT exploits it)
    continues from that one with this trial's values. With storage (the URI of the search's trials folder), the
    trial's folder is storage/<trial>, and trials_dir is only where each node stages its copy.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    # the trial's folder: its own id, or the folder of the trial it continues (search_state.trial_folder)
    trial_id, tune_trial_id = context.get_trial_name(), context.get_trial_id()
    config = sampled_values(config)
    run_dir = Path(trials_dir) / trial_id
    kept = Storage(storage).child(trial_id) if storage else None
    given = ray.tune.get_checkpoint()
    if given is not None:
        continue_from(given, run_dir, kept)
    last = ("weights", CHECKPOINT_FILE)
    resume = kept.exists(*last) if kept else run_dir.joinpath(*last).is_file()
    cfg = trial_config(base, config, trials_dir, trial_id, resume=resume)
    tags = {**tracking.get("tags", {}), "pyseg.trial_id": trial_id, "pyseg.tune_trial_id": tune_trial_id}
    trial_tracking = TrackingConfig(**{**tracking, "run_name": f"trial {trial_id}", "tags": tags})

    if in_process:
        train_in_trial(
            cfg, trial_tracking, extra_hooks=hooks, cpus=scaling["cpus_per_worker"], checkpoint_every=checkpoint_every,
            config_overrides=config, storage=kept.uri if kept else "", search_started_at=search_started_at,
        )  # fmt: skip
        return

    def fit(callbacks) -> None:
        scaling_ = RayScaling(**scaling)
        fit_with_ray(
            cfg, scaling_, trial_tracking, extra_hooks=hooks, callbacks=callbacks, config_overrides=config,
            storage=kept.uri if kept else None,
        )  # fmt: skip

    if checkpoint_every:
        report_with_checkpoints(fit, checkpoint_every, base.epochs)
    else:
        fit([TuneReportCallback()])


def continue_from(checkpoint, run_dir: Path, kept: Storage | None = None) -> None:
    """Makes the trial folder run_dir (or, kept on a storage, that one) continue from a Tune checkpoint (a folder
    holding last.pt): its weights/last.pt becomes that one, and its own Ray Train checkpoints go, so that Train does
    not restore them."""
    if kept is not None:
        with tempfile.TemporaryDirectory(prefix="pyseg-exploit-") as folder:
            checkpoint.to_directory(folder)
            kept.write_file(Path(folder) / CHECKPOINT_FILE, "weights", CHECKPOINT_FILE)
        kept.delete("ray_train")
        return
    weights = run_dir / "weights"
    incoming = weights / ".incoming"
    shutil.rmtree(incoming, ignore_errors=True)
    checkpoint.to_directory(str(incoming))
    os.replace(incoming / CHECKPOINT_FILE, weights / CHECKPOINT_FILE)
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.rmtree(run_dir / "ray_train", ignore_errors=True)


def report_with_checkpoints(fit, every: int, epochs: int) -> None:
    """Runs fit(callbacks) in a helper thread and passes every report of its rank 0 on to Tune, those of every
    every-th epoch and the last with their Ray checkpoint (Ray's TuneReportCallback passes the metrics only, and
    PBT exploits checkpoints: taken at its perturbation steps only, a donor's stays on storage while another trial
    restarts from it)."""
    import threading

    import ray.tune
    from ray.util.queue import Empty, Queue

    from pyseg.distributed.tune_reports import ForwardReports  # imports Ray Train

    reports = Queue(actor_options={"num_cpus": 0})
    outcome: dict = {}

    def work() -> None:
        try:
            fit([ForwardReports(reports)])
        except BaseException as error:  # handed to this thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=work, name="pyseg-trial-fit", daemon=True)
    thread.start()
    while True:
        finished = not thread.is_alive()  # before the get: a report put before the end is still read
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except Empty:
            if finished:
                break
            continue
        due = checkpoint_due(int(metrics.get("epoch", 0)), every, epochs)
        ray.tune.report(metrics, checkpoint=checkpoint if due else None)
    if "error" in outcome:
        raise outcome["error"]


# ------------------------------------------------------------------ experiment


def check_creatable(folder: Path) -> None:
    """ConfigError unless folder can be created: its nearest existing ancestor must be a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "not a folder" if not existing.is_dir() else "not writable"
        raise ConfigError(f"--project/--name: cannot create {folder} ({existing} is {what}); pick a writable folder")


# ray.init arguments that keep Ray's own messages out of the search's output (--verbose shows them): the workers'
# output (the trials' training rows, Ray's internal error lines, start-up warnings) stays in Ray's log files, and
# the driver's log shows errors only (not the token notice or the dashboard address).
QUIET_RAY_INIT = {"log_to_driver": False, "logging_level": logging.ERROR}


def quiet_ray() -> None:
    """Tune's and Train's driver-side logs to errors only; Tune's own reporter (its configuration box, the
    TensorBoard hint, its trial tables) off: pyseg's SearchView shows the trials."""
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter, which prints nothing at verbose=0
    drop_worker_pool_warnings()


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """`kill PID` (SIGTERM) stops the search as Ctrl-C does (trials kept, the command that continues it printed,
    exit 130): Ray's driver otherwise answers SIGTERM by aborting the process."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def failed_trial_causes(summary: TuneSummary) -> dict[str, tuple[str, bool]]:
    """{failed trial: (the line of its error that names it, whether it is a pyseg user error: a full disk, a
    damaged checkpoint, a bad value)}, read from Tune's error.txt of each failed trial."""
    from pyseg.distributed.search_view import error_summary
    from pyseg.errors import UserError

    def names(kind: type) -> set[str]:
        return {kind.__name__}.union(*(names(sub) for sub in kind.__subclasses__()))

    user_errors = names(UserError)
    causes = {}
    for row in summary.rows:
        if row["status"] != "ERROR":
            continue
        path = summary.experiment_dir / row["trial"] / "error.txt"
        try:
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        line = error_summary(lines) or f"see {path}"
        kind = line.split(":", 1)[0].rsplit(".", 1)[-1]
        causes[row["trial"]] = (
            line.split(": ", 1)[1] if kind in user_errors and ": " in line else line,
            kind in user_errors,
        )
    return causes


def check_local_resources(settings: TuneSettings) -> None:
    """Before a local Ray starts (no --address, no RAY_ADDRESS): ConfigError when one trial needs more CPUs than
    this machine has; Ray would wait for them forever."""
    if settings.address or os.environ.get("RAY_ADDRESS"):
        return
    needed, available = settings.cpus_per_worker * settings.workers_per_trial, os.cpu_count() or 1
    if needed > available:
        raise ConfigError(
            f"a trial needs {needed:g} CPUs ({settings.workers_per_trial} workers x --cpus-per-worker "
            f"{settings.cpus_per_worker:g}) but this machine has {available}; lower --workers-per-trial or "
            "--cpus-per-worker"
        )


def default_concurrency(settings: TuneSettings) -> int:
    """Trials that fit the cluster at once; ConfigError when not even one fits (a trial would wait forever)."""
    import ray

    resources = ray.cluster_resources()
    scaling = settings.scaling()
    kind, per_trial = ("GPU", scaling.gpus_per_worker) if scaling.gpus_per_worker else ("CPU", scaling.cpus_per_worker)
    per_trial *= scaling.workers
    fit = resources.get(kind, 0) / per_trial
    if fit < 1 and not settings.address:  # a local Ray does not grow (a cluster's autoscaler may add nodes)
        raise ConfigError(
            f"a trial needs {per_trial:g} {kind}s ({scaling.workers} worker(s) x "
            f"{'--cpus-per-worker' if kind == 'CPU' else '--gpus-per-trial / workers'}) but this machine's Ray has "
            f"{resources.get(kind, 0):g}; "
            + (
                "lower --workers-per-trial or --cpus-per-worker"
                if kind == "CPU"
                else "leave out --gpus-per-trial (CPU trials here) or run on a cluster with GPUs (--address)"
            )
        )
    return max(int(fit), 1)


def tpe_startup_trials(samples: int) -> int:
    """Trials Optuna's TPE samples at random before it models the results: its default of 10 would make a short
    search all random; a quarter of the search (2 to 10) leaves it trials to exploit."""
    return min(10, max(2, samples // 4))


def _search_algorithm(settings: TuneSettings, max_concurrent: int, resumed: SearchPlan | None = None):
    """Tune's search algorithm, running at most max_concurrent trials at once: Tune's own random sampler, or a
    seeded multivariate TPE of Optuna (Tune ignores max_concurrent_trials once a search algorithm is given).

    A resumed search first continues the trials of resumed.to_continue; its new samples come from a sampler seeded
    anew (the seed plus the trials started so far: not the first trials' values again), TPE's told the finished
    trials' results."""
    from ray.tune.search import ConcurrencyLimiter

    seed = settings.seed + (len(resumed.finished) + len(resumed.to_continue) if resumed else 0)
    if settings.search == "random":
        if resumed is None:
            from ray.tune.search import BasicVariantGenerator

            return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)
        from pyseg.distributed.searchers import RandomSearch

        inner = RandomSearch(seed, metric=METRIC, mode="max")
    else:
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as error:
            raise ValueError(f"--search optuna needs optuna: pip install optuna ({error})") from error
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=tpe_startup_trials(settings.samples), multivariate=True, seed=seed
        )
        inner = OptunaSearch(metric=METRIC, mode="max", sampler=sampler)
    if resumed is not None:
        from pyseg.distributed.searchers import ContinuedSearch

        continued = {name: trial.config for name, trial in resumed.to_continue.items()}
        inner = ContinuedSearch(inner, continued, resumed.finished_points)
    return ConcurrencyLimiter(inner, max_concurrent=max_concurrent)


def _stopper(settings: TuneSettings, epochs_trained: int = 0):
    """The epoch budget's stopper (None without one), counting the epochs the trials trained before."""
    if not settings.epoch_budget:
        return None
    from pyseg.distributed.stoppers import TrialEpochBudget  # imports Ray

    return TrialEpochBudget(settings.epoch_budget, used=epochs_trained)


def _scheduler(settings: TuneSettings, space: dict, epochs: int):
    """ASHA, PBT over the space's mutable values, or None."""
    if settings.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = settings.grace_period or max(1, epochs // 10)
        # max_t one past the last epoch: ASHA never stops a trial at its last report, which would race the
        # trial's own ending (final plots, MLflow artifacts) and kill it half-way.
        return ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=min(grace, epochs))
    if settings.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        mutations = pbt_mutations(space)
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=perturbation_interval(settings, epochs),
            hyperparam_mutations=mutations,
            custom_explore_fn=lambda config: clip_to_space(config, space),
            quantile_fraction=0.25,
            resample_probability=0.25,
        )
    return None


def perturbation_interval(settings: TuneSettings, epochs: int) -> int:
    """PBT's epochs between exploit/explore steps: --perturbation-interval, else a fifth of the epochs."""
    return settings.perturbation_interval or max(1, epochs // 5)


def trials_storage_uri(settings: TuneSettings) -> str:
    """The URI under which a search kept on a remote storage keeps its trials' run folders."""
    return Storage(settings.storage).child(settings.name, TRIALS).uri


def _trainable(base: TrainConfig, settings: TuneSettings, tracking: TrackingConfig, trials_dir: Path, hooks):
    from ray import tune

    # with a remote storage, the trials keep their folders there (each node stages its own copies)
    storage = trials_storage_uri(settings) if is_remote(settings.storage) else ""
    in_process = trains_in_trial_process(settings)
    trainable = tune.with_parameters(
        run_trial,
        base=base,
        scaling=dataclasses.asdict(settings.scaling()),
        tracking=dataclasses.asdict(tracking),
        trials_dir=str(trials_dir),
        hooks=list(hooks),
        checkpoint_every=perturbation_interval(settings, base.epochs) if settings.scheduler == "pbt" else 0,
        storage=storage,
        search_started_at=time.time(),
        in_process=in_process,
    )
    return tune.with_resources(trainable, trial_resources(settings))


def trains_in_trial_process(settings: TuneSettings) -> bool:
    """Whether each trial trains in its own process (one worker) instead of driving a TorchTrainer."""
    return settings.workers_per_trial == 1 and not settings.torch_trainer_per_trial


def trial_resources(settings: TuneSettings) -> dict[str, float]:
    """What Tune reserves for a trial's own process (settings.gpus_per_trial decided, or the cluster connected)."""
    if trains_in_trial_process(settings):  # it trains: it holds the worker's CPUs and GPUs
        scaling = settings.scaling().resolved()
        return {"cpu": scaling.cpus_per_worker, "gpu": scaling.gpus_per_worker or 0, "memory": TRIAL_DRIVER_MEMORY}
    # The trial function only drives its TorchTrainer; the Train workers hold the CPUs and GPUs. A trial must
    # request something, and any CPU fraction would leave less than a whole CPU for the workers: it requests memory.
    return {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}


def run_tune(
    base: TrainConfig,
    space: dict[str, tuple[str, object]],
    settings: TuneSettings,
    tracking: TrackingConfig | None = None,
    *,
    hooks=(),
) -> TuneSummary:
    """Runs a search, or with settings.resume continues the one in project/name from its record (search.json):
    with that search's own config, space and settings. Returns where everything landed."""
    from ray import tune

    base = absolute_paths(base)
    tracking = tracking or TrackingConfig()
    experiment_dir = Path(base.project) / settings.name  # with a remote storage: this machine's copy of its outputs
    trials_dir = experiment_dir / TRIALS
    kept = Storage.open(settings.storage).child(settings.name) if is_remote(settings.storage) else None
    shown = kept.display if kept else experiment_dir
    if settings.resume:
        record = read_search_record(experiment_dir, kept)
        base, space, settings = resumed_search(record, base, settings, experiment_dir / SEARCH_FILE)
    else:
        check_search_space(space, base)  # before Ray starts or any trial runs
        if settings.scheduler == "pbt":
            pbt_mutations(space)  # a space PBT cannot evolve is one line, before Ray starts
        if not (kept.is_empty_or_missing() if kept else is_empty_or_missing(experiment_dir)):
            raise ConfigError(f"{shown} already holds an experiment: pass --resume to continue it or another --name")
        record = SearchRecord(base.to_dict(), space_as_yaml(space), search_defining_settings(settings))
    if kept and tracking.enabled:
        check_tracking_reachable_from_every_node(resolve_tracking_uri(tracking.uri, base.project), kept)
    if not settings.resume:
        check_creatable(experiment_dir)  # before Ray starts
    # one process runs a search at a time (two resumes would train the same trial folders at once)
    created = not experiment_dir.exists()
    lock = FolderLock(experiment_dir, "--name: the search")
    try:
        if kept and settings.resume:
            if kept.exists(PARENT_RUN_FILE):  # the MLflow parent run goes on
                kept.download_file(experiment_dir / PARENT_RUN_FILE, PARENT_RUN_FILE)
            kept.child(TRIALS).download(trials_dir, skip=("weights", "ray_train"))  # the trials' results.csv files
        searched = [key for key, (kind, _) in space.items() if kind != "fixed"]
        check_trial_folders(trials_dir, list(record.trials))
        plan = SearchPlan.of(record, trials_dir, base, space, settings)
        # Tune's own per-trial log files (result.json, progress.csv, params.json/.pkl, TensorBoard events) repeat what
        # each trial's results.csv and MLflow hold, and the driver uploads them again at every experiment checkpoint:
        # on S3, 62 requests per trial in a 64-trial search and growing with the trial count (bench_cluster.py).
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        # A trial stopped early (ASHA) is blocked inside TorchTrainer.fit and never sees Tune's stop request; Tune
        # kills it after TUNE_FORCE_TRIAL_CLEANUP_S (600 s by default), holding its workers' CPUs/GPUs until then.
        os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(TRIAL_STOP_GRACE_S))
        runs_trials = bool(plan.trials_to_run and not plan.budget_spent)  # else a resumed search only sums up
        if runs_trials:
            check_local_resources(settings)
            if not settings.verbose:
                quiet_ray()
            # trials that train in their own process run no Ray Train worker group: a local Ray needs no dashboard
            init_ray(
                settings.address,
                dashboard=not trains_in_trial_process(settings),
                **({} if settings.verbose else QUIET_RAY_INIT),
            )
            stop_on_sigterm_as_on_ctrl_c()
            if settings.gpus_per_trial is None:  # GPUs when the cluster has them, else CPU
                gpus = settings.scaling().resolved().gpus_per_worker * settings.workers_per_trial
                settings = dataclasses.replace(settings, gpus_per_trial=gpus)
            check_device_has_gpus(base.device, settings.gpus_per_trial)
            trials_that_fit = default_concurrency(settings)  # raises before anything is written when none fits

        parent = None
        if tracking.enabled:
            tracking = dataclasses.replace(tracking, uri=resolve_tracking_uri(tracking.uri, base.project))
            parent = _start_parent_run(base, space, settings, tracking, experiment_dir)
            tracking = dataclasses.replace(tracking, parent_run_id=parent.run_id)

        experiment_dir.mkdir(parents=True, exist_ok=True)
        keeper = RecordKeeper(record, experiment_dir / SEARCH_FILE, kept)
        if settings.resume:
            remove_ray_state(experiment_dir, kept, list(record.trials))
            print(
                f"resuming {shown} with its own settings ({SEARCH_FILE}): {len(plan.finished)} trials kept, "
                f"{len(plan.to_continue)} continue from their checkpoints, {plan.new_samples} new"
            )
        keeper.save()  # before any trial starts: a search killed at once can be resumed
        view = SearchView(searched, base.epochs, settings.progress_every_s, samples=settings.samples)
        stopper = None
        started = time.monotonic()
        if runs_trials:
            from pyseg.distributed.record_callback import RecordCallback  # imports Ray

            max_concurrent = settings.max_concurrent or trials_that_fit
            stopper = _stopper(settings, plan.epochs_trained)
            tuner = tune.Tuner(
                _trainable(base, settings, tracking, trials_dir, hooks),
                param_space=to_tune_space(space),
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode="max",
                    scheduler=_scheduler(settings, space, base.epochs),
                    search_alg=_search_algorithm(settings, max_concurrent, plan if settings.resume else None),
                    num_samples=plan.trials_to_run,
                    time_budget_s=plan.time_left_s,
                    trial_name_creator=trial_folder,
                    trial_dirname_creator=trial_folder,
                ),
                run_config=tune.RunConfig(
                    name=settings.name,
                    storage_path=Storage(settings.storage).uri if kept else str(Path(base.project)),
                    stop=stopper,
                    # a trial whose driver died with its node starts again, continuing from its own folder (run_trial)
                    failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                    # PBT's checkpoints, one per perturbation step: each trial's last four (the Ray Train ones stay in
                    # the trial folders)
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                    callbacks=[activate(view), RecordCallback(keeper)],
                    verbose=2 if settings.verbose else 0,
                ),
            )
            if not settings.resume:
                print(
                    f"pyseg.tune: {settings.samples} trials of {base.epochs} epochs on {base.data}, up to "
                    f"{max_concurrent} at a time, {settings.workers_per_trial} worker(s) each, {len(searched)} values "
                    "searched"
                )
            view.start()
            for name, trial in plan.finished.items():
                view.trial_kept(name, trial.config, read_results(trials_dir / name / "results.csv"))
            try:
                with warnings.catch_warnings():  # Tune's advice to PBT users of class trainables; pyseg's is a function
                    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")
                    tuner.fit()
            finally:
                view.close()
        if plan.budget_spent:
            record.budget_spent = plan.budget_spent
        elif settings.time_budget and time.monotonic() - started >= (plan.time_left_s or 0):
            record.budget_spent = "time"
        elif stopper is not None and stopper.stop_all():
            record.budget_spent = "epoch"
        keeper.save()
        if kept:  # this machine's copy of every trial's results (not their weights) for the summary
            kept.child(TRIALS).download(trials_dir, skip=("weights", "ray_train"))
        if kept and runs_trials:  # the trials are over: what they staged on the nodes is in the storage
            trials_kept = Storage(trials_storage_uri(settings))  # as run_trial names each trial's storage
            remove_staged_on_every_node([trials_kept.child(trial).uri for trial in sorted(record.trials)])
        summary = summarize(
            record, base, searched, experiment_dir, trials_dir, settings.samples, kept, view.legend_shown
        )
        if kept:
            for output in (
                summary.results_csv,
                summary.best_config,
                *summary.pictures,
                experiment_dir / PARENT_RUN_FILE,
            ):
                if output is not None and output.is_file():
                    kept.write_file(output, output.name)
        summary.budget_spent = record.budget_spent
        if parent is not None:
            _finish_parent_run(parent, summary)
            summary.tracking_uri, summary.mlflow_experiment_id = tracking.uri, parent.experiment_id
        return summary
    finally:
        lock.release()
        if created and not any(experiment_dir.iterdir()):  # it failed before writing anything
            experiment_dir.rmdir()


def is_empty_or_missing(folder: Path) -> bool:
    """No folder, or one that holds nothing but a lock file."""
    return not (folder.exists() and any(p.name != LOCK_FILE for p in folder.iterdir()))


def check_tracking_reachable_from_every_node(uri: str, kept: Storage) -> None:
    """ConfigError when a search kept on a remote storage would log to a store on this machine's disk only (the
    default SQLite file): trials on other nodes could not reach it."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise ConfigError(
            f"--storage {kept.display.rsplit('/', 1)[0]}: trials run on nodes that do not share this machine's disk, "
            f"so they cannot log to the MLflow store {uri}. Start a tracking server they can reach (e.g. `mlflow "
            "server --host 0.0.0.0 --port 5000` here) and pass --mlflow-uri http://THIS_HOST:5000, or pass "
            "--no-mlflow"
        )


def _start_parent_run(base, space, settings, tracking, experiment_dir: Path) -> MlflowRun:
    record = experiment_dir / PARENT_RUN_FILE
    run_id = read_run_id(record, tracking.uri) if settings.resume else None
    parent = MlflowRun(tracking.uri, tracking.experiment, run_id)
    tags = {"pyseg.data": base.data, "pyseg.model": base.model, "pyseg.tune": settings.name, **tracking.tags}
    parent.start(settings.name, tags)
    if run_id is None:
        params = {f"space.{key}": f"{kind} {args}" for key, (kind, args) in space.items()}
        params.update(samples=settings.samples, scheduler=settings.scheduler, search=settings.search)
        params.update(epochs=base.epochs, imgsz=base.imgsz, model=base.model, data=base.data)
        parent.log_params(params)
    if parent.flush():
        write_run_id(record, parent)
        print(f"MLflow: parent run {parent.run_id} in experiment {tracking.experiment!r} at {tracking.uri}")
    return parent


def _finish_parent_run(parent: MlflowRun, summary: TuneSummary) -> None:
    if summary.best_metric is not None:
        parent.log_metrics({"best/" + METRIC: summary.best_metric}, step=0)
        parent.set_tags({"pyseg.best_trial": summary.best_trial})
    parent.log_artifact(summary.results_csv)
    for picture in summary.pictures:
        parent.log_artifact(picture)
    if summary.best_config:
        parent.log_artifact(summary.best_config)
    if summary.best_checkpoint and summary.best_trial:
        # The best trial's own child run gets its best weights.
        def log_best_weights():
            runs = parent.client.search_runs(
                [parent.client.get_run(parent.run_id).info.experiment_id],
                filter_string=f"tags.`pyseg.trial_id` = '{summary.best_trial}'",
            )
            if runs:
                parent.client.log_artifact(runs[0].info.run_id, str(summary.best_checkpoint), "weights")

        parent.queue("uploading the best trial's weights", log_best_weights)

    # A trial the scheduler stopped early (or that failed) never reached its on_fit_end: close its child run.
    failed = {row["trial"] for row in summary.rows if row["status"] == "ERROR"}

    def close_stopped_trial_runs():
        experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
        running = parent.client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'",
        )
        for run in running:
            is_failed = run.data.tags.get("pyseg.trial_id") in failed
            parent.client.set_tag(run.info.run_id, "pyseg.ended", "failed" if is_failed else "stopped early")
            parent.client.set_terminated(run.info.run_id, "FAILED" if is_failed else "KILLED")

    parent.queue("closing the runs of stopped trials", close_stopped_trial_runs)
    parent.finish("FINISHED")
    parent.flush()
