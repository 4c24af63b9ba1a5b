"""pyseg.distributed.search_view: the live trial table of pyseg.tune, on a terminal (a pty) and in a log."""

from __future__ import annotations

import io
import os
import re
import threading

from pyseg.distributed.search_view import (
    SearchView,
    TrialState,
    abbreviate,
    error_summary,
    format_trials,
    legend,
    status_line,
)

SEARCHED = ["lr0", "weight_decay", "mosaic", "warmup_epochs", "warmup_momentum", "hsv_h", "hsv_s", "copy_paste"]
VALUES = {"lr0": 0.0031, "weight_decay": 0.0004, "mosaic": 0.81, "warmup_epochs": 1.5, "warmup_momentum": 0.8}
VALUES.update({"hsv_h": 0.01, "hsv_s": 0.6, "copy_paste": 0.2})


def test_short_names_are_distinct_and_the_same_in_any_order():
    names = abbreviate(SEARCHED)
    assert len(set(names.values())) == len(SEARCHED)
    assert names == abbreviate(list(reversed(SEARCHED)))  # the same keys always get the same names
    assert names["weight_decay"] == "wd" and names["lr0"] == "lr0" and names["mosaic"] == "mos"
    assert "wd = weight_decay" in legend(names) and "lr0 = lr0" not in legend(names)
    clash = abbreviate(["warmup_momentum", "weight_momentum"])  # both would be "wm"
    assert len(set(clash.values())) == 2


def states() -> list[TrialState]:
    first, second = TrialState("4634f_00000", VALUES), TrialState("4634f_00001", {**VALUES, "lr0": 0.02})
    first.record({"epoch": 1, "mask/map": 0.1, "mask/map50": 0.3, "epoch_seconds": 5.0}, now=100.0)
    first.record({"epoch": 2, "mask/map": 0.05, "mask/map50": 0.2}, now=160.0)
    second.record({"epoch": 1, "mask/map": 0.2, "mask/map50": 0.4}, now=100.0)
    first.status = second.status = "RUNNING"
    return [first, second]


def test_the_table_fits_the_width_best_first_with_best_and_last_metrics():
    trials = states()
    for width in (80, 100, 200):
        lines = format_trials(trials, 15, abbreviate(SEARCHED), width)
        assert all(len(line) <= width for line in lines), width
    wide = format_trials(trials, 15, abbreviate(SEARCHED), 200)
    assert "wd" in wide[0] and "cp" in wide[0] and not wide[-1].startswith("(")  # every value fits
    narrow = format_trials(trials, 15, abbreviate(SEARCHED), 80)
    assert narrow[-1].startswith("(") and "more searched values" in narrow[-1]
    assert wide[1].split()[0] == "4634f_00001"  # best first
    row = wide[2].split()
    assert row[:7] == ["4634f_00000", "RUNNING", "2/15", "0.100", "0.300", "0.050", "0.200"]
    assert row[7] == "1:05"  # 5 s of its first epoch before its first report, then 60 s
    assert "0.0031" in wide[2] and "0.8" in wide[2]
    assert "best 4634f_00001 mask mAP50-95 0.200" in status_line(trials, 75.0)
    assert "2 running, 0 ended, 0 failed, 2 waiting of 4" in status_line(trials, 75.0, samples=4)  # 2 not begun


def test_in_a_log_a_status_line_every_n_seconds_and_the_table_when_a_trial_ends():
    log = io.StringIO()
    view = SearchView(SEARCHED, epochs=3, every_s=0.0, stream=log)
    view.start()
    view.trial_started("t_00000", VALUES)
    view.trial_result("t_00000", VALUES, {"epoch": 1, "mask/map": 0.1, "mask/map50": 0.3})
    view.trial_ended("t_00000", VALUES, "TERMINATED")
    view.trial_ended("t_00001", VALUES, "ERROR", "ValueError: boom", "/runs/tune/t_00001/error.txt")
    text = log.getvalue()
    assert text.startswith("searched: lr0, wd = weight_decay")
    assert text.count("searched:") == 1 and "\x1b[" not in text  # no escape codes in a log
    assert "pyseg.tune 0:00: 1 running" in text and text.count("trial       status") == 2
    assert "trial t_00001 failed: ValueError: boom; its error file: /runs/tune/t_00001/error.txt" in text

    quiet = io.StringIO()
    view = SearchView(SEARCHED, epochs=3, every_s=3600.0, stream=quiet)
    for epoch in range(1, 4):
        view.trial_result("t_00000", VALUES, {"epoch": epoch, "mask/map": 0.1})
    assert "pyseg.tune" not in quiet.getvalue()  # nothing between the status lines


def test_a_trial_ended_before_its_last_epoch_shows_as_stopped_and_counts_as_ended():
    log = io.StringIO()
    view = SearchView(SEARCHED, epochs=3, every_s=0.0, stream=log)
    view.trial_result("t_00000", VALUES, {"epoch": 1, "mask/map": 0.1})
    view.trial_ended("t_00000", VALUES, "TERMINATED")  # ASHA or a budget ended it after epoch 1 of 3
    view.trial_result("t_00001", VALUES, {"epoch": 3, "mask/map": 0.2})
    view.trial_ended("t_00001", VALUES, "TERMINATED")
    assert [view.states[t].status for t in ("t_00000", "t_00001")] == ["STOPPED", "TERMINATED"]
    assert "0 running, 2 ended, 0 failed" in status_line(list(view.states.values()), 1.0)
    assert re.search(r"t_00000\s+STOPPED\s+1/3", log.getvalue())


def test_a_failed_trial_is_named_by_its_error_line_shortened():
    oom = "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory. " + "x " * 300
    lines = ["Traceback (most recent call last):", '  File "a.py", line 1', oom, "Refer to the docs " * 40]
    summary = error_summary(lines)
    assert summary.startswith("ray.exceptions.OutOfMemoryError: Task was killed") and len(summary) <= 200
    assert error_summary(["something went wrong"]) == "something went wrong" and error_summary([]) is None


def test_on_a_terminal_the_table_is_redrawn_in_place(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    leader, follower = os.openpty()
    received = []

    def read_all() -> None:  # drains the pty (a full one would block the writer) until its other end closes
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the follower side was closed
                return
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    terminal = os.fdopen(follower, "w")
    try:
        view = SearchView(SEARCHED, epochs=3, stream=terminal)
        assert view.terminal and view.width() == 100
        for epoch in (1, 2, 3):
            view.trial_result("t_00000", VALUES, {"epoch": epoch, "mask/map": 0.1 * epoch, "mask/map50": 0.5})
        view.trial_ended("t_00000", VALUES, "TERMINATED")
        view.close()
    finally:
        terminal.close()
        reader.join(timeout=10)
        os.close(leader)
    text = b"".join(received).decode()
    assert text.count("trial       status") >= 4  # drawn after every event ...
    assert re.search(r"\x1b\[\d*A|\x1b\[\d*F", text) or "\x1b[2K" in text  # ... over the previous drawing
    assert "3/3" in text and "TERMINATED" in text
