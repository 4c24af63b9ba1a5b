"""What a resumed search runs, and what it refuses: values of the wrong type, trial folders that are links, a search
another process is running."""

from __future__ import annotations

import os

import pytest
from conftest import tiny_config

from pyseg.distributed.search_resume import check_setting_type, check_trial_folders
from pyseg.distributed.search_state import SEARCH_FILE, SearchRecord, SearchRecordError
from pyseg.errors import ConfigError
from pyseg.files import FolderInUseError, FolderLock


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("samples", 3, True), ("samples", "many", False), ("samples", True, False), ("samples", 2.5, False),
        ("gpus_per_trial", None, True), ("gpus_per_trial", 0.5, True), ("gpus_per_trial", "1", False),
        ("search", None, True), ("search", "random", True), ("search", 1, False),
        ("time_budget", 5, True), ("torch_trainer_per_trial", False, True), ("torch_trainer_per_trial", 1, False),
    ],
)  # fmt: skip
def test_a_records_settings_must_have_their_fields_types(key, value, allowed):
    if allowed:
        check_setting_type(key, value)
    else:
        with pytest.raises(ConfigError, match=f"settings.{key} must be of type"):
            check_setting_type(key, value)


def test_a_trial_folder_that_is_a_link_or_a_file_is_refused(tmp_path):
    trials = tmp_path / "trials"
    (trials / "a1b2c_00000").mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    check_trial_folders(trials, ["a1b2c_00000", "a1b2c_00009"])  # a plain folder, and one not made yet
    (trials / "a1b2c_00001").symlink_to(tmp_path / "victim")
    with pytest.raises(SearchRecordError, match="a1b2c_00001 is not a plain folder"):
        check_trial_folders(trials, ["a1b2c_00000", "a1b2c_00001"])
    (trials / "a1b2c_00002").write_text("")
    with pytest.raises(SearchRecordError, match="a1b2c_00002 is not a plain folder"):
        check_trial_folders(trials, ["a1b2c_00002"])


def test_a_folder_lock_is_taken_once_and_names_its_holder(tmp_path):
    lock = FolderLock(tmp_path / "run", "the run")
    with pytest.raises(
        FolderInUseError, match=f"the run {tmp_path / 'run'} is in use by another pyseg process \\(pid {os.getpid()}\\)"
    ):
        FolderLock(tmp_path / "run", "the run")
    lock.release()
    FolderLock(tmp_path / "run", "the run").release()  # free again


def test_a_search_another_process_is_resuming_is_refused_before_anything_runs(tiny_data, tmp_path):
    from pyseg.distributed.search import run_tune
    from pyseg.distributed.search_settings import TuneSettings
    from pyseg.distributed.tracking import TrackingConfig

    base = tiny_config(tiny_data, tmp_path)
    folder = os.path.join(base.project, "busy")
    record = SearchRecord(base.to_dict(), {"lr0": {"uniform": [0.001, 0.01]}}, {"samples": 2, "scheduler": "none"})
    os.makedirs(folder)
    with open(os.path.join(folder, SEARCH_FILE), "w") as file:
        file.write(record.to_json())
    held = FolderLock(folder, "the search")
    try:
        with pytest.raises(FolderInUseError, match="in use by another pyseg process"):
            run_tune(base, {}, TuneSettings(name="busy", resume=True), TrackingConfig(enabled=False))
    finally:
        held.release()
