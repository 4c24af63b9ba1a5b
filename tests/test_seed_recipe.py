"""The seed's recipe of the README in miniature: `pyseg.train --weights yolo11n-seg.pt`, `pyseg.tune --weights ...`,
and `pyseg.val` / `pyseg.predict` of an imported model, on a checkpoint this test saved through Ultralytics."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_env
from test_search import command_env, run_tune_command, tune_command, write_space
from ultralytics_peer import save_ultralytics_checkpoint

from pyseg.data.synthetic import SHAPES_CLASSES

REPO = Path(__file__).resolve().parents[1]
TINY = ["--imgsz", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--threads", "1", "--no-mlflow"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """yolo11n-seg saved by Ultralytics twice: with COCO's 80 classes (as published) and with shapes-seg's."""
    folder = tmp_path_factory.mktemp("weights")
    return {
        "coco": save_ultralytics_checkpoint("yolo11n-seg", folder / "yolo11n-seg.pt"),
        "shapes": save_ultralytics_checkpoint("yolo11n-seg", folder / "shapes.pt", nc=len(SHAPES_CLASSES)),
    }


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = python_env(PYSEG_CACHE_DIR=str(cwd / "cache"), MLFLOW_TRACKING_URI=None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_from_an_ultralytics_checkpoint_of_another_class_count(tiny_data, imported, tmp_path):
    result = run(
        "pyseg.train",
        "--data",
        str(tiny_data),
        "--weights",
        str(imported["coco"]),
        "--epochs",
        "1",
        *TINY,
        "--project",
        str(tmp_path / "runs"),
        "--name",
        "seed",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "yolo11n-seg, transferred" in result.stdout
    assert f"class layers new for nc={len(SHAPES_CLASSES)} (the file has nc=80)" in result.stdout
    run_dir = tmp_path / "runs" / "seed"
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    losses = [float(rows[-1][key]) for key in rows[-1] if key.startswith("train/")]
    assert losses and all(math.isfinite(value) for value in losses), rows[-1]
    args = (run_dir / "args.yaml").read_text()
    assert "model: yolo11n-seg" in args
    from pyseg.models.weights import load_weights

    best = load_weights(run_dir / "weights" / "best.pt")
    assert best.kind == "pyseg" and best.model_name == "yolo11n-seg" and best.names == list(SHAPES_CLASSES)


@pytest.mark.slow
def test_val_and_predict_of_an_imported_model(tiny_data, imported, tmp_path):
    metrics_file = tmp_path / "metrics_val.json"
    result = run(
        "pyseg.val",
        "--weights",
        str(imported["shapes"]),
        "--data",
        str(tiny_data),
        "--imgsz",
        "64",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--out",
        str(metrics_file),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(metrics_file.read_text())
    for kind in ("box", "mask"):
        assert 0.0 <= metrics[kind]["map50"] <= 1.0 and 0.0 <= metrics[kind]["map"] <= metrics[kind]["map50"]
    images = tiny_data.parent / "shapes" / "images" / "val"
    result = run(
        "pyseg.predict",
        "--weights",
        str(imported["shapes"]),
        "--source",
        str(images),
        "--imgsz",
        "64",
        "--conf",
        "0.01",
        "--device",
        "cpu",
        "--project",
        str(tmp_path / "runs"),
        "--name",
        "predict",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads((tmp_path / "runs" / "predict" / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= set(range(1, len(SHAPES_CLASSES) + 1))
    # val without --data: the imported model's 80 classes against the default dataset's 6: one line, exit 2
    result = run("pyseg.val", "--weights", str(imported["coco"]), "--imgsz", "64", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2 and "pass the --data it was trained on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_tune_from_an_ultralytics_checkpoint(tiny_data, imported, tmp_path, short_tmp):
    env = command_env(tmp_path, short_tmp)
    space = write_space(tmp_path, "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\n")
    args = tune_command(tiny_data, tmp_path / "runs", space, "--samples", "2", "--epochs", "1", "--name", "seed")
    args += ["--weights", str(imported["coco"])]
    code, output = run_tune_command(args, env, tmp_path / "tune.log", timeout=400)
    assert code == 0, output[-4000:]
    assert "every trial starts from weights" in output and "class layers new for nc=6 (the file has nc=80)" in output
    assert "model: yolo11n-seg" in (tmp_path / "runs" / "seed" / "best.yaml").read_text()
    trial_args = sorted((tmp_path / "runs" / "seed" / "trials").glob("*/args.yaml"))
    assert len(trial_args) == 2
    for path in trial_args:
        text = path.read_text()
        assert "model: yolo11n-seg" in text and f"weights: {imported['coco']}" in text


def test_a_wrong_checkpoint_is_one_line_before_any_data_is_read(imported, tmp_path):
    """--resume with an Ultralytics file and --weights that is not a checkpoint: one line, exit 2, nothing written."""
    result = run("pyseg.train", "--resume", str(imported["coco"]), cwd=tmp_path)
    assert result.returncode == 2
    assert "is an Ultralytics checkpoint, not the last.pt of a pyseg run: start from it with --weights" in result.stderr
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("hello")
    result = run("pyseg.train", "--weights", str(not_weights), "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()
