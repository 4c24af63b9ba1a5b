"""MLflow tracking that never stops training: one run per training, parent and child runs for tuning.

Every write goes through a queue. When the tracking server is unreachable or fails, pyseg warns once, keeps the
writes queued (results stay in results.csv either way) and sends them, in order, at the next epoch that reaches
the server. Only rank 0 logs.

Tracking URI: --mlflow-uri, else MLFLOW_TRACKING_URI, else a SQLite file next to the run folders
(sqlite:///<project>/mlflow.db, artifacts in <project>/mlartifacts). Open it with
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyseg.engine.run_files import BOX_MAP, BOX_MAP50, MASK_MAP, MASK_MAP50
from pyseg.engine.trainer import Hook, Trainer
from pyseg.errors import ConfigError
from pyseg.files import atomic_write_text

# A training must not hang on a dead server: MLflow's defaults retry for minutes (7 retries, 120 s timeout).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RUN_ID_FILE = "mlflow_run.json"
# MLflow's UI opens an experiment without this tag as a GenAI experiment (a traces page); pyseg's are model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_WORKFLOW = "workflowType=machine_learning"  # MLflow 3.17's UI opens the GenAI workspace without it


def experiment_url(ui_url: str, experiment_id: str) -> str:
    """The page of an experiment's runs in the MLflow UI at ui_url (http://HOST:PORT), as model training."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}"


ARTIFACTS = ("results.csv", "results.png", "args.yaml", "train_batch.jpg", "val_predictions.jpg")


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused a write; training goes on."""


@dataclass
class TrackingConfig:
    """Where and how a run is logged. uri "" = MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "pyseg"
    parent_run_id: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def mlflow_installed() -> bool:
    """True when `import mlflow` can find MLflow (it is not imported here: that takes seconds)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as none
        return False


def command_tracking(prog: str, no_mlflow: bool, uri: str, experiment: str) -> TrackingConfig:
    """The TrackingConfig of a command's --no-mlflow / --mlflow-uri / --mlflow-experiment, decided before any work.

    Without MLflow installed (a slim environment, a GPU box with only torch), a run asked to log to --mlflow-uri is a
    user error (ConfigError: the command exits 2 with one line); the default logging is turned off with a one-line
    note, and the run goes on with its results in results.csv as always.
    """
    if no_mlflow or mlflow_installed():
        return TrackingConfig(enabled=not no_mlflow, uri=uri, experiment=experiment)
    if uri:
        raise ConfigError(
            f"--mlflow-uri {uri}: MLflow is not installed in this environment; `pip install mlflow`, or pass "
            "--no-mlflow to train without tracking"
        )
    print(
        f"{prog}: MLflow is not installed, so this run is not tracked (results.csv holds every result); "
        "`pip install mlflow` to track it, --no-mlflow to turn tracking off without this note"
    )
    return TrackingConfig(enabled=False, uri=uri, experiment=experiment)


def resolve_tracking_uri(uri: str, project: str | Path) -> str:
    """The tracking URI to use; a bare local path becomes an absolute sqlite:/// URI."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{(Path(project).resolve() / 'mlflow.db').as_posix()}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return f"sqlite:///{Path(uri).resolve().as_posix()}"
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments of a local SQLite store (next to the .db); None = the server's."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the checkout holding path (default: pyseg's own), or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


# Logged first: MLflow's compare page charts the first metric a run logged (train/box, before this order).
LEADING_METRICS = (MASK_MAP, MASK_MAP50, BOX_MAP, BOX_MAP50)


def numeric_metrics(row: dict) -> dict[str, float]:
    """The float-valued entries of an epoch row, without the epoch itself; LEADING_METRICS first."""
    metrics = {}
    ordered = [*(key for key in LEADING_METRICS if key in row), *(key for key in row if key not in LEADING_METRICS)]
    for key in ordered:
        value = row[key]
        if key == "epoch" or isinstance(value, bool):
            continue
        try:
            metrics[key] = float(value)
        except (TypeError, ValueError):
            continue
    return metrics


def read_run_id(record: Path, uri: str) -> str | None:
    """The run id saved in record (JSON {uri, run_id}) when it belongs to the same tracking URI."""
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    return saved["run_id"] if saved.get("uri") == uri else None


def write_run_id(record: Path, run: MlflowRun) -> None:
    atomic_write_text(record, json.dumps({"uri": run.uri, "run_id": run.run_id}))


