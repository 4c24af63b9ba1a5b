"""A search's own record, search.json in its folder: what `pyseg.tune --resume` continues from.

Ray Tune keeps a search's state in pickles (tuner.pkl, searcher state, trial states with cloudpickled fields), and
unpickling runs whatever code the file names: a search folder or bucket that someone else can write to would run
their code on every machine that resumes it. pyseg never reads those files. It keeps this record instead (JSON,
checked value by value when read): the search's base config, space and settings, and every trial it started (its
folder under trials/, its sampled values, and whether it ended, failed or was still running). A resumed search is
a new Tune run that continues the unfinished trials in their folders (from weights/last.pt) and samples the rest.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyseg.errors import ConfigError
from pyseg.files import atomic_write_text

SEARCH_FILE = "search.json"
FORMAT = 1  # the record's format; a record of another format is refused
RUNNING, ENDED, FAILED = "running", "ended", "failed"  # a trial's status in the record
# The config key that marks a trial continuing an earlier one: its value is the trial's folder under trials/
CONTINUES = "_pyseg_continues"
# What Ray Tune writes in a search's folder: its pickled state (never read by pyseg, deleted on --resume so that
# no Ray code path reads an old copy) and its folder per trial.
RAY_STATE_PATTERNS = (
    "tuner.pkl", "trainable.pkl", "experiment_state*.json", "searcher-state*", "basic-variant-state*",
    "search_gen_state*",
)  # fmt: skip
# A trial's folder is named by its Tune trial id (5 hex digits, _, a counter): nothing else, so that a tampered
# record cannot name a folder of pyseg's own (trials/, weights/) or one outside the search
_FOLDER_NAME = re.compile(r"^[0-9a-f]{5}_[0-9]{5,9}$")


class SearchRecordError(ConfigError):
    """A search.json that is missing, damaged or holds values pyseg does not accept; the message names the file."""


@dataclass
class TrialRecord:
    status: str  # RUNNING, ENDED (done, or stopped by the scheduler) or FAILED
    config: dict  # the values Tune sampled for it (the space's keys)


@dataclass
class SearchRecord:
    base: dict  # the TrainConfig every trial starts from (config.make_config checks it)
    space: dict  # the search space, as in its YAML file ({key: {distribution: args}} or a fixed value)
    settings: dict  # the TuneSettings that define the search (samples, scheduler, search, seed, budgets, resources)
    trials: dict[str, TrialRecord] = field(default_factory=dict)  # by folder name under trials/
    elapsed_s: float = 0.0  # seconds the search has run, over all its runs (what a --time-budget counts)
    budget_spent: str | None = None  # "time" or "epoch" once that budget ended the search

    def to_json(self) -> str:
        trials = {name: {"status": t.status, "config": t.config} for name, t in self.trials.items()}
        record = {
            "pyseg_search": FORMAT, "base": self.base, "space": self.space, "settings": self.settings,
            "trials": trials, "elapsed_s": self.elapsed_s, "budget_spent": self.budget_spent,
        }  # fmt: skip
        return json.dumps(record, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> SearchRecord:
        """The record in text (read from source); SearchRecordError for anything but a record of this format."""

        def refuse(problem: str) -> SearchRecordError:
            return SearchRecordError(
                f"{source}: {problem}; it is not a search record pyseg wrote. Start a new search with another --name"
            )

        try:
            record = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
        except ValueError as error:
            raise refuse(f"is not valid JSON ({error})") from None
        except RecursionError:
            raise refuse("is nested too deeply") from None
        if not isinstance(record, dict) or record.get("pyseg_search") != FORMAT:
            raise refuse(f"has no 'pyseg_search: {FORMAT}' mark")
        for key in ("base", "space", "settings", "trials"):
            if not isinstance(record.get(key), dict):
                raise refuse(f"its {key!r} is not a mapping")
        trials = {}
        for name, trial in record["trials"].items():
            if not _FOLDER_NAME.match(name):
                raise refuse(f"trial folder name {name!r} is not a Tune trial id (like 3f2a1_00004)")
            if not isinstance(trial, dict) or trial.get("status") not in (RUNNING, ENDED, FAILED):
                raise refuse(f"trial {name}: its status is not one of {RUNNING}, {ENDED}, {FAILED}")
            if not isinstance(trial.get("config"), dict) or not all(_is_plain(v) for v in trial["config"].values()):
                raise refuse(f"trial {name}: its config is not a mapping of plain values")
            trials[name] = TrialRecord(trial["status"], trial["config"])
        elapsed, spent = record.get("elapsed_s", 0.0), record.get("budget_spent")
        if not isinstance(elapsed, int | float) or isinstance(elapsed, bool) or not 0 <= elapsed < math.inf:
            raise refuse(f"elapsed_s {elapsed!r} is not a number of seconds")
        if spent not in (None, "time", "epoch"):
            raise refuse(f"budget_spent {spent!r} is not time, epoch or null")
        return cls(record["base"], record["space"], record["settings"], trials, float(elapsed), spent)


def _is_plain(value) -> bool:
    """A JSON scalar (finite) or a list of them: what a sampled value can be."""
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value))


def read_record(path: Path) -> SearchRecord:
    """The record at path; SearchRecordError naming it when it cannot be read."""
    if not path.is_file():
        raise SearchRecordError(
            f"the search record {path} is not a regular file; start a new search with another --name"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not a problem
    except (OSError, UnicodeDecodeError) as error:
        raise SearchRecordError(f"cannot read the search record {path}: {error}") from None
    return SearchRecord.from_json(text, str(path))


def ray_state_files(names: list[str]) -> list[str]:
    """Those of names (files in a search's folder) that are Ray Tune's own state (RAY_STATE_PATTERNS)."""
    return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in RAY_STATE_PATTERNS)]


def trial_folder(trial) -> str:
    """A Tune trial's folder name under trials/ (and its name in Tune): the folder of the trial it continues, or
    its own trial id. Tune's trial_name_creator and trial_dirname_creator."""
    return trial.config.get(CONTINUES) or trial.trial_id


def sampled_values(config: dict) -> dict:
    """A trial's config without pyseg's marks: the values it trains with."""
    return {key: value for key, value in config.items() if key != CONTINUES}


class RecordKeeper:
    """Keeps a search's record current: saves it (atomically, and to the storage too when the search is kept on
    one) on every trial's start, end and failure. The Tune callback of pyseg.distributed.record_callback feeds it.
    """

    def __init__(self, record: SearchRecord, path: Path, storage=None):
        self.record, self.path, self.storage = record, path, storage
        self.elapsed_before = record.elapsed_s
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self._started

    def save(self) -> None:
        self.record.elapsed_s = self.elapsed()
        atomic_write_text(self.path, self.record.to_json())
        if self.storage is not None:
            self.storage.write_file(self.path, self.path.name)

    def trial_started(self, name: str, config: dict) -> None:
        self.record.trials[name] = TrialRecord(RUNNING, sampled_values(config))
        self.save()

    def trial_ended(self, name: str, config: dict, status: str) -> None:
        self.record.trials[name] = TrialRecord(status, sampled_values(config))
        self.save()
