"""pyseg.engine.console: the epoch table of pyseg.train; progress bars only on a terminal."""

from __future__ import annotations

import io
import sys

from conftest import tiny_config

from pyseg.engine.console import EpochTable
from pyseg.engine.trainer import Trainer

ROW = {
    "epoch": 7,
    **{"train/box": 1.23456, "train/cls": 0.5, "train/dfl": 12.0, "train/mask": 3.0},
    **{"box/map50": 0.41234, "box/map": 0.2, "mask/map50": 0.38, "mask/map": 0.1549},
    **{"images_per_s": 1234.56, "epoch_seconds": 754.0, "lr": 0.01},
}


def test_rows_line_up_under_the_header_with_rounded_values():
    table = EpochTable(epochs=120)
    header, row = table.header(), table.row(ROW)
    assert len(row) == len(header)
    assert [i for i, c in enumerate(row) if c == "|"] == [i for i, c in enumerate(header) if c == "|"]
    assert row.split()[:5] == ["7/120", "1.235", "0.500", "12.000", "3.000"]
    assert "0.412" in row and "0.155" in row and "1234.6" in row and "12.6m" in row  # 754 s shown in minutes
    without_val = table.row({k: v for k, v in ROW.items() if "/map" not in k})
    assert without_val.count(" - ") + without_val.count(" -|") >= 2 and "0.412" not in without_val


def test_progress_bars_only_on_a_terminal(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: no bars (they would fill it with \r lines)
    assert Trainer(cfg, show_progress=True).show_progress is False

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert Trainer(cfg, show_progress=True).show_progress is True
    assert Trainer(cfg, show_progress=False).show_progress is False