class MlflowRun:
    """One MLflow run written through a queue of deferred calls; failures warn once and retry later."""

    def __init__(self, uri: str, experiment: str, run_id: str | None = None):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri, self.experiment = uri, experiment
        self._client = None
        self.run_id = run_id
        self.experiment_id: str | None = None  # known once the run is created or reopened
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.failing = False
        self.failures = 0

    @property
    def client(self):
        """The MlflowClient, made on first use (inside a queued write, so that a bad store only warns)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # "Creating initial MLflow database tables..." and the like: not news to a user of a new store
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # ---------------------------------------------------------------- queue

    def queue(self, what: str, call: Callable[[], None]) -> None:
        self.pending.append((what, call))

    def flush(self) -> bool:
        """Sends the queued writes in order; True when nothing is left queued."""
        sent = 0
        while self.pending:
            what, call = self.pending[0]
            try:
                call()
            except Exception as error:  # a tracking problem of any kind must not stop training
                self.failures += 1
                if not self.failing:
                    warnings.warn(
                        f"MLflow at {self.uri}: {what} failed ({type(error).__name__}: {str(error)[:300]}). "
                        "Training goes on; results stay in results.csv and logging retries every epoch.",
                        TrackingWarning,
                        stacklevel=2,
                    )
                self.failing = True
                return False
            self.pending.pop(0)
            sent += 1
        if self.failing:
            print(f"MLflow at {self.uri} is reachable again: sent {sent} queued writes")
            self.failing = False
        return True

    # ---------------------------------------------------------------- writes

    def start(self, run_name: str | None, tags: dict[str, str], parent_run_id: str | None = None) -> None:
        def create():
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
                return
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older pyseg or by hand
                    self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            else:
                experiment_id = self.client.create_experiment(
                    self.experiment,
                    artifact_location=artifact_root(self.uri),
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            all_tags = {k: str(v) for k, v in tags.items() if v is not None}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
            self.run_id, self.experiment_id = run.info.run_id, experiment_id

        self.queue("creating the run", create)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            self.queue("logging params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step) for k, v in metrics.items()]
        self.queue(f"logging metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self.queue("setting tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_file():
            self.queue(
                f"uploading {path.name}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)
            )

    def finish(self, status: str = "FINISHED") -> None:
        self.queue("closing the run", lambda: self.client.set_terminated(self.run_id, status))


class MlflowHook(Hook):
    """Logs a training to MLflow on rank 0: params and tags at the start, metrics every epoch (step = epoch),
    artifacts at the end. The run id is kept in the run folder, so --resume continues the same run."""

    def __init__(self, tracking: TrackingConfig):
        self.tracking = tracking
        self.run: MlflowRun | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not (trainer.is_main and self.tracking.enabled):
            return
        cfg = trainer.cfg
        uri = resolve_tracking_uri(self.tracking.uri, cfg.project)
        run_id = read_run_id(trainer.run_dir / RUN_ID_FILE, uri) if trainer.start_epoch > 0 else None
        self.run = MlflowRun(uri, self.tracking.experiment, run_id)
        tags = {
            "pyseg.data": cfg.data,
            "pyseg.model": cfg.model,
            "pyseg.run_dir": str(trainer.run_dir.resolve()),
            "mlflow.source.git.commit": git_commit(),
            **self.tracking.tags,
        }
        self.run.start(self.tracking.run_name or trainer.run_dir.name, tags, self.tracking.parent_run_id)
        if run_id is None:
            self.run.log_params(cfg.to_dict())
        if self.run.flush():
            write_run_id(trainer.run_dir / RUN_ID_FILE, self.run)
            print(f"MLflow: run {self.run.run_id} in experiment {self.tracking.experiment!r} at {uri}")

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.run is None:
            return
        self.run.log_metrics(numeric_metrics(row), step=int(row["epoch"]))
        if self.run.flush() and not (trainer.run_dir / RUN_ID_FILE).is_file():
            write_run_id(trainer.run_dir / RUN_ID_FILE, self.run)  # the run was created after an outage

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.run is None:
            return
        for name in ARTIFACTS:
            self.run.log_artifact(trainer.run_dir / name)
        self.run.finish("FINISHED")
        if not self.run.flush():
            warnings.warn(
                f"MLflow at {self.run.uri}: {len(self.run.pending)} writes could not be sent "
                f"({self.run.failures} failed attempts); every result is in {trainer.run_dir}/results.csv",
                TrackingWarning,
                stacklevel=2,
            )
