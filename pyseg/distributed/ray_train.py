"""Data-parallel training on Ray Train (TorchTrainer, Train V2): one Trainer per worker, DDP through
ray.train.torch.prepare_model (gloo on CPU, NCCL on GPU), one ray.train.report per epoch from every worker with
rank 0 attaching weights/last.pt as the Ray checkpoint, and restarts from that checkpoint after a worker failure.

Which Ray: --address (or RAY_ADDRESS) when given, else a new local Ray of this process. Never the cluster that a past
`ray start` recorded in /tmp/ray/ray_current_cluster: that head may be long gone, and ray.init would wait for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pyseg.config import TrainConfig
from pyseg.distributed.jobs import FORWARDED_ENV  # the environment every Ray process of a run gets
from pyseg.distributed.scaling import RayScaling
from pyseg.distributed.storage import remove_all_staged, remove_staged
from pyseg.distributed.tracking import TrackingConfig
from pyseg.distributed.worker import build_hooks, check_device_has_gpus, stage_run_folder, worker_device
from pyseg.engine.run_files import LAST_CHECKPOINT
from pyseg.engine.trainer import Hook, Trainer, parse_number, read_results, unique_run_dir
from pyseg.errors import UserError

CHECKPOINT_FILE = LAST_CHECKPOINT
RESTORE_PREFIX = "pyseg-restore-"  # temporary folders of restored Ray checkpoints, removed once loaded
CONNECT_TIMEOUT_S = 10.0  # seconds to wait for a cluster's address to accept a connection


class RayClusterUnreachableError(UserError, ConnectionError):
    """--address or RAY_ADDRESS names a Ray cluster that does not answer; the message names it and what to do."""


class RayRunInterrupted(KeyboardInterrupt):
    """Ctrl-C during fit_with_ray; run_dir is the run folder, whose weights/last.pt continues the run."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """cfg with data (when it is a path), project and weights made absolute, so that they mean the same in
    every worker, whatever its working directory."""
    changes = {"project": str(Path(cfg.project).expanduser().resolve())}
    data = Path(cfg.data).expanduser()
    if data.exists():
        changes["data"] = str(data.resolve())
    if cfg.weights:
        changes["weights"] = str(Path(cfg.weights).expanduser().resolve())
    return cfg.updated(**changes)


def forwarded_env() -> dict[str, str]:
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    # Ray Train reroutes print() to its logger, which would bypass the contextlib.redirect_stdout that keeps
    # pycocotools quiet and print every line twice; plain stdout still reaches the driver.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_ray_state_api(init_kwargs: dict, env_vars: dict[str, str]) -> dict:
    """ray.init arguments for a local Ray whose actors all know the address of its state API (its dashboard).

    Ray Train's placement-group cleaner (an actor that frees a trial's CPUs when the trial's controller dies) asks
    the state API without an address; Ray then looks for "the" Ray on this machine and fails while another local
    Ray runs (two searches side by side: "Found multiple active Ray instances"), and the dead trial's placement
    group keeps its CPUs. Here the dashboard gets a port chosen in advance, and RAY_API_SERVER_ADDRESS (in
    env_vars, which become the job's runtime_env) points every actor of this job at it. Returns the new kwargs;
    fills env_vars. With include_dashboard=False nothing changes."""
    if init_kwargs.get("include_dashboard") is False:
        return init_kwargs
    host = init_kwargs.get("dashboard_host") or "127.0.0.1"
    port = init_kwargs.get("dashboard_port") or free_local_port()
    env_vars["RAY_API_SERVER_ADDRESS"] = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    return {**init_kwargs, "dashboard_host": host, "dashboard_port": port}


# Set by Ray Jobs in a job's driver: the job's config, its runtime_env among it.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def without_job_env_vars(env_vars: dict[str, str]) -> dict[str, str]:
    """env_vars less those the Ray Job this process is the driver of already sets (pyseg.submit forwards the same
    ones): Ray refuses a ray.init whose runtime_env repeats a key of the job's, even with the same value."""
    import json

    try:
        job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return env_vars
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}) if isinstance(job, dict) else {}
    return {key: value for key, value in env_vars.items() if key not in taken}


