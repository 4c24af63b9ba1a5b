"""A search's own record (search.json): what --resume continues from, read as JSON and checked, never Ray's pickles."""

from __future__ import annotations

import json
import pickle

import pytest

from pyseg.distributed.search_resume import read_search_record
from pyseg.distributed.search_state import (
    CONTINUES,
    ENDED,
    FAILED,
    RUNNING,
    SearchRecord,
    SearchRecordError,
    TrialRecord,
    ray_state_files,
    read_record,
    sampled_values,
    trial_folder,
)


def a_record() -> SearchRecord:
    return SearchRecord(
        base={"epochs": 2, "imgsz": 64},
        space={"lr0": {"loguniform": [1e-4, 1e-2]}, "optimizer": "adamw"},
        settings={"samples": 3, "scheduler": "asha"},
        trials={"a1b2c_00000": TrialRecord(ENDED, {"lr0": 0.001}), "a1b2c_00001": TrialRecord(RUNNING, {"lr0": 0.002})},
        elapsed_s=12.5,
    )


def test_a_record_reads_back_as_it_was_written_also_after_an_editor_added_a_byte_order_mark(tmp_path):
    path = tmp_path / "search.json"
    path.write_text(a_record().to_json())
    assert read_record(path) == a_record()
    path.write_text("\ufeff" + a_record().to_json(), encoding="utf-8")
    assert read_record(path) == a_record()


def test_an_infinite_elapsed_time_is_refused_not_written_back_as_infinity(tmp_path):
    path = tmp_path / "search.json"
    path.write_text(a_record().to_json().replace('"elapsed_s": 12.5', '"elapsed_s": 1e400'))
    with pytest.raises(SearchRecordError, match="elapsed_s inf is not a number of seconds"):
        read_record(path)


def test_a_record_that_is_not_a_regular_file_is_one_error(tmp_path):
    (tmp_path / "search.json").mkdir()
    with pytest.raises(SearchRecordError, match="not a regular file"):
        read_search_record(tmp_path, None)


class Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch /nonexistent/marker",)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda r: r.update(pyseg_search=2), "no 'pyseg_search: 1' mark"),
        (lambda r: r.update(trials={"../../etc": {"status": ENDED, "config": {}}}), "is not a Tune trial id"),
        # a trial named as one of pyseg's own folders would have its folder deleted on resume
        (lambda r: r.update(trials={"trials": {"status": ENDED, "config": {}}}), "is not a Tune trial id"),
        (lambda r: r.update(trials={"a1b2c_00009": {"status": "done", "config": {}}}), "status is not one of"),
        (lambda r: r.update(trials={"a1b2c_00009": {"status": FAILED, "config": {"lr0": {"x": 1}}}}), "plain values"),
        (lambda r: r.update(base=[1, 2]), "'base' is not a mapping"),
        (lambda r: r.update(elapsed_s=-1), "elapsed_s -1"),
        (lambda r: r.update(budget_spent="money"), "budget_spent 'money'"),
    ],
)
def test_a_record_pyseg_did_not_write_is_refused_naming_the_file_and_the_problem(tmp_path, change, problem):
    record = json.loads(a_record().to_json())
    change(record)
    path = tmp_path / "search.json"
    path.write_text(json.dumps(record))
    with pytest.raises(SearchRecordError) as error:
        read_record(path)
    assert str(path) in str(error.value) and problem in str(error.value) and "another --name" in str(error.value)


@pytest.mark.parametrize(
    "text",
    ["", "{", '{"pyseg_search": 1, "elapsed_s": NaN}', pickle.dumps(Payload()).hex(), "[" * 200_000 + "]" * 200_000],
)
def test_a_damaged_record_is_one_error_naming_it(tmp_path, text):
    path = tmp_path / "search.json"
    path.write_text(text)
    with pytest.raises(SearchRecordError, match="search.json"):
        read_record(path)


def test_a_folder_with_only_rays_pickled_state_is_refused_without_reading_it(tmp_path):
    """A search an older pyseg started (Ray's tuner.pkl, no search.json) is not continued: its pickle would run."""
    folder = tmp_path / "old"
    folder.mkdir()
    marker = tmp_path / "marker"
    payload = type("P", (), {"__reduce__": lambda self: (__import__("os").system, (f"touch {marker}",))})
    (folder / "tuner.pkl").write_bytes(pickle.dumps(payload()))
    with pytest.raises(SearchRecordError, match="older pyseg started it.*does not read pickles"):
        read_search_record(folder, None)
    with pytest.raises(SearchRecordError, match="no search to continue"):
        read_search_record(tmp_path / "missing", None)
    assert not marker.exists()


def test_rays_state_files_are_recognised_and_pysegs_are_not():
    names = [
        "tuner.pkl", "trainable.pkl", "experiment_state-2026-12-07_22-00-00.json", "searcher-state-2026.pkl",
        "basic-variant-state-2026.json", "search_gen_state-2026.json", "search.json", "tune_results.csv",
        "best.yaml", "trials", "mlflow_parent.json",
    ]  # fmt: skip
    assert ray_state_files(names) == names[:6]


def test_a_continued_trial_is_named_by_its_folder_and_trains_without_the_mark():
    class Trial:
        trial_id = "abcde_00000"
        config = {"lr0": 0.01}

    assert trial_folder(Trial()) == "abcde_00000"
    Trial.config = {"lr0": 0.01, CONTINUES: "01234_00003"}
    assert trial_folder(Trial()) == "01234_00003"
    assert sampled_values(Trial.config) == {"lr0": 0.01}
