"""The trainer on a tiny shapes-seg: a step lowers the loss, outputs, resume, val vs results.csv, bad losses."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

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


def test_two_epochs_write_every_output(tiny_data, tmp_path, capsys):
    run_dir = Trainer(tiny_config(tiny_data, tmp_path), show_progress=False).fit()
    # 8 images in batches of 4, one optimizer step per 16 batches (nbs 64) and one for each epoch's remainder
    assert "optimizer auto: adamw with lr0 0.002 for 2 optimizer steps" in capsys.readouterr().out
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


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tiny_data, tmp_path, workers, capsys):
    """Stopped after epoch 1 and resumed == trained straight: weights, EMA, optimizer state, schedule, rows."""
    straight = Trainer(tiny_config(tiny_data, tmp_path, name="straight", workers=workers), show_progress=False).fit()
    interrupted = Trainer(tiny_config(tiny_data, tmp_path, name="split", workers=workers), show_progress=False)
    interrupted.hooks.append(StopAfterFirstEpoch())
    interrupted.fit()
    assert load_checkpoint(interrupted.run_dir / "weights" / "last.pt")["epoch"] == 0
    capsys.readouterr()
    # The epochs given with --resume (here the command line's default) do not count: the run's own 2 do.
    resumed = Trainer(tiny_config(tiny_data, tmp_path, name="split", resume=True, epochs=100), show_progress=False)
    resumed.fit()
    out = capsys.readouterr().out
    assert " 2/2 " in out and "/100" not in out, out
    a = load_checkpoint(straight / "weights" / "last.pt")
    b = load_checkpoint(resumed.run_dir / "weights" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["iteration"] == b["iteration"]
    assert a["ema_updates"] == b["ema_updates"] > 0
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=1e-6), (part, key)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.allclose(value.float(), b["optimizer"]["state"][index][key].float(), atol=1e-6), (index, key)
    rows = results_rows(resumed.run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, reference in zip(rows, results_rows(straight), strict=True):
        for key in ("train/box", "train/mask", "mask/map", "val/detections"):
            assert float(row[key]) == pytest.approx(float(reference[key]), abs=1e-5), (row["epoch"], key)


@pytest.mark.slow
def test_resuming_a_finished_run_says_so(tiny_data, tmp_path, capsys):
    from pyseg.train import main as train_main

    Trainer(tiny_config(tiny_data, tmp_path, epochs=1), show_progress=False).fit()
    before = (tmp_path / "runs" / "tiny" / "weights" / "last.pt").stat().st_mtime_ns
    Trainer(tiny_config(tiny_data, tmp_path, epochs=1, resume=True), show_progress=False).fit()
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "weights" / "last.pt").stat().st_mtime_ns == before
    # Flags given with --resume do not change the run: the command says which it ignores.
    flags = ["--resume", "--project", str(tmp_path / "runs"), "--name", "tiny", "--epochs", "3", "--imgsz", "128"]
    assert train_main([*flags, "--no-mlflow"]) == 0
    out, err = capsys.readouterr()
    assert "ignored: --epochs, --imgsz" in out and "already finished 1 epochs" in out and not err


@pytest.mark.slow
def test_val_reproduces_results_csv(tiny_data, tmp_path, capsys):
    from pyseg.val import validate

    run_dir = Trainer(tiny_config(tiny_data, tmp_path, epochs=2, conf=0.0001), show_progress=False).fit()
    with open(run_dir / "results.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    # A barely trained model finds nothing at IoU >= 0.5, so the mAPs are zeros; the detections it keeps (count
    # and mean score) are not, and they differ as soon as val's weights, letterbox or thresholds differ.
    assert float(row["val/detections"]) > 0
    capsys.readouterr()
    metrics, names = validate(run_dir / "weights" / "last.pt", workers=0, device="cpu")
    assert "val:" not in capsys.readouterr().err  # no progress bar where stderr is not a terminal (a log)
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
    assert all(r["category_name"] == SHAPES_CLASSES[r["category_id"] - 1] for r in results)  # the names it has
    assert main(["--weights", str(weights), "--source", str(tmp_path / "missing.jpg"), "--out", str(out)]) == 2

    # Same-named images in two subfolders keep their own drawings and ids (the path inside the source folder).
    nested = tmp_path / "nested"
    for sub in ("day", "night"):
        (nested / sub).mkdir(parents=True)
        cv2.imwrite(str(nested / sub / "a.jpg"), image)
    cv2.imwrite(str(nested / "day" / "a.png"), image)
    flags = ["--weights", str(weights), "--imgsz", "64", "--conf", "0.0001", "--device", "cpu"]
    assert main([*flags, "--source", str(nested), "--out", str(tmp_path / "nested_out")]) == 0
    drawn = sorted(p.relative_to(tmp_path / "nested_out").as_posix() for p in (tmp_path / "nested_out").rglob("a.*"))
    assert drawn == ["day/a.jpg", "day/a.png", "night/a.jpg"]
    ids = {r["image_id"] for r in json.loads((tmp_path / "nested_out" / "predictions.json").read_text())}
    assert ids == {"day/a.jpg", "day/a.png", "night/a.jpg"}

    # A folder without images, or with none readable, is a user error that leaves no output folder.
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "x.jpg").write_text("not an image")
    for source in ("empty", "unreadable"):
        target = tmp_path / f"{source}_out"
        assert main([*flags, "--source", str(tmp_path / source), "--out", str(target)]) == 2
        assert not target.exists(), source


# ------------------------------------------------------------------ interruptions, early stopping, run folders


def train_cli(args: list[str], env: dict | None = None, timeout: float = 300):
    """python -m pyseg.train in a subprocess (MLflow off); returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pyseg.train", "--no-mlflow", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_flags(data, project, name="tiny", epochs=3) -> list[str]:
    return [
        *("--data", str(data), "--epochs", str(epochs), "--imgsz", "64", "--batch", "4", "--workers", "0"),
        *("--device", "cpu", "--project", str(project), "--name", name, "--close-mosaic", "1"),
        *("--warmup-epochs", "0.5", "--threads", "1"),
    ]


