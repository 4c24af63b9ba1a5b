"""What pyseg.tune shows while it searches: one line per trial, redrawn in place on a terminal; in a log, a short
status line every few seconds and the whole table only when a trial ends.

    trial        status      epoch  best 50-95     50  last 50-95     50   time  lr0     wd      mos
    4634f_00000  RUNNING      7/15       0.123  0.301       0.120  0.298   1:02  0.0031  0.0004  0.81

"best" is the trial's best validated epoch so far and "last" its latest one (mask mAP50-95 and mAP50); time is
the trial's wall time. The searched values get short names, the same in every table, explained once in a legend
(`SearchView.legend`). A trial that fails is always shown: its id, the last line of its error and its error file.
"""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass

from ray.tune import Callback

from pyseg.distributed.search_state import trial_folder
from pyseg.engine.run_files import BEST_METRIC, BOX_MAP, MASK_MAP50

METRIC, METRIC50 = BEST_METRIC, MASK_MAP50
FIXED_COLUMNS = (  # (title, width)
    ("trial", 11),
    ("status", 10),
    ("epoch", 7),
    ("best 50-95", 10),
    ("50", 6),
    ("last 50-95", 10),
    ("50", 6),
    ("time", 7),
)
ENDED = ("TERMINATED", "STOPPED", "ERROR")  # STOPPED: ended before its last epoch (ASHA, a budget)
ERROR_LINE_CHARS = 200  # a failed trial's error, shortened to this
DEFAULT_WIDTH = 120  # columns when the terminal's width is unknown (a log file)


@dataclass
class TrialState:
    """What the view knows of one trial: its latest and best validated results and its searched values."""

    trial_id: str
    values: dict
    status: str = "PENDING"
    epoch: int | None = None
    best: float | None = None
    best50: float | None = None
    last: float | None = None
    last50: float | None = None
    started: float | None = None  # time.monotonic() of its first result
    seconds: float = 0.0
    error: str | None = None  # the last line of its error
    error_file: str | None = None

    def record(self, result: dict, now: float) -> None:
        """Takes one reported result (an epoch's results.csv row as Tune passes it on)."""
        if self.started is None:
            self.started = now - float(result.get("epoch_seconds", 0.0) or 0.0)
        self.seconds = now - self.started
        self.epoch = int(result["epoch"]) if result.get("epoch") is not None else self.epoch
        value, value50 = _number(result.get(METRIC)), _number(result.get(METRIC50))
        if value is not None:
            self.last, self.last50 = value, value50
            if self.best is None or value > self.best:
                self.best, self.best50 = value, value50


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN: not validated


def abbreviate(keys: list[str]) -> dict[str, str]:
    """Short, distinct names for searched keys, the same for the same keys in any order: keys of up to four
    letters stay (lr0, box), a multi-word key gets its initials (weight_decay -> wd), a one-word key its first
    three letters (mosaic -> mos); a clash takes more letters of the last word (wm, wmo)."""
    names: dict[str, str] = {}
    for key in sorted(keys, key=lambda k: (len(k), k)):
        names[key] = next(short for short in _short_names(key) if short not in names.values())
    return {key: names[key] for key in keys}


def _short_names(key: str):
    """Candidate short names of key, shortest first, ending with the key itself."""
    if len(key) > 4:
        *first, last = key.split("_")
        initials = "".join(word[0] for word in first)
        for letters in range(1 if first else 3, len(last) + 1):
            yield initials + last[:letters]
    yield key
    yield from (f"{key}{n}" for n in range(2, 1000))


def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.2g}" if abs(value) < 1e-3 and value else f"{value:.4g}"
    return str(value)


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def short_trial_id(trial_id: str) -> str:
    return trial_id[-11:]


def format_trials(states: list[TrialState], epochs: int, names: dict[str, str], width: int) -> list[str]:
    """The table: a header and a line per trial, best first, with as many searched values as fit in width."""
    fixed_width = sum(w for _, w in FIXED_COLUMNS) + len(FIXED_COLUMNS) - 1
    value_columns = []
    used = fixed_width
    for key, short in names.items():
        cells = [format_value(s.values.get(key)) for s in states]
        column_width = max(len(short), *(len(c) for c in cells)) if cells else len(short)
        if used + 2 + column_width > width:
            break
        value_columns.append((key, short, column_width))
        used += 2 + column_width
    header = _align([title for title, _ in FIXED_COLUMNS])
    header += "".join(f"  {short:<{w}}" for _, short, w in value_columns)
    lines = [header.rstrip()]
    order = sorted(states, key=lambda s: (s.best is None, -(s.best or 0.0), s.trial_id))
    for state in order:
        cells = [
            short_trial_id(state.trial_id),
            state.status,
            f"{state.epoch or 0}/{epochs}",
            _metric(state.best),
            _metric(state.best50),
            _metric(state.last),
            _metric(state.last50),
            _duration(state.seconds),
        ]
        line = _align(cells)
        line += "".join(f"  {format_value(state.values.get(key)):<{w}}" for key, _, w in value_columns)
        lines.append(line.rstrip())
    hidden = len(names) - len(value_columns)
    if hidden:
        lines.append(f"({hidden} more searched values: widen the terminal, or see tune_results.csv)")
    return lines