def init_ray(address: str | None = None, dashboard: bool = True, **kwargs) -> None:
    """Connects to address (or RAY_ADDRESS), or starts a local Ray when neither is given; once per process.

    dashboard=False starts a local Ray without its dashboard (and state API): for work that runs no Ray Train
    worker group, whose placement-group cleaner is the state API's user; pyseg never shows the local dashboard's
    address, and it costs 5 s of CPU at each start. A cluster keeps its own.
    An address that does not answer raises RayClusterUnreachableError (a UserError) instead of waiting for it.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": forwarded_env()}
    target, source = (address, "--address") if address else (os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS")
    if target is None:
        if not dashboard:
            kwargs.setdefault("include_dashboard", False)
        # address="local", not None: None also means "the cluster in /tmp/ray/ray_current_cluster", which a
        # stopped or killed `ray start --head` leaves behind, and ray.init waits forever for that dead head.
        kwargs = local_ray_state_api(kwargs, runtime_env["env_vars"])
        own_dir = "_temp_dir" not in kwargs and not os.environ.get("RAY_TMPDIR")
        if own_dir:
            kwargs["_temp_dir"] = private_ray_dir(runtime_env["env_vars"])
        try:
            # Ray's head processes (dashboard, log monitor) inherit TMPDIR at start: their temporaries go there too
            with environment(TMPDIR=kwargs["_temp_dir"] if own_dir else os.environ.get("TMPDIR")):
                ray.init(address="local", runtime_env=runtime_env, **kwargs)
        except Exception as error:  # Ray raises a bare Exception when its processes do not come up in time
            if "timed out during startup" not in str(error):
                raise
            raise RayClusterUnreachableError(
                f"Ray did not start on this machine in time ({str(error).splitlines()[0]}): it is probably short "
                "of CPU or memory right now; try again when it is less busy"
            ) from error
        return
    hint = (
        "Start the cluster (`ray start --head` on its head node), pass a running one with --address (auto, "
        "HEAD:6379 or ray://HEAD:10001), or leave out --address and unset RAY_ADDRESS to start a local Ray."
    )
    _check_reachable(target, source, hint)
    if "://" not in target and target != "auto":
        # a GCS address (a Ray Job's driver gets one in RAY_ADDRESS): Ray Train's placement-group cleaner, on the
        # head node, then asks this cluster's state API even where another Ray runs on the same machine
        runtime_env["env_vars"]["RAY_ADDRESS"] = target
    runtime_env["env_vars"] = without_job_env_vars(runtime_env["env_vars"])
    try:
        ray.init(address=target, runtime_env=runtime_env, **kwargs)
    except ConnectionError as error:
        raise RayClusterUnreachableError(
            f"cannot reach the Ray cluster at {target} ({source}): {error}. {hint}"
        ) from error


@contextlib.contextmanager
def environment(**values: str | None):
    """os.environ with values set (None: unset) inside the block, as it was after it."""
    saved = {key: os.environ.get(key) for key in values}

    def apply(changes: dict) -> None:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    apply(values)
    try:
        yield
    finally:
        apply(saved)


RAY_DIR_PREFIX = "ray-"  # a local Ray's own folder under the temp dir, removed when the command ends
# characters of the temp dir that may hold it: Ray's unix sockets live 70 characters below it (session_<time>/
# sockets/<name>), and a socket's path must stay under 107 bytes; a longer temp dir gives /tmp instead
MAX_RAY_DIR_PARENT = 24


def private_ray_dir(env_vars: dict[str, str]) -> str:
    """A new folder for a local Ray that this process starts: its session (logs, sockets) and, through TMPDIR in
    env_vars (the job's runtime_env), its workers' temporaries (multiprocessing's pymp-* folders, which a killed
    worker leaves). Removed, after ray.shutdown, when this process exits; nothing is left in /tmp/ray."""
    import atexit

    parent = tempfile.gettempdir()
    parent = parent if len(parent) <= MAX_RAY_DIR_PARENT else "/tmp"
    remove_stale_ray_dirs(Path(parent))
    folder = tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir=parent)
    (Path(folder) / RAY_DIR_OWNER).write_text(str(os.getpid()))
    env_vars["TMPDIR"] = folder

    def remove() -> None:
        import ray

        ray.shutdown()
        for _ in range(40):  # Ray's processes may still write their last logs for a moment after the shutdown
            shutil.rmtree(folder, ignore_errors=True)
            if not os.path.exists(folder):
                break
            time.sleep(0.25)

    atexit.register(remove)
    return folder


RAY_DIR_OWNER = "pyseg-owner.pid"  # in a local Ray's folder: the pid of the command that started it


def remove_stale_ray_dirs(parent: Path) -> list[Path]:
    """Deletes the folders of local Rays whose command died without removing them (kill -9): those in parent
    whose owner pid is no longer running. Returns them."""
    stale = []
    for folder in parent.glob(f"{RAY_DIR_PREFIX}*"):
        try:
            owner = int((folder / RAY_DIR_OWNER).read_text())
        except (OSError, ValueError):
            continue  # not one of pyseg's, or not finished being made
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder)
        except PermissionError:
            pass  # alive, another user's
    return stale


# The raylet's "N PYTHON worker processes have been started on node ..." warns about Ray's own worker pool: every
# trial starts a trainable, a Train controller and its workers, so a search on a small machine passes Ray's
# threshold (4x its CPUs) without anything being wrong. Quiet runs drop it on the driver; other raylet messages
# (a worker killed for memory, a node that died) still print.
WORKER_POOL_WARNING = "worker processes have been started on node"


def drop_worker_pool_warnings() -> None:
    """Wraps the driver's printer of raylet messages so the worker-pool warning is not printed; idempotent, and a
    no-op if Ray's internal printer moves."""
    from ray._private import worker  # internal: checked below, skipped if it moves

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "drops_worker_pool_warnings", False):
        return

    def print_unless_worker_pool_warning(data, *args, **kwargs):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and all(WORKER_POOL_WARNING in line for line in lines):
            return None
        return printer(data, *args, **kwargs)

    print_unless_worker_pool_warning.drops_worker_pool_warnings = True
    worker.print_to_stdstream = print_unless_worker_pool_warning