def results_rows(run_dir) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """An uninterrupted 3-epoch run, the reference of every interrupted one."""
    project = tmp_path_factory.mktemp("straight")
    done = train_cli(tiny_flags(tiny_data, project), env={"PYSEG_CACHE_DIR": str(project / "cache")})
    assert done.returncode == 0, done.stderr
    return project / "tiny"


# Each point is where a kill -9 lands in epoch 2 of 3. last.pt is written twice per epoch (after training,
# "trained"; after validation and the results row, "finished"): write 3 is epoch 2's first, write 4 its second.
KILL_POINTS = {
    "after training, before the checkpoint": "train-end:2",
    "while writing the checkpoint": "write:last.pt:3",
    "during validation": "validation:2",
    "while writing the results row": "write:results.csv:2",
    "after the row, while writing the finished checkpoint": "write:last.pt:4",
    "after the epoch": "epoch-end:2",
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_a_kill_at_any_moment_resumes_to_one_validated_row_per_epoch(moment, tiny_data, tmp_path, straight_run):
    env = {"PYSEG_CACHE_DIR": str(tmp_path / "cache")}
    killed = train_cli(tiny_flags(tiny_data, tmp_path), env={**env, "PYSEG_TEST_KILL_AT": KILL_POINTS[moment]})
    assert killed.returncode == -9 or killed.returncode == 9, (killed.returncode, killed.stderr[-2000:])
    resumed = train_cli(["--resume", str(tmp_path / "tiny" / "weights" / "last.pt")], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = tmp_path / "tiny"
    rows = results_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["mask/map"] != "" and r["box/map50"] != "" for r in rows), "every epoch is validated"
    for folder in (run_dir, run_dir / "weights"):  # no temporary of a killed write is left, results.csv's included
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [], folder
    last = load_checkpoint(run_dir / "weights" / "last.pt")
    reference = load_checkpoint(straight_run / "weights" / "last.pt")
    assert last["epoch"] == 2 and last["phase"] == "finished" and last["iteration"] == reference["iteration"]
    for key, value in reference["ema"].items():
        assert torch.allclose(value.float(), last["ema"][key].float(), atol=1e-5), key
    straight_rows = results_rows(straight_run)
    for row, straight in zip(rows, straight_rows, strict=True):
        for key in ("train/box", "train/mask", "mask/map", "val/detections", "lr"):
            assert float(row[key]) == pytest.approx(float(straight[key]), abs=1e-4), (row["epoch"], key)


@pytest.mark.slow
def test_a_checkpoint_outside_its_run_folder_continues_in_a_new_run_folder(tiny_data, tmp_path):
    """`--resume /elsewhere/last.pt` (not NAME/weights/last.pt beside NAME/args.yaml) wrote args.yaml, results and
    weights/ into /elsewhere's parent, recording `project: /`; it now continues in a new run folder under --project
    and says so, writing nothing beside the file."""
    import shutil

    env = {"PYSEG_CACHE_DIR": str(tmp_path / "cache")}
    killed = train_cli(tiny_flags(tiny_data, tmp_path, epochs=2), env={**env, "PYSEG_TEST_KILL_AT": "epoch-end:1"})
    assert killed.returncode in (-9, 9), killed.stderr[-2000:]
    elsewhere = tmp_path / "x"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "tiny" / "weights" / "last.pt", elsewhere / "last.pt")
    resumed = train_cli(["--resume", str(elsewhere / "last.pt"), "--project", str(tmp_path / "P")], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new_run = tmp_path / "P" / "train"
    said = "is not inside its run folder (NAME/weights/last.pt beside NAME/args.yaml): continuing it in a new run "
    assert said + f"folder, {new_run}" in resumed.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == ["last.pt"]
    assert not (tmp_path / "args.yaml").exists() and not (tmp_path / "weights").exists()
    assert [int(r["epoch"]) for r in results_rows(new_run)] == [2]
    assert load_checkpoint(new_run / "weights" / "last.pt")["epoch"] == 1
    assert f"project: {tmp_path / 'P'}" in (new_run / "args.yaml").read_text()


@pytest.mark.slow
def test_a_moved_dataset_is_found_again_by_data_on_resume(tiny_data, tmp_path):
    """`--resume --name N --data NEW` said --data was ignored, then failed on the old path; now --data points a
    resumed run at its data's new place (same classes), and args.yaml records it. Without it, the error says how."""
    import shutil

    env = {"PYSEG_CACHE_DIR": str(tmp_path / "cache")}
    shutil.copytree(tiny_data.parent, tmp_path / "old")
    data = tmp_path / "old" / tiny_data.name
    killed = train_cli(tiny_flags(data, tmp_path, epochs=2), env={**env, "PYSEG_TEST_KILL_AT": "epoch-end:1"})
    assert killed.returncode in (-9, 9), killed.stderr[-2000:]
    (tmp_path / "old").rename(tmp_path / "new")
    resume = ["--resume", "--name", "tiny", "--project", str(tmp_path)]
    lost = train_cli(resume, env=env)
    assert lost.returncode == 2 and "if the data moved, point the run at its new place" in lost.stderr, lost.stderr
    other = tmp_path / "other.yaml"
    other.write_text((tmp_path / "new" / tiny_data.name).read_text().replace("path: shapes", "path: new/shapes"))
    other.write_text(other.read_text().split("names:")[0] + "names:\n  0: cat\n  1: dog\n")
    wrong = train_cli([*resume, "--data", str(other)], env=env)
    assert wrong.returncode == 2 and "not the 6 classes the run was trained on" in wrong.stderr, wrong.stderr
    moved = train_cli([*resume, "--data", str(tmp_path / "new" / tiny_data.name)], env=env)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "ignored" not in moved.stdout
    assert [int(r["epoch"]) for r in results_rows(tmp_path / "tiny")] == [1, 2]
    assert f"data: {tmp_path / 'new' / tiny_data.name}" in (tmp_path / "tiny" / "args.yaml").read_text()


class ScriptedFitness:
    """Replaces evaluate: returns the next mask mAP50-95 of a script, and records the epochs it was called in."""

    def __init__(self, fitness: list[float]):
        self.fitness, self.epochs = list(fitness), []

    def __call__(self, model, loader, evaluator, cfg, device, show_progress=True):
        value = self.fitness[len(self.epochs)]
        self.epochs.append(None)
        kinds = {kind: {"precision": 0.0, "recall": 0.0, "map50": value, "map": value} for kind in ("box", "mask")}
        return {**kinds, "detections": {"count": 1, "mean_score": 0.5}}


@pytest.mark.slow
def test_patience_counts_validations_not_epochs(tiny_data, tmp_path, monkeypatch, capsys):
    import pyseg.engine.trainer as trainer_module

    scripted = ScriptedFitness([0.1, 0.2, 0.15, 0.1, 0.3])
    monkeypatch.setattr(trainer_module, "evaluate", scripted)
    cfg = tiny_config(tiny_data, tmp_path, epochs=10, val_period=2, patience=2)
    run_dir = Trainer(cfg, show_progress=False).fit()
    rows = results_rows(run_dir)
    # validations after epochs 2, 4, 6, 8: best at 4, then two without improvement -> stop after epoch 8
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert [int(r["epoch"]) for r in rows if r["mask/map"] != ""] == [2, 4, 6, 8]
    assert load_checkpoint(run_dir / "weights" / "best.pt")["epoch"] == 3  # epoch 4, 0-based
    out = capsys.readouterr().out
    assert "no better mask mAP50-95 in 2 validations (best 0.2000 at epoch 4)" in out

    # The console: the table's header once, then one aligned row per epoch; '-' where no validation ran.
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("epoch "))
    table = [line for line in lines[header + 1 :] if "|" in line]
    assert [line.split()[0] for line in table] == [f"{e}/10" for e in range(1, 9)]
    bars = [i for i, char in enumerate(lines[header]) if char == "|"]
    assert len(bars) == 3 and all([i for i, c in enumerate(line) if c == "|"] == bars for line in table)
    assert all(("-" in line.split("|")[1]) == (epoch % 2 == 1) for epoch, line in enumerate(table, 1))
    assert "0.200" in table[3].split("|")[2] and "train/box=" not in out  # mask mAP50 of epoch 4; no key=value