def _align(cells: list[str]) -> str:
    """The fixed columns: trial and status left-aligned, the numbers right-aligned."""
    widths = [width for _, width in FIXED_COLUMNS]
    return " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def legend(names: dict[str, str], width: int = DEFAULT_WIDTH) -> str:
    """'searched: lr0 = lr0, wd = weight_decay, ...' (only the names that differ from their key are explained)."""
    parts = [f"{short} = {key}" if short != key else key for key, short in names.items()]
    text = "searched: " + ", ".join(parts) if parts else "searched: nothing (a fixed configuration)"
    return textwrap.fill(text, width=width, subsequent_indent="  ", break_on_hyphens=False)


def status_line(states: list[TrialState], elapsed_s: float, samples: int = 0) -> str:
    """'pyseg.tune 1:02: 2 running, 1 done, 1 stopped, 0 failed, 0 pending of 4; best 4634f_00001 0.123 (epoch 7)'."""
    counts = {"RUNNING": 0, "TERMINATED": 0, "ERROR": 0, "PENDING": 0, "PAUSED": 0}
    for state in states:
        status = "TERMINATED" if state.status == "STOPPED" else state.status  # both ended
        counts[status] = counts.get(status, 0) + 1
    scored = [s for s in states if s.best is not None]
    best = max(scored, key=lambda s: s.best) if scored else None
    text = (
        f"pyseg.tune {_duration(elapsed_s)}: {counts['RUNNING']} running, {counts['TERMINATED']} ended, "
        f"{counts['ERROR']} failed, {counts['PENDING'] + counts['PAUSED'] + max(samples - len(states), 0)} waiting "
        f"of {max(samples, len(states))}"
    )
    if best is not None:
        text += f"; best {short_trial_id(best.trial_id)} mask mAP50-95 {best.best:.3f} (mAP50 {best.best50 or 0:.3f})"
    return text