def _check_reachable(target: str, source: str, hint: str) -> None:
    """Raises RayClusterUnreachableError unless target's host:port (auto: the one `ray start` recorded) accepts a
    TCP connection within CONNECT_TIMEOUT_S; ray.init would retry a dead address for minutes."""
    where = f"{target} ({source})"
    if target == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment  # internal: skip if it moves
        except ImportError:
            return
        try:
            resolved = get_ray_address_from_environment("auto", None)
        except ConnectionError as error:
            raise RayClusterUnreachableError(f"cannot reach the Ray cluster at {where}: {error}. {hint}") from error
        where += f", that is {resolved}, the address the last `ray start` on this machine recorded"
    else:
        resolved = target.removeprefix("ray://")
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: ray.init judges it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayClusterUnreachableError(
            f"cannot reach the Ray cluster at {where}: nothing answers there ({error}). {hint}"
        ) from None


class RayReportHook(Hook):
    """Every worker calls ray.train.report once per epoch (it is a barrier); rank 0 attaches weights/last.pt.

    Subclasses send the reports elsewhere (send) and attach a checkpoint to fewer of them (wants_checkpoint)."""

    def __init__(self):
        self.reports = 0

    def wants_checkpoint(self, trainer: Trainer, epoch: int) -> bool:
        return trainer.is_main

    def send(self, metrics: dict, checkpoint_folder: Path | None, epoch: int) -> None:
        import ray.train

        if checkpoint_folder is None:
            ray.train.report(metrics)
            return
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self.reports += 1
        metrics = {key: value for key, value in row.items() if isinstance(value, int | float)}
        metrics["best_fitness"] = trainer.best_fitness
        if not self.wants_checkpoint(trainer, row["epoch"]):
            self.send(metrics, None, row["epoch"])
            return
        with tempfile.TemporaryDirectory(prefix="pyseg-ckpt-") as folder:
            source = trainer.weights_dir / CHECKPOINT_FILE
            try:
                os.link(source, Path(folder) / CHECKPOINT_FILE)
            except OSError:
                shutil.copy2(source, Path(folder) / CHECKPOINT_FILE)
            self.send(metrics, Path(folder), row["epoch"])

    def report_finished_run(self, trainer: Trainer) -> None:
        """For a run restored already finished (nothing left to train, so no epoch reported): reports its last
        results.csv row once, so that Ray (and Tune, whose record of the trial may stop at an earlier epoch when the
        search was interrupted as the trial ended) sees how it ended. Every worker calls it (a barrier)."""
        metrics = {}
        if trainer.is_main:
            rows = read_results(trainer.run_dir / "results.csv")
            metrics = {key: parse_number(value) for key, value in (rows[-1] if rows else {}).items()}
            metrics = {key: value for key, value in metrics.items() if value is not None}
            metrics["best_fitness"] = trainer.best_fitness
        self.send(metrics, None, int(metrics.get("epoch", 0)))
        self.reports += 1