@pytest.mark.slow
def test_without_validation_there_is_no_early_stop_and_best_is_the_last_epoch(tiny_data, tmp_path, monkeypatch):
    import pyseg.engine.trainer as trainer_module

    scripted = ScriptedFitness([])
    monkeypatch.setattr(trainer_module, "evaluate", scripted)
    run_dir = Trainer(tiny_config(tiny_data, tmp_path, epochs=4, val=False, patience=2), show_progress=False).fit()
    assert [int(r["epoch"]) for r in results_rows(run_dir)] == [1, 2, 3, 4] and scripted.epochs == []
    best, last = (load_checkpoint(run_dir / "weights" / f"{n}.pt") for n in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 3
    for key, value in last["ema"].items():
        assert torch.equal(value, best["ema"][key]), key


@pytest.mark.slow
def test_exist_ok_never_overwrites_a_finished_run(tiny_data, tmp_path):
    from pyseg.errors import ConfigError

    run_dir = Trainer(tiny_config(tiny_data, tmp_path, epochs=2), show_progress=False).fit()
    before = {p: p.stat().st_mtime_ns for p in [run_dir / "results.csv", *(run_dir / "weights").iterdir()]}
    with pytest.raises(ConfigError, match=r"already holds a run \(results.csv \(2 epochs\).*--resume --name tiny"):
        Trainer(tiny_config(tiny_data, tmp_path, epochs=1, exist_ok=True), show_progress=False).fit()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(results_rows(run_dir)) == 2


def test_resume_without_a_checkpoint_is_a_user_error(tiny_data, tmp_path):
    done = train_cli([*tiny_flags(tiny_data, tmp_path, name="never"), "--resume"])
    assert done.returncode == 2 and "has no weights/last.pt" in done.stderr and "Traceback" not in done.stderr


def test_data_problems_are_shown_and_written_by_train_and_val(tiny_data, tmp_path, capsys):
    import shutil

    from pyseg.val import main as val_main

    data_root = tmp_path / "data"
    shutil.copytree(tiny_data.parent / "shapes", data_root / "shapes")
    shutil.copy(tiny_data, data_root / "shapes.yaml")
    labels = sorted((data_root / "shapes" / "labels" / "val").glob("*.txt"))
    labels[0].write_text(labels[0].read_text() + "0 nan 0.5 0.6 0.5 0.6 0.7\n7 0.1 0.1 0.2 0.1 0.2 0.2\n")
    (data_root / "shapes" / "images" / "val" / "broken.jpg").write_text("not an image\n")
    cfg = tiny_config(data_root / "shapes.yaml", tmp_path, epochs=1)
    run_dir = Trainer(cfg, show_progress=False).fit()
    out = capsys.readouterr().out
    written = (run_dir / "data_problems.txt").read_text().splitlines()
    assert len(written) == 3
    assert any(line.startswith(f"{labels[0]}:") and "row dropped" in line and "nan" in line.lower() for line in written)
    assert any(f"{labels[0]}:" in line and "class 7" in line for line in written)
    assert any("broken.jpg" in line and "image skipped" in line for line in written)
    for line in written:
        assert line in out  # the first problems are printed too
    assert (
        val_main(
            [
                "--weights",
                str(run_dir / "weights" / "last.pt"),
                "--device",
                "cpu",
                "--workers",
                "0",
                "--project",
                str(tmp_path / "val"),
                "--name",
                "check",
            ]
        )
        == 0
    )
    assert (tmp_path / "val" / "check" / "data_problems.txt").read_text().splitlines() == written
    assert (tmp_path / "val" / "check" / "metrics_val.json").is_file()
    # --out naming an existing folder puts the metrics file into it (it was a traceback)
    (tmp_path / "folder").mkdir()
    weights = str(run_dir / "weights" / "last.pt")
    assert val_main(["--weights", weights, "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "metrics_val.json").is_file()


@pytest.mark.slow
def test_a_taken_name_trains_into_name2_and_records_it(tiny_data, tmp_path):
    import yaml

    first = Trainer(tiny_config(tiny_data, tmp_path, epochs=1), show_progress=False).fit()
    second = Trainer(tiny_config(tiny_data, tmp_path, epochs=1), show_progress=False).fit()
    assert (first.name, second.name) == ("tiny", "tiny2")
    assert yaml.safe_load((second / "args.yaml").read_text())["name"] == "tiny2"
    assert load_checkpoint(second / "weights" / "last.pt")["config"]["name"] == "tiny2"
    assert len(results_rows(first)) == len(results_rows(second)) == 1


@pytest.mark.needs_cuda
def test_cuda_steps_with_autocast_make_the_cpu_masks_finite_losses_and_few_host_syncs(tiny_data, tmp_path):
    """Two training steps on the GPU (AMP: bf16 where supported), masks rasterized in the step: the masks equal those
    of the CPU collate, the losses are finite, and the step syncs with the host only a few times (it used to ~12)."""
    import warnings

    from pyseg.data.loader import MASK_RATIO, polygon_masks
    from pyseg.engine.trainer import train_one_epoch

    trainer = Trainer(tiny_config(tiny_data, tmp_path, device="cuda", amp=True), show_progress=False)
    trainer.setup()
    assert not trainer.loader_makes_masks and trainer.autocast is not None
    batches = [batch for _, batch in zip(range(2), trainer.train_loader, strict=False)]
    for batch in batches:
        want = polygon_masks(batch, MASK_RATIO, trainer.cfg.overlap_mask)["masks"]
        got = polygon_masks(to_cuda(batch), MASK_RATIO, trainer.cfg.overlap_mask)["masks"]
        assert torch.equal(got.cpu(), want)

    cuda_batches = [to_cuda(batch) for batch in batches]  # copied before counting: a step's own syncs only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train_one_epoch(
                trainer.model,
                cuda_batches,
                trainer.loss_fn,
                trainer.optimizer,
                trainer.cfg,
                0,
                trainer.device,
                autocast=trainer.autocast,
                scaler=trainer.scaler,
                show_progress=False,
                make_masks=True,
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert all(math.isfinite(result[key]) for key in ("train/box", "train/cls", "train/dfl", "train/mask")), result
    # Per step: the foreground of the box loss and of the mask loss (nonzero), and one copy of loss + parts + flag.
    assert len(syncs) <= 2 * 4, [str(w.message) for w in syncs]


def to_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------ without Ray and MLflow

# Runs `python -m MODULE ARGS` with Ray and MLflow unimportable, as on a GPU box that has only torch (the device
# image of benchmarks/gpu_check.sh): a finder ahead of every other one answers ModuleNotFoundError for both.
WITHOUT_RAY_AND_MLFLOW = """
import runpy, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("ray", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
for name in ("ray", "mlflow"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} is still importable")
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_train_and_val_run_without_ray_or_mlflow(tiny_data, tmp_path):
    env = {**os.environ, "PYSEG_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", WITHOUT_RAY_AND_MLFLOW, module, *args]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    # MLflow logging is on by default: without MLflow the run goes on untracked, and one line says so.
    trained = run("pyseg.train", *tiny_flags(tiny_data, tmp_path / "runs", epochs=1))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "pyseg.train: MLflow is not installed, so this run is not tracked" in trained.stdout
    assert "Traceback" not in trained.stderr
    run_dir = tmp_path / "runs" / "tiny"
    assert [int(row["epoch"]) for row in results_rows(run_dir)] == [1]
    assert not (tmp_path / "runs" / "mlflow.db").exists() and not (run_dir / "mlflow_run.json").exists()

    # Asked for a tracking URI, it stops before any work: one line, exit code 2, the flag that goes without.
    refused = run("pyseg.train", "--mlflow-uri", str(tmp_path / "m.db"), *tiny_flags(tiny_data, tmp_path, "refused"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()] and "--no-mlflow" in refused.stderr
    assert not (tmp_path / "refused").exists() and not (tmp_path / "m.db").exists()

    # --ray-workers needs Ray: without it, one line and exit code 2 as well.
    no_ray = run("pyseg.train", "--no-mlflow", "--ray-workers", "1", *tiny_flags(tiny_data, tmp_path, "on_ray"))
    assert no_ray.returncode == 2 and no_ray.stderr.strip().splitlines() == [no_ray.stderr.strip()], no_ray.stderr
    assert "Ray is not installed" in no_ray.stderr and not (tmp_path / "on_ray").exists()

    out = tmp_path / "metrics.json"
    weights = str(run_dir / "weights" / "best.pt")
    validated = run("pyseg.val", "--weights", weights, "--workers", "0", "--device", "cpu", "--out", str(out))
    assert validated.returncode == 0, validated.stderr[-3000:]
    metrics = json.loads(out.read_text())
    # val of best.pt scores what training scored at its best epoch (the same EMA weights, data and evaluator)
    trained_row = results_rows(run_dir)[0]
    assert metrics["mask"]["map"] == pytest.approx(float(trained_row["mask/map"]), abs=1e-4)
    assert metrics["box"]["map50"] == pytest.approx(float(trained_row["box/map50"]), abs=1e-4)


def test_autocast_dtype_is_none_on_the_cpu_and_follows_the_gpu_on_cuda(monkeypatch):
    from pyseg.engine.device import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), True) is None
    assert autocast_dtype(torch.device("cuda"), False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype(torch.device("cuda"), True) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype(torch.device("cuda"), True) is torch.float16  # with a gradient scaler


def test_build_steps_return_what_they_build_and_leave_the_config_alone(tiny_data, tmp_path):
    """The trainer's setup is a list of build steps, each testable alone: each returns what it builds, and only
    setup decides the run's config (here: a taken name becomes name2; the optimizer auto resolves)."""
    from pathlib import Path

    cfg = tiny_config(tiny_data, tmp_path, name="steps", optimizer="auto")
    (Path(cfg.project) / "steps").mkdir(parents=True)  # taken: the run goes to steps2
    trainer = Trainer(cfg, show_progress=False)
    run_dir, state = trainer.build_run_dir()
    assert run_dir == Path(cfg.project) / "steps2" and state is None
    trainer.run_dir = run_dir
    assert trainer.run_config(None).name == "steps2"
    trainer.device = trainer.build_runtime()
    data = trainer.build_data()
    assert data.batch_per_rank == cfg.batch and len(data.train_loader.dataset) == len(data.train_split.images)
    trainer.dataset_config, trainer.train_loader, trainer.batch_per_rank = (
        data.dataset_config, data.train_loader, data.batch_per_rank,
    )  # fmt: skip
    trainer.model = trainer.build_model()
    accumulate, steps = trainer.build_accumulation()
    assert accumulate == round(cfg.nbs / cfg.batch) and steps >= cfg.epochs
    assert trainer.cfg is cfg and cfg.name == "steps" and cfg.optimizer == "auto"  # no step touched the config

    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()  # setup decides: the folder's name, the optimizer auto resolves to
    assert trainer.cfg.name == "steps2" and trainer.cfg.optimizer in ("sgd", "adamw") and cfg.optimizer == "auto"


@pytest.mark.slow
def test_a_run_another_process_is_resuming_is_refused_in_one_line(tiny_data, tmp_path):
    from pyseg.files import FolderInUseError, FolderLock

    cfg = tiny_config(tiny_data, tmp_path, name="held", epochs=1)
    run_dir = Trainer(cfg, show_progress=False).fit()
    held = FolderLock(run_dir, "the run")
    try:
        with pytest.raises(FolderInUseError, match=f"--resume: the run {run_dir} is in use by another pyseg process"):
            Trainer(cfg.updated(resume=True), show_progress=False).fit()
    finally:
        held.release()
    Trainer(cfg.updated(resume=True), show_progress=False).fit()  # free again: finished, nothing to train


def test_results_png_is_drawn_after_the_first_and_last_epochs_and_at_most_every_interval_between(tmp_path, monkeypatch):
    import types

    import pyseg.engine.trainer as trainer_module

    clock, drawn = [0.0], []
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(trainer_module, "plot_results", lambda path: drawn.append(read_rows_epochs(path)))

    def read_rows_epochs(path):
        with open(path, newline="") as f:
            return [int(r["epoch"]) for r in csv.DictReader(f)][-1]

    def run(epochs: int, seconds: list[float], stop_after: int | None = None) -> list[int]:
        drawn.clear()
        run_dir = tmp_path / f"run{epochs}-{stop_after}"
        run_dir.mkdir()
        trainer = types.SimpleNamespace(is_main=True, run_dir=run_dir, cfg=types.SimpleNamespace(epochs=epochs))
        trainer.stop = False
        hook = trainer_module.ResultsHook()
        for epoch, at in enumerate(seconds, 1):
            clock[0] = at
            hook.on_epoch_end(trainer, {"epoch": epoch, "train/box": 1.0 / epoch})
            if epoch == stop_after:  # a later hook (a search's scheduler) stops the run here
                break
        hook.on_fit_end(trainer)
        return list(drawn)

    interval = trainer_module.RESULTS_PLOT_INTERVAL_S
    assert run(5, [0, 10, interval + 1, interval + 10, interval + 20]) == [1, 3, 5]
    assert run(6, [0, 1, 2, 3, 4, 5], stop_after=3) == [1, 3]  # the end of the run draws what the last row shows
    assert run(1, [0]) == [1]
