"""MLflow's UI over a real finished search, in headless Chromium: benchmarks/mlflow_ui_check.py as a test."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "mlflow_ui_check.py"


@pytest.mark.slow
@pytest.mark.browser
def test_the_mlflow_ui_shows_the_search_its_trials_and_their_comparison(tmp_path, short_tmp, monkeypatch):
    if not (shutil.which("chromium") and shutil.which("chromedriver") and importlib.util.find_spec("selenium")):
        pytest.skip("needs Debian's chromium and chromium-driver and Selenium (see benchmarks/mlflow_ui_check.py)")
    spec = importlib.util.spec_from_file_location("mlflow_ui_check", CHECK)
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mlflow_ui_check", check)  # its dataclasses look their module up there
    spec.loader.exec_module(check)
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(short_tmp))  # the search's Ray session (socket paths must stay short)
    # a real 3-trial search, mlflow server over its store, three pages checked in Chromium, screenshots saved
    # the smallest search a comparison page takes: 2 trials of 1 epoch
    assert check.main(["--shots", str(tmp_path / "shots"), "--samples", "2", "--epochs", "1"]) == 0
    shots = sorted(path.name for path in (tmp_path / "shots").iterdir())
    assert shots == ["mlflow_compare.png", "mlflow_experiment.png", "mlflow_run.png"]
    assert all((tmp_path / "shots" / name).stat().st_size > 10_000 for name in shots)