def format_table(rows: list[dict], columns: list[str], titles: dict[str, str] | None = None) -> str:
    """rows as aligned text columns (titles renames headers); missing and NaN values shown as '-'."""
    titles = titles or {}
    heads = [titles.get(c, c) for c in columns]
    cells = [[_table_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _table_cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


RANKED_COLUMNS = {  # tune_results.csv column -> title
    "trial": "trial",
    "status": "status",
    "epochs": "epochs",
    "best_epoch": "best at",
    METRIC: "mask mAP50-95",
    METRIC50: "mAP50",
    BOX_MAP: "box mAP50-95",
}


def ranked_table(rows: list[dict], searched: list[str], top: int = 10, width: int | None = None) -> str:
    """The end of a search: the top trials (rows sorted best first, as tune_results.csv) with a rank, their
    metrics and the searched values that fit in width, and a line saying where the others are."""
    width = width or shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    names = abbreviate(searched)
    shown = [{"rank": rank, **row} for rank, row in enumerate(rows[:top], 1)]
    columns = ["rank", *RANKED_COLUMNS]
    titles = {**RANKED_COLUMNS, **names}
    for key in searched:  # as many searched values as fit
        if max(len(line) for line in format_table(shown, [*columns, key], titles).splitlines()) > width:
            break
        columns.append(key)
    text = format_table(shown, columns, titles)
    left_out = len(rows) - len(shown)
    hidden = len(searched) - (len(columns) - 1 - len(RANKED_COLUMNS))
    notes = [f"{left_out} more trials" if left_out > 0 else "", f"{hidden} more searched values" if hidden else ""]
    notes = [note for note in notes if note]
    if notes:
        text += f"\n({' and '.join(notes)} in tune_results.csv)"
    return text


class SearchView:
    """The live view of a search, fed by Tune's callback events (make_callback wraps it).

    On a terminal (stream.isatty()) the table is redrawn in place with rich; in a log, a status line every
    every_s seconds and the whole table when a trial ends. The legend of the searched values is printed once.
    """

    def __init__(self, searched: list[str], epochs: int, every_s: float = 30.0, stream=None, samples: int = 0):
        self.stream = stream or sys.stdout
        self.names = abbreviate(searched)
        self.epochs, self.every_s, self.samples = epochs, every_s, samples  # samples: trials in all (0: unknown)
        self.states: dict[str, TrialState] = {}
        self.started_at = time.monotonic()
        self.last_status = self.started_at
        self.live = None
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.legend_shown = False

    def start(self) -> None:
        """Prints the legend of the searched values' short names (once, before the first table)."""
        self.print(legend(self.names, self.width()))
        self.legend_shown = True

    def width(self) -> int:
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns if self.terminal else DEFAULT_WIDTH

    def state(self, trial_id: str, values: dict) -> TrialState:
        if trial_id not in self.states:
            self.states[trial_id] = TrialState(trial_id, {k: values.get(k) for k in self.names})
        return self.states[trial_id]

    def table(self) -> str:
        return "\n".join(format_trials(list(self.states.values()), self.epochs, self.names, self.width()))

    # events

    def trial_started(self, trial_id: str, values: dict) -> None:
        self.state(trial_id, values).status = "RUNNING"
        self.refresh()

    def trial_result(self, trial_id: str, values: dict, result: dict) -> None:
        state = self.state(trial_id, values)
        state.status = "RUNNING"
        state.record(result, time.monotonic())
        self.refresh()

    def trial_kept(self, trial_id: str, values: dict, rows: list[dict]) -> None:
        """A trial an earlier run of a resumed search finished: its results.csv rows, as if reported."""
        state = self.state(trial_id, values)
        for row in rows:
            state.record(row, time.monotonic())
        state.status = "STOPPED" if (state.epoch or 0) < self.epochs else "TERMINATED"

    def trial_ended(self, trial_id: str, values: dict, status: str, error: str | None = None, error_file=None):
        state = self.state(trial_id, values)
        if status == "TERMINATED" and state.epoch is not None and state.epoch < self.epochs:
            status = "STOPPED"  # as the final table calls it
        state.status, state.error, state.error_file = status, error, error_file
        if state.started is not None:
            state.seconds = time.monotonic() - state.started
        if self.terminal:
            self.refresh()
        else:
            self.print(self.table())
        if status == "ERROR":
            where = f"; its error file: {error_file}" if error_file else ""
            self.print(f"trial {trial_id} failed: {error or 'see its log'}{where}")

    def refresh(self) -> None:
        """On a terminal, redraws the table; in a log, prints the status line when every_s has passed."""
        now = time.monotonic()
        if self.terminal:
            self._draw()
        elif now - self.last_status >= self.every_s:
            self.last_status = now
            self.print(status_line(list(self.states.values()), now - self.started_at, self.samples))

    def print(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        renderable = Text(
            self.table()
            + "\n"
            + status_line(list(self.states.values()), time.monotonic() - self.started_at, self.samples)
        )
        if self.live is None:
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self.live = Live(renderable, console=console, auto_refresh=False, transient=False)
            self.live.start()
        self.live.update(renderable, refresh=True)

    def close(self) -> None:
        """Stops redrawing (the last table stays on the screen)."""
        if self.live is not None:
            self.live.stop()
            self.live = None


_active_view: SearchView | None = None  # the view SearchViewCallback feeds (set by activate)


def activate(view: SearchView) -> SearchViewCallback:
    """Makes view the one the callback feeds and returns the callback for Tune's RunConfig. The callback holds no
    state: Tune pickles its callbacks into the experiment (tuner.pkl), and a view with its stream cannot be
    pickled."""
    global _active_view
    _active_view = view
    return SearchViewCallback()


def _last_error_line(trial) -> tuple[str | None, str | None]:
    """(the error of a failed trial: the last 'SomeError: ...' line of its error file, else its last line,
    shortened to ERROR_LINE_CHARS; the file's path)."""
    path = getattr(trial, "error_file", None)
    try:
        with open(path) as file:
            lines = [line.strip() for line in file if line.strip()]
    except (OSError, TypeError):
        return None, path
    return error_summary(lines), path


def error_summary(lines: list[str]) -> str | None:
    """The line of an error's text that names it (the last 'SomeError: ...' or 'SomeException: ...' line, else
    the last line), shortened to ERROR_LINE_CHARS."""
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    line = named[-1] if named else lines[-1] if lines else None
    return textwrap.shorten(line, ERROR_LINE_CHARS, placeholder=" ...") if line else None


class SearchViewCallback(Callback):
    """Tune's trial events, passed on to the active SearchView."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _active_view is not None:
            _active_view.trial_started(trial_folder(trial), trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _active_view is not None:
            _active_view.trial_result(trial_folder(trial), trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _active_view is not None:
            _active_view.trial_ended(trial_folder(trial), trial.config, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        if _active_view is not None:
            text, path = _last_error_line(trial)
            _active_view.trial_ended(trial_folder(trial), trial.config, "ERROR", text, path)

    def on_experiment_end(self, trials, **info):
        if _active_view is not None:
            _active_view.close()
