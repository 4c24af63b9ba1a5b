"""What a resumed search does: its config, space and settings from its record (search.json), checked as a new
search's; Ray's old state deleted unread; which trials are finished, which continue, how many are new, and what is
left of its budgets."""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from pyseg.config import TrainConfig, make_config
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import SearchSpace, parse_search_space, pbt_mutations
from pyseg.distributed.search_state import (
    ENDED,
    SEARCH_FILE,
    SearchRecord,
    SearchRecordError,
    TrialRecord,
    ray_state_files,
    read_record,
)
from pyseg.distributed.storage import Storage
from pyseg.engine.run_files import BEST_METRIC as METRIC
from pyseg.engine.trainer import parse_number, read_results
from pyseg.errors import ConfigError

# TuneSettings that define a search: a resumed search takes them from its record; the others (where Ray runs, the
# storage, the name, the output) come from the command that resumes it.
SEARCH_DEFINING = (
    "samples", "scheduler", "search", "workers_per_trial", "gpus_per_trial", "cpus_per_worker", "max_concurrent",
    "time_budget", "grace_period", "epoch_budget", "seed", "max_failures", "perturbation_interval",
    "torch_trainer_per_trial",
)  # fmt: skip


def search_defining_settings(settings: TuneSettings) -> dict:
    return {key: getattr(settings, key) for key in SEARCH_DEFINING}


def read_search_record(experiment_dir: Path, kept: Storage | None) -> SearchRecord:
    """The record of the search to continue (from the storage, when the search is kept on one); SearchRecordError
    (a ConfigError) when there is none, naming what to do. Ray's own state in the folder is never read."""
    path = experiment_dir / SEARCH_FILE
    shown = kept.display if kept else experiment_dir
    if kept:
        if kept.exists(SEARCH_FILE):
            kept.download_file(path, SEARCH_FILE)
        else:
            path.unlink(missing_ok=True)  # an old copy here is not the search's
    if not path.exists() and not path.is_symlink():
        if kept:
            names = sorted({name.split("/", 1)[0] for name in kept.files()})
        else:
            names = [p.name for p in experiment_dir.iterdir()] if experiment_dir.is_dir() else []
        if ray_state_files(names):
            raise SearchRecordError(
                f"--resume: {shown} holds a Ray Tune experiment without pyseg's record ({SEARCH_FILE}): an older "
                "pyseg started it, and only Ray's pickled state could continue it. pyseg does not read pickles from "
                "a search folder (they can run code); start a new search with another --name"
            )
        where = "--storage" if kept else "--project"
        raise SearchRecordError(f"--resume: no search to continue in {shown}; check {where} and --name")
    return read_record(path)


def resumed_search(
    record: SearchRecord, given: TrainConfig, settings: TuneSettings, path: Path
) -> tuple[TrainConfig, SearchSpace, TuneSettings]:
    """The base config, space and settings of the search a record describes: its own, checked as a new search's
    are, with this command's project (where the search is now), place to run and output."""
    try:
        base = make_config({**record.base, "project": given.project})
        space = parse_search_space(record.space, f"{path} (space)", base)
        unknown = sorted(set(record.settings) - set(SEARCH_DEFINING))
        if unknown:
            raise ConfigError(f"unknown settings {', '.join(unknown)}")
        for key, value in record.settings.items():
            check_setting_type(key, value)
        settings = dataclasses.replace(settings, **record.settings)  # __post_init__ checks the values
    except (ConfigError, ValueError, TypeError) as error:
        raise SearchRecordError(f"{path}: {error}; start a new search with another --name") from None
    if settings.scheduler == "pbt":
        pbt_mutations(space)
    for name, trial in record.trials.items():
        extra = sorted(set(trial.config) - set(space))
        try:
            if extra:
                raise ConfigError(f"values of keys the space does not search: {', '.join(extra)}")
            base.updated(**trial.config)
        except (ConfigError, ValueError) as error:
            raise SearchRecordError(f"{path}: trial {name}: {error}; start a new search with another --name") from None
    return base, space, settings


def check_setting_type(key: str, value) -> None:
    """ConfigError unless value has the type of the TuneSettings field key (numbers as numbers, never as text or
    true/false; None only where the field allows it)."""
    field = next(f for f in dataclasses.fields(TuneSettings) if f.name == key)
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    allowed = [kind for part in str(field.type).split("|") for kind in kinds.get(part.strip(), ())]
    if value is None and "None" in str(field.type):
        return
    if isinstance(value, bool) != (bool in allowed) or not isinstance(value, tuple(allowed)):
        raise ConfigError(f"settings.{key} must be of type {field.type}, got {value!r}")


def check_trial_folders(trials_dir: Path, names: list[str]) -> None:
    """SearchRecordError when a trial's folder is anything but a plain folder (a symbolic link would make the
    resumed trial write wherever it points)."""
    for name in names:
        folder = trials_dir / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise SearchRecordError(
                f"--resume: the trial folder {folder} is not a plain folder (a symbolic link or a file): a trial "
                "writes only into its own folder; put the trial's folder itself there, or start a new search"
            )


def remove_ray_state(experiment_dir: Path, kept: Storage | None, trials: list[str]) -> None:
    """Deletes Ray Tune's state of an earlier run of the search (its pickles, and its folder of each trial): the
    resumed run writes its own, and no Ray code path reads the old copies."""
    if experiment_dir.is_dir():
        for name in ray_state_files([p.name for p in experiment_dir.iterdir()]):
            (experiment_dir / name).unlink(missing_ok=True)
    for trial in trials:  # Tune's folder of each trial (named by the trial id: see search_state._FOLDER_NAME)
        folder = experiment_dir / trial
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
    if kept is not None:
        top = {path.split("/", 1)[0] for path in kept.files()}
        for name in ray_state_files(sorted(top)):
            kept.delete(name)
        for trial in trials:
            if trial in top:
                kept.delete(trial)


@dataclass
class SearchPlan:
    """What a run of a search does: the trials of its record that are finished (done, stopped by the scheduler)
    and those to continue (interrupted, or failed), the new samples still to draw, and what is left of its
    budgets."""

    finished: dict[str, TrialRecord]
    to_continue: dict[str, TrialRecord]
    finished_points: list[tuple[dict, float]]  # (values, last metric) of the finished trials, for TPE
    new_samples: int
    epochs_trained: int  # by all trials so far (the epoch budget counts them)
    time_left_s: float | None  # of the time budget (None: no budget)
    budget_spent: str | None

    @property
    def trials_to_run(self) -> int:
        return len(self.to_continue) + self.new_samples

    @classmethod
    def of(cls, record: SearchRecord, trials_dir: Path, base: TrainConfig, space, settings: TuneSettings):
        finished, to_continue, points, trained = {}, {}, [], 0
        for name, trial in record.trials.items():
            history = read_results(trials_dir / name / "results.csv")
            trained += len(history)
            done = len(history) >= base.epochs
            if trial.status == ENDED or done:
                finished[name] = TrialRecord(ENDED, trial.config)
                last = parse_number(history[-1].get(METRIC)) if history else None
                if last is not None and math.isfinite(last):
                    points.append((trial.config, last))
            else:
                to_continue[name] = trial
        time_left = None
        spent = record.budget_spent
        if settings.time_budget:
            time_left = settings.time_budget - record.elapsed_s
            if time_left <= 0:
                spent = spent or "time"
        if settings.epoch_budget and trained >= settings.epoch_budget:
            spent = spent or "epoch"
        new = max(settings.samples - len(record.trials), 0)
        return cls(finished, to_continue, points, new, trained, time_left, spent)