def _quiet_report_log() -> None:
    """Ray Train logs every ray.train.report with its whole metrics dict at INFO; pyseg prints its own epoch line."""
    try:
        from ray.train.v2._internal.execution import context as ray_context  # internal: skip quietly if it moves
    except ImportError:
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)  # Ray names that logger by its file


def train_loop_per_worker(loop_config: dict) -> None:
    """The function each Ray Train worker runs: a Trainer for this rank, restored from Ray's last checkpoint."""
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    storage = loop_config.get("storage")
    cfg = stage_run_folder(loop_config["config"], storage, rank)  # every rank stages its own copy on its node
    report = RayReportHook()
    hooks = build_hooks(TrackingConfig(**loop_config["tracking"]), loop_config.get("hooks", ()), storage, report)
    restore_dir = resume_from = None
    fit_started_at = loop_config.get("fit_started_at", 0.0)
    run_dir = Path(cfg.project) / cfg.name
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            restore_dir = Path(tempfile.mkdtemp(prefix=f"{RESTORE_PREFIX}rank{rank}-"))
            checkpoint.to_directory(restore_dir)
            hooks.insert(0, RemoveFolderHook(restore_dir))
            resume_from = restore_dir / CHECKPOINT_FILE
            hooks.append(RestartMessageHook(f"Ray checkpoint {checkpoint.path}", fit_started_at))
        else:
            own = Path(cfg.project) / cfg.name / "weights" / CHECKPOINT_FILE
            # a stored run's last.pt is always its latest (a search never reuses a trial's folder, a training
            # refuses a stored name); a local one counts when written in this fit
            if not cfg.resume and own.is_file() and (storage or own.stat().st_mtime >= fit_started_at):
                # restarted before Ray registered any checkpoint of this fit (the first report died with its
                # worker): the run's own last.pt is where it stands
                resume_from = own
                hooks.append(RestartMessageHook(str(own), fit_started_at))
        trainer = Trainer(
            cfg,
            hooks,
            rank=rank,
            world_size=world_size,
            show_progress=False,
            device=worker_device(cfg.device, f"rank {rank}", train_worker=True),
            cpus=loop_config["cpus_per_worker"],
            wrap_model=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
            resume_from=resume_from,
            config_overrides=loop_config.get("config_overrides"),
        )
        trainer.fit()
        if report.reports == 0:
            report.report_finished_run(trainer)
        if storage:  # everything is in the storage: the node keeps no copy
            remove_staged(run_dir)
    finally:
        if restore_dir is not None:
            shutil.rmtree(restore_dir, ignore_errors=True)


class RestartMessageHook(Hook):
    """Rank 0 says where a restored run continues: after a worker or node failure in this fit, with the time lost
    (the work since the checkpoint was written, and the restart); else a run resumed from an earlier fit."""

    def __init__(self, source: str, fit_started_at: float):
        self.source, self.fit_started_at = source, fit_started_at

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        saved_at = trainer.restored_saved_at
        workers = f"{trainer.world_size} worker{'s' if trainer.world_size > 1 else ''}"
        where = f"epoch {trainer.start_epoch + 1} on {workers}, from {self.source}"
        if saved_at is not None and saved_at >= self.fit_started_at:
            print(f"restarted after a failure: continuing at {where}; time lost: {time.time() - saved_at:.0f} s")
        else:
            print(f"resuming at {where}")


