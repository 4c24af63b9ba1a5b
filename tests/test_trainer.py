"""The trainer on a tiny shapes-seg: a step lowers the loss, outputs, resume, val vs results.csv, bad losses."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import tiny_config

from pyseg.data.synthetic import SHAPES_CLASSES
from pyseg.engine.checkpoint import load_checkpoint
from pyseg.engine.trainer import Hook, NonFiniteLossError, Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path), show_progress=False)
    trainer.setup()
    batch = next(iter(trainer.train_loader))
    images = batch["images"].float() / 255
    model = trainer.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, parts = trainer.loss_fn(model(images), batch)
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.9, losses
    assert set(parts) == {"box", "cls", "dfl", "mask"} and parts["mask"] > 0


def test_two_epochs_write_every_output(tiny_data, tmp_path):
    run_dir = Trainer(tiny_config(tiny_data, tmp_path), show_progress=False).fit()
    for name in (
        "args.yaml",
        "results.csv",
        "results.png",
        "weights/last.pt",
        "weights/best.pt",
        "train_batch.jpg",
        "val_predictions.jpg",
    ):
        assert (run_dir / name).is_file(), name
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train/box", "train/mask", "mask/map50", "mask/map", "box/map50", "lr", "epoch_seconds"):
        assert key in rows[0], key
    state = load_checkpoint(run_dir / "weights" / "last.pt")
    assert state["epoch"] == 1 and state["names"] == list(SHAPES_CLASSES)
    assert {"model", "ema", "optimizer", "config", "rng", "iteration"} <= set(state)


class StopAfterFirstEpoch(Hook):
    def on_epoch_end(self, trainer, row):
        trainer.stop = True


def test_resume_continues_exactly(tiny_data, tmp_path):
    straight = Trainer(tiny_config(tiny_data, tmp_path, name="straight"), show_progress=False).fit()
    interrupted = Trainer(tiny_config(tiny_data, tmp_path, name="split"), show_progress=False)
    interrupted.hooks.append(StopAfterFirstEpoch())
    interrupted.fit()
    assert load_checkpoint(interrupted.run_dir / "weights" / "last.pt")["epoch"] == 0
    resumed = Trainer(tiny_config(tiny_data, tmp_path, name="split", resume=True), show_progress=False)
    resumed.fit()
    a = load_checkpoint(straight / "weights" / "last.pt")
    b = load_checkpoint(resumed.run_dir / "weights" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["iteration"] == b["iteration"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    with open(resumed.run_dir / "results.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]


def test_resuming_a_finished_run_says_so(tiny_data, tmp_path, capsys):
    Trainer(tiny_config(tiny_data, tmp_path, epochs=1), show_progress=False).fit()
    before = (tmp_path / "runs" / "tiny" / "weights" / "last.pt").stat().st_mtime_ns
    Trainer(tiny_config(tiny_data, tmp_path, epochs=1, resume=True), show_progress=False).fit()
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "weights" / "last.pt").stat().st_mtime_ns == before


def test_val_reproduces_results_csv(tiny_data, tmp_path):
    from pyseg.val import validate

    run_dir = Trainer(tiny_config(tiny_data, tmp_path, epochs=2, conf=0.0001), show_progress=False).fit()
    with open(run_dir / "results.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    # A barely trained model finds nothing at IoU >= 0.5, so the mAPs are zeros; the detections it keeps (count
    # and mean score) are not, and they differ as soon as val's weights, letterbox or thresholds differ.
    assert float(row["val/detections"]) > 0
    metrics, names = validate(run_dir / "weights" / "last.pt", workers=0, device="cpu")
    assert names == list(SHAPES_CLASSES)
    assert metrics["detections"]["count"] == int(float(row["val/detections"]))
    assert metrics["detections"]["mean_score"] == pytest.approx(float(row["val/mean_score"]), abs=1e-5)
    for kind in ("box", "mask"):
        for key in ("map50", "map", "precision", "recall"):
            assert metrics[kind][key] == pytest.approx(float(row[f"{kind}/{key}"]), abs=1e-4), (kind, key)


def test_non_finite_loss_stops_with_the_loss_parts_and_image_paths(tiny_data, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tiny_data, tmp_path), show_progress=False)
    original = trainer.__class__.setup

    def setup_with_bad_loss(self):
        original(self)
        loss_fn = self.loss_fn

        def bad(outputs, batch):
            loss, parts = loss_fn(outputs, batch)
            return loss * float("nan"), parts

        self.loss_fn = bad

    monkeypatch.setattr(Trainer, "setup", setup_with_bad_loss)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss.*'mask'.*\.jpg"):
        trainer.fit()


def test_predict_api_and_cli_write_drawings_and_coco_json(tiny_data, tmp_path):
    import json

    import cv2

    from pyseg.predict import Predictor, main

    run_dir = Trainer(tiny_config(tiny_data, tmp_path, epochs=1), show_progress=False).fit()
    weights = run_dir / "weights" / "last.pt"
    image_path = sorted((tiny_data.parent / "shapes" / "images" / "val").glob("*.jpg"))[0]
    image = cv2.imread(str(image_path))
    prediction = Predictor(weights, imgsz=64, conf=0.0001, device="cpu").predict(image)
    n = len(prediction.scores)
    assert n > 0 and prediction.boxes.shape == (n, 4) and prediction.classes.shape == (n,)
    assert prediction.masks.shape == (n, *image.shape[:2]) and prediction.masks.dtype == bool
    assert (prediction.boxes[:, [0, 2]] <= image.shape[1]).all() and (prediction.boxes >= 0).all()
    out = tmp_path / "pred"
    assert (
        main(
            [
                "--weights",
                str(weights),
                "--source",
                str(image_path.parent),
                "--imgsz",
                "64",
                "--conf",
                "0.0001",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(list(out.glob("*.jpg"))) == 4
    results = json.loads((out / "predictions.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert main(["--weights", str(weights), "--source", str(tmp_path / "missing.jpg"), "--out", str(out)]) == 2
