"""Every command answers a user error with one line naming the flag or file, exit code 2, and no traceback.

The table drives train, val, predict, tune and submit in this process (an exception escaping main fails the
test, so "no traceback" is checked by construction); two cases run as real subprocesses as well.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

ALL_COMMANDS = ("train", "val", "predict", "tune", "submit")


@pytest.fixture(autouse=True)
def environment_restored():
    """pyseg.submit turns on RAY_AUTH_MODE=token in its process; in this test process that would reach every later
    Ray the suite starts (whose client already read the mode), so the environment is put back after each case."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_main(command: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"pyseg.{command}")
    try:
        return module.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors exit 2 with the flag named
        return exit_.code


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_data):
    """Broken inputs of every kind, written once: YAMLs, torch files, a pyseg checkpoint, a symlink loop."""
    from pyseg.config import TrainConfig
    from pyseg.data.synthetic import SHAPES_CLASSES
    from pyseg.models import build_model

    root = tmp_path_factory.mktemp("bad")
    files = {"tiny_data": tiny_data, "root": root, "images": tiny_data.parent / "shapes" / "images" / "val"}
    files["not_yaml"] = root / "broken.yaml"
    files["not_yaml"].write_text("train: [unclosed\n  - : :\n")
    files["list_yaml"] = root / "list.yaml"
    files["list_yaml"].write_text("- a\n- b\n")
    files["no_train"] = root / "no_train.yaml"
    files["no_train"].write_text("path: .\nnames: [a]\n")
    files["offline"] = root / "offline.yaml"
    files["offline"].write_text(
        "path: offline-data\ntrain: images/train\nval: images/val\nnames: [a]\ndownload: http://127.0.0.1:9/d.zip\n"
    )
    files["not_torch"] = root / "notes.pt"
    files["not_torch"].write_text("these are not weights\n")
    files["foreign"] = root / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files["foreign"])
    model = build_model("pyseg-n", len(SHAPES_CLASSES))
    state = {
        "model": model.state_dict(),
        "config": TrainConfig(data=str(tiny_data), imgsz=64).to_dict(),
        "names": list(SHAPES_CLASSES),
        "model_name": "pyseg-n",
    }
    files["checkpoint"] = root / "good.pt"
    torch.save(state, files["checkpoint"])
    files["run_folder"] = root / "a_run"
    (files["run_folder"] / "weights").mkdir(parents=True)
    torch.save(state, files["run_folder"] / "weights" / "best.pt")
    files["bad_config"] = root / "bad_config.pt"
    torch.save({**state, "config": {**state["config"], "epochs": 0}}, files["bad_config"])
    files["truncated"] = root / "truncated.pt"
    files["truncated"].write_bytes(files["checkpoint"].read_bytes()[:5000])
    files["nul_cfg"] = root / "nul.yaml"
    files["nul_cfg"].write_text('name: "a\\0b"\n')  # YAML's escape: a NUL character inside the name
    old_search = root / "searches" / "old"  # a search an older pyseg started: Ray's pickle, no search.json
    old_search.mkdir(parents=True)
    (old_search / "tuner.pkl").write_bytes(b"\x80\x04K\x01.")
    (root / "searches" / "damaged").mkdir()
    (root / "searches" / "damaged" / "search.json").write_text('{"pyseg_search": 1, "trials": ')
    files["model_space"] = root / "model_space.yaml"
    files["model_space"].write_text("lr0: {loguniform: [1.0e-4, 1.0e-2]}\nmodel: {choice: [pyseg-n, yolo11n-seg]}\n")
    files["no_images"] = root / "notes"
    files["no_images"].mkdir()
    (files["no_images"] / "readme.txt").write_text("no images here\n")
    unlabelled = root / "unlabelled"  # tiny_data's images without their labels folder: only backgrounds
    shutil.copytree(tiny_data.parent / "shapes" / "images", unlabelled / "images")
    files["unlabelled"] = root / "unlabelled.yaml"
    files["unlabelled"].write_text(f"path: {unlabelled}\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    loop = root / "loop" / "images" / "train"
    loop.mkdir(parents=True)
    (loop / "self").symlink_to(loop, target_is_directory=True)
    (loop / "spin.jpg").symlink_to(loop / "spin.jpg")  # a file that links to itself
    (root / "loop" / "images" / "val").symlink_to(loop, target_is_directory=True)
    files["loop"] = root / "loop"
    return files


def train_flags(files, *extra: str) -> list[str]:
    project = files["root"] / "runs"
    return [
        *("--data", str(files["tiny_data"]), "--imgsz", "64", "--epochs", "1", "--workers", "0", "--device", "cpu"),
        *("--project", str(project), "--no-mlflow", *extra),
    ]


# (command, argv builder, text the message must contain)
CASES = {
    "train --epochs 0": ("train", lambda f: train_flags(f, "--epochs", "0"), "--epochs"),
    "train --epochs -1": ("train", lambda f: train_flags(f, "--epochs", "-1"), "--epochs"),
    "train --imgsz 63": ("train", lambda f: train_flags(f, "--imgsz", "63"), "--imgsz"),
    "train --imgsz 0": ("train", lambda f: train_flags(f, "--imgsz", "0"), "--imgsz"),
    "train --batch 0": ("train", lambda f: train_flags(f, "--batch", "0"), "--batch"),
    "train --lr0 -1": ("train", lambda f: train_flags(f, "--lr0", "-1", "--optimizer", "auto"), "--lr0"),
    "train --val-period 0": ("train", lambda f: train_flags(f, "--val-period", "0"), "--val-period"),
    "train --mosaic 2": ("train", lambda f: train_flags(f, "--mosaic", "2"), "--mosaic"),
    "train --optimizer adam": ("train", lambda f: train_flags(f, "--optimizer", "adam"), "--optimizer"),
    "train --name ../escaped": ("train", lambda f: train_flags(f, "--name", "../escaped"), "--name"),
    "train --name /abs/path": ("train", lambda f: train_flags(f, "--name", "/abs/path"), "--name"),
    "train --epochs abc": ("train", lambda f: train_flags(f, "--epochs", "abc"), "--epochs"),
    "train --epoch (an abbreviation)": ("train", lambda f: train_flags(f, "--epoch", "1"), "--epoch"),
    "train --bogus-flag": ("train", lambda f: train_flags(f, "--bogus-flag", "1"), "--bogus-flag"),
    "train missing --data": ("train", lambda f: train_flags(f, "--data", str(f["root"] / "nope.yaml")), "nope.yaml"),
    "train malformed --data": ("train", lambda f: train_flags(f, "--data", str(f["not_yaml"])), "broken.yaml"),
    "train --data without train": ("train", lambda f: train_flags(f, "--data", str(f["no_train"])), "no_train.yaml"),
    "train --data offline": ("train", lambda f: train_flags(f, "--data", str(f["offline"])), "127.0.0.1:9"),
    "train --data symlink loop": ("train", lambda f: train_flags(f, "--data", str(f["loop"])), "spin.jpg"),
    "train split without instances": (
        "train",
        lambda f: train_flags(f, "--data", str(f["unlabelled"])),
        "no labelled instances",
    ),
    "train --cfg missing": ("train", lambda f: train_flags(f, "--cfg", str(f["root"] / "gone.yaml")), "gone.yaml"),
    "train --cfg a list": ("train", lambda f: train_flags(f, "--cfg", str(f["list_yaml"])), "list.yaml"),
    "train --weights text": ("train", lambda f: train_flags(f, "--weights", str(f["not_torch"])), "notes.pt"),
    "train --weights foreign": ("train", lambda f: train_flags(f, "--weights", str(f["foreign"])), "foreign.pt"),
    "train --weights truncated": ("train", lambda f: train_flags(f, "--weights", str(f["truncated"])), "truncated.pt"),
    "train --resume missing.pt": ("train", lambda f: train_flags(f, "--resume", str(f["root"] / "x.pt")), "x.pt"),
    "train --name of 300 characters": ("train", lambda f: train_flags(f, "--name", "n" * 300), "at most 128 bytes"),
    "train --cfg with a NUL in name": ("train", lambda f: train_flags(f, "--cfg", str(f["nul_cfg"])), "NUL"),
    "train --resume a checkpoint without ema or optimizer": (
        "train",
        lambda f: train_flags(f, "--resume", str(f["checkpoint"])),
        "not the training state a run continues from (no ema, ema_updates, optimizer",
    ),
    "train --resume nothing": ("train", lambda f: train_flags(f, "--resume", "--name", "never"), "never"),
    "train --ray-workers 1, missing --data": (
        "train",
        lambda f: train_flags(f, "--ray-workers", "1", "--data", str(f["root"] / "nope.yaml")),
        "nope.yaml",
    ),
    "train --ray-workers -1": ("train", lambda f: train_flags(f, "--ray-workers", "-1"), "--ray-workers"),
    "train unwritable --project": ("train", lambda f: [*train_flags(f), "--project", "/dev/null/x"], "/dev/null/x"),
    "val unwritable --project": (
        "val",
        lambda f: ["--weights", str(f["checkpoint"]), "--device", "cpu", "--workers", "0", "--project", "/dev/null/x"],
        "/dev/null/x",
    ),
    "val --weights missing": ("val", lambda f: ["--weights", str(f["root"] / "none.pt")], "none.pt"),
    "val --weights foreign": ("val", lambda f: ["--weights", str(f["foreign"])], "foreign.pt"),
    "val --weights text": (
        "val",
        lambda f: ["--weights", str(f["not_torch"])],
        "notes.pt is not a checkpoint: not a file torch.save wrote",
    ),
    "val --weights with an invalid stored config": (
        "val",
        lambda f: ["--weights", str(f["bad_config"])],
        "bad_config.pt: the training config stored in it is invalid (epochs must be",
    ),
    "val --weights a run folder": ("val", lambda f: ["--weights", str(f["run_folder"])], "did you mean"),
    "val --split nope": ("val", lambda f: ["--weights", str(f["checkpoint"]), "--split", "nope"], "nope"),
    "val --name ../x": ("val", lambda f: ["--weights", str(f["checkpoint"]), "--name", "../x"], "--name"),
    "val --data offline": ("val", lambda f: ["--weights", str(f["checkpoint"]), "--data", str(f["offline"])], ":9"),
    "predict --weights foreign": (
        "predict",
        lambda f: ["--weights", str(f["foreign"]), "--source", str(f["images"])],
        "foreign",
    ),
    "predict --source without images": (
        "predict",
        lambda f: ["--weights", str(f["checkpoint"]), "--source", str(f["no_images"]), "--device", "cpu"],
        "holds no images",
    ),
    "predict --source missing": (
        "predict",
        lambda f: ["--weights", str(f["checkpoint"]), "--source", str(f["root"] / "gone.jpg"), "--device", "cpu"],
        "gone.jpg",
    ),
    "predict --imgsz 50": (
        "predict",
        lambda f: ["--weights", str(f["checkpoint"]), "--source", str(f["images"]), "--imgsz", "50", "--device", "cpu"],
        "--imgsz",
    ),
    "tune --samples 0": ("tune", lambda f: ["--samples", "0", "--no-mlflow"], "--samples"),
    "tune --epochs 0": ("tune", lambda f: ["--epochs", "0", "--no-mlflow"], "--epochs"),
    "tune --name ../x": ("tune", lambda f: ["--name", "../x", "--no-mlflow"], "--name"),
    "tune --name with a newline": ("tune", lambda f: ["--name", "a\nb", "--no-mlflow"], "--name"),
    "tune --name empty": ("tune", lambda f: ["--name", "", "--no-mlflow"], "--name"),
    "tune --space broken": ("tune", lambda f: ["--space", str(f["not_yaml"]), "--no-mlflow"], "broken.yaml"),
    "tune --resume PATH": ("tune", lambda f: ["--resume", str(f["checkpoint"])], "--resume"),
    "tune --resume a search only Ray's pickles describe": (
        "tune",
        lambda f: ["--resume", "--name", "old", "--project", str(f["root"] / "searches"), "--no-mlflow"],
        "does not read pickles",
    ),
    "tune --resume a damaged search.json": (
        "tune",
        lambda f: ["--resume", "--name", "damaged", "--project", str(f["root"] / "searches"), "--no-mlflow"],
        "search.json: is not valid JSON",
    ),
    "tune --grace-period -1": ("tune", lambda f: ["--grace-period", "-1", "--no-mlflow"], "--grace-period"),
    "tune --cpus-per-worker 0": ("tune", lambda f: ["--cpus-per-worker", "0", "--no-mlflow"], "--cpus-per-worker"),
    "tune unwritable --project": ("tune", lambda f: ["--project", "/dev/null/x", "--no-mlflow"], "/dev/null"),
    "train --seed -1": ("train", lambda f: train_flags(f, "--seed", "-1"), "--seed"),
    "train --seed 2**64": ("train", lambda f: train_flags(f, "--seed", str(2**64)), "--seed"),
    "tune --cpus-per-worker 64 (more than there are)": (
        "tune",
        lambda f: [
            "--data",
            str(f["tiny_data"]),
            "--cpus-per-worker",
            "64",
            "--no-mlflow",
            "--project",
            str(f["root"]),
        ],
        "lower --workers-per-trial",
    ),
    "tune --weights text": (
        "tune",
        lambda f: ["--data", str(f["tiny_data"]), "--weights", str(f["not_torch"]), "--no-mlflow"],
        "notes.pt",
    ),
    "tune --weights with the model searched": (
        "tune",
        lambda f: [
            *("--data", str(f["tiny_data"]), "--weights", str(f["checkpoint"]), "--space", str(f["model_space"])),
            "--no-mlflow",
        ],
        "`model` is searched, but --weights",
    ),
    "train --model a .pt file": ("train", lambda f: train_flags(f, "--model", "yolo11n-seg.pt"), "goes to --weights"),
    "train --weights a model name": ("train", lambda f: train_flags(f, "--weights", "yolo11n-seg"), "--model yolo11n"),
    "tune --max-concurrent -1": ("tune", lambda f: ["--max-concurrent", "-1", "--no-mlflow"], "--max-concurrent"),
    "train --val maybe": ("train", lambda f: train_flags(f, "--val", "maybe"), "invalid true/false value"),
    "train --ray-workers at an address nothing answers": (
        "train",
        lambda f: train_flags(f, "--ray-workers", "2", "--address", "127.0.0.1:9", "--name", "unreachable"),
        "cannot reach the Ray cluster at 127.0.0.1:9",
    ),
    "submit without a command": ("submit", lambda f: ["--address", "http://127.0.0.1:9"], "command"),
    "submit unreachable": ("submit", lambda f: ["--address", "http://127.0.0.1:9", "--", "train"], "127.0.0.1:9"),
}
if not torch.cuda.is_available():
    CASES["train --device cuda without a GPU"] = ("train", lambda f: train_flags(f, "--device", "cuda"), "--device")


def test_the_table_covers_every_command_with_at_least_25_cases():
    assert len(CASES) >= 25 and {command for command, _, _ in CASES.values()} == set(ALL_COMMANDS)


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_and_exit_code_2(case, bad_files, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYSEG_DATASETS_DIR", str(tmp_path / "datasets"))
    monkeypatch.chdir(tmp_path)
    command, argv, named = CASES[case]
    code = run_main(command, argv(bad_files))
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err  # argparse's too: no usage dump
    if "--ray-workers" in case:
        assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized(), "checked before Ray starts"
    assert not list(tmp_path.glob("runs/*/weights/*.pt")), "a failed start leaves no weights"
    assert not (bad_files["root"] / "runs" / "unreachable").exists(), "nor an empty run folder"


@pytest.mark.parametrize(
    ("command", "argv", "named"),
    [
        ("train", ["--imgsz", "63", "--no-mlflow"], "--imgsz must be a positive multiple of 32"),
        ("val", ["--weights", "FOREIGN"], "not a pyseg checkpoint"),
    ],
)
def test_a_real_process_prints_no_traceback_unless_debugging(command, argv, named, bad_files, tmp_path):
    argv = [str(bad_files["foreign"]) if a == "FOREIGN" else a for a in argv]
    env = {**os.environ, "PYSEG_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYSEG_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", f"pyseg.{command}", *argv], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    debug = subprocess.run(
        [sys.executable, "-m", f"pyseg.{command}", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYSEG_DEBUG": "1"},
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr and named in debug.stderr


def test_ctrl_c_in_a_command_is_one_line_and_exit_code_130(capsys):
    from pyseg.errors import run_command

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command("pyseg.val", interrupted, []) == 130
    err = capsys.readouterr().err
    assert err.strip() == "pyseg.val: interrupted" and "Traceback" not in err


# ------------------------------------------------------------------ the machine's faults: read-only and full disks


def messy_copy(tiny_data, root):
    """tiny_data copied under root with one bad label row (so that train has data problems to write)."""
    shutil.copytree(tiny_data.parent / "shapes", root / "shapes")
    (root / "shapes.yaml").write_text(tiny_data.read_text())
    label = sorted((root / "shapes" / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 nan 0.5 0.6 0.5 0.6 0.7\n")
    return root / "shapes.yaml"


def tiny_train(data, project, *extra) -> list[str]:
    return [
        *("--data", str(data), "--imgsz", "64", "--batch", "4", "--epochs", "1", "--workers", "0", "--device", "cpu"),
        *("--threads", "1", "--project", str(project), "--no-mlflow", *extra),
    ]


def test_a_read_only_project_is_one_line_even_with_data_problems(tiny_data, tmp_path, capsys, monkeypatch):
    """data_problems.txt was written before the project's writability was checked: a traceback (exit 1)."""
    from conftest import small_filesystem

    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    data = messy_copy(tiny_data, tmp_path / "data")
    with small_filesystem("1m", read_only=True) as project:
        code = run_main("train", tiny_train(data, project))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "read-only file system; pick a writable --project" in err and str(project) in err


def test_resume_in_a_read_only_project_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    from conftest import remount_read_only, small_filesystem

    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    with small_filesystem("200m") as project:
        assert run_main("train", tiny_train(tiny_data, project, "--name", "ro", "--epochs", "2")) == 0
        checkpoint = torch.load(project / "ro" / "weights" / "last.pt", weights_only=True)
        checkpoint["epoch"] = 0  # as if interrupted after epoch 1 of 2
        torch.save(checkpoint, project / "ro" / "weights" / "last.pt")
        capsys.readouterr()
        remount_read_only(project)
        code = run_main("train", ["--resume", "--name", "ro", "--project", str(project), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "read-only file system" in err


def test_a_full_disk_stops_training_in_one_line_and_keeps_last_pt(tiny_data, tmp_path, capsys, monkeypatch):
    """A project on a disk with room for the first epoch's checkpoints only: train stops with one line saying the
    disk is full, exit 2, and weights/last.pt is the complete file of the last epoch that fit."""
    from conftest import small_filesystem

    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    assert run_main("train", tiny_train(tiny_data, tmp_path / "probe", "--name", "probe")) == 0
    size = (tmp_path / "probe" / "probe" / "weights" / "last.pt").stat().st_size
    capsys.readouterr()
    # last.pt + best.pt of epoch 1 and a little more: the first write of epoch 2 (a temporary beside last.pt) fails
    with small_filesystem(f"{int(size * 2.5 / 2**20) + 1}m") as project:
        code = run_main("train", tiny_train(tiny_data, project, "--name", "full", "--epochs", "3"))
        err = capsys.readouterr().err
        last = project / "full" / "weights" / "last.pt"
        state = torch.load(last, weights_only=True)
        leftovers = [p.name for p in last.parent.iterdir() if p.name.startswith(".")]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no space left on device (the disk is full)" in err and "--resume" in err
    assert state["epoch"] >= 0 and not leftovers


def test_a_bad_resume_file_is_refused_before_anything_is_printed(bad_files, capsys, tmp_path, monkeypatch):
    """--resume FILE outside its run folder: the file is read before the run folder or ignored flags are talked
    about, so a bad file is the only line."""
    monkeypatch.chdir(tmp_path)
    for name in ("not_torch", "truncated", "foreign"):
        code = run_main("train", train_flags(bad_files, "--resume", str(bad_files[name])))
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", captured.out
        assert len(captured.err.strip().splitlines()) == 1 and bad_files[name].name in captured.err


ENTRY_POINTS = ("train", "val", "predict", "tune", "submit")


def test_the_entry_points_import_no_other_entry_point_and_submit_loads_no_torch():
    """Each python -m entry point parses, calls and maps errors; none imports another (shared flags and helpers
    live in pyseg.distributed.flags and pyseg.engine.output_folders), and the job client runs without torch."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "pyseg"
    for name in ENTRY_POINTS:
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"pyseg.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     if node.module == "pyseg" for alias in node.names}  # fmt: skip
        others = {f"pyseg.{other}" for other in ENTRY_POINTS if other != name}
        assert not imported & others, (name, imported & others)
    code = "import sys, pyseg.submit, pyseg.distributed.jobs; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'torch'" not in loaded and "'ray'" not in loaded, loaded


def test_a_bug_in_run_tune_or_in_submit_keeps_its_traceback(monkeypatch, tmp_path, tiny_data):
    """Only user mistakes become one line and exit 2: an error of another kind (a bug) escapes main with its
    traceback, from the search driver and from the job client alike."""
    import pyseg.distributed.jobs as jobs
    import pyseg.distributed.search as search

    def broken_run_tune(*args, **kwargs):
        raise FileNotFoundError("a bug: some internal file is missing")

    monkeypatch.setattr(search, "run_tune", broken_run_tune)
    with pytest.raises(FileNotFoundError, match="a bug"):
        run_main("tune", ["--data", str(tiny_data), "--no-mlflow", "--project", str(tmp_path)])

    def broken_submit(*args, **kwargs):
        raise TypeError("a bug in the job client")

    monkeypatch.setattr(jobs, "submit_job", broken_submit)
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", lambda address: object())
    with pytest.raises(TypeError, match="a bug in the job client"):
        run_main("submit", ["--address", "http://127.0.0.1:9", "--no-wait", "--", "train"])