class RemoveFolderHook(Hook):
    """Removes a folder once the trainer has set up (a restored checkpoint, loaded by then), so that a worker killed
    later (a trial stopped by ASHA or by Ctrl-C) leaves nothing behind."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_fit_start(self, trainer: Trainer) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def prepare_run(cfg: TrainConfig, local: bool = True) -> tuple[TrainConfig, Path]:
    """Absolute paths and a fixed run folder (decided once here, so restarted workers find the same one), made
    unless the run is kept on a remote storage (local False: each node stages its own copy)."""
    cfg = absolute_paths(cfg)
    if cfg.resume:
        run_dir = Path(cfg.project) / cfg.name
    else:
        run_dir = unique_run_dir(cfg.project, cfg.name, cfg.exist_ok)
        cfg = dataclasses.replace(cfg, name=run_dir.name, exist_ok=True)
    if local:
        run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir


def fit_with_ray(
    cfg: TrainConfig,
    scaling: RayScaling,
    tracking: TrackingConfig | None = None,
    *,
    extra_hooks: Sequence[Hook] = (),
    callbacks: Sequence = (),
    config_overrides: dict | None = None,
    storage: str | None = None,
):
    """Trains cfg on scaling.workers Ray Train workers; returns (run folder, ray.train.Result).

    The Ray checkpoints live in <run folder>/ray_train; running again with cfg.resume (same project and name)
    continues from the latest one. extra_hooks run on every worker after the default hooks. config_overrides
    replace the values a resumed run takes from its checkpoint. storage: the URI that keeps this run's folder when
    nodes share no disk (pyseg.distributed.storage); the run then trains in cfg's folder as a local staging copy on
    each node, and Ray's checkpoints go to storage/ray_train.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(scaling.address)  # first: a cluster that does not answer leaves no empty run folder behind
    cfg, run_dir = prepare_run(cfg, local=storage is None)
    tracking = tracking or TrackingConfig()
    scaling = scaling.resolved()
    check_device_has_gpus(cfg.device, scaling.gpus_per_worker)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg,  # the TrainConfig itself: Ray pickles it to every worker
            "tracking": dataclasses.asdict(tracking),
            "hooks": list(extra_hooks),
            "cpus_per_worker": scaling.cpus_per_worker,
            "fit_started_at": time.time(),  # a checkpoint written after this is a restart after a failure
            "config_overrides": dict(config_overrides or {}),
            "storage": storage,
        },
        # NCCL needs a whole GPU per rank; workers that share a GPU (fractions) talk over gloo
        torch_config=TorchConfig(backend="nccl" if (scaling.gpus_per_worker or 0) >= 1 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers(),
            use_gpu=bool(scaling.gpus_per_worker),
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=storage or str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": forwarded_env()},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = fit_in_thread(trainer)
    except KeyboardInterrupt:
        raise RayRunInterrupted(run_dir) from None
    if storage:
        remove_staged_on_every_node([storage])
    return run_dir, result


def remove_staged_on_every_node(storage_uris: Sequence[str], timeout_s: float = 60.0) -> None:
    """Removes the staging copies of the runs kept at storage_uris from every live node of the connected Ray (a
    worker stopped or killed mid-run leaves its copy); a node that does not answer within timeout_s keeps its."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remove = ray.remote(num_cpus=0, max_retries=0)(remove_all_staged)
    pending = [
        remove.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            list(storage_uris)
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]
    ray.wait(pending, num_returns=len(pending), timeout=timeout_s)


def fit_in_thread(trainer):
    """trainer.fit() in a helper thread, so that Ctrl-C reaches the caller as KeyboardInterrupt. In the main thread,
    Ray Train installs its own SIGINT handler, which aborts the run and exits with code 1 and no word about how to
    continue. The workers end with this process (Ray ends the actors of a driver that exits)."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the main thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="pyseg-ray-train", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # a join with a timeout lets SIGINT's KeyboardInterrupt through
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
