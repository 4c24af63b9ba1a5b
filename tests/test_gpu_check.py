"""benchmarks/gpu_check.py, the staged GPU check, where it can run without a GPU: its arguments, a stage that finds
no GPU, the train stage on CPU, prepare, and the checks it makes of a run's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def gpu_check_run(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """bash benchmarks/gpu_check.sh ARGS with this interpreter, its files under tmp_path (device dir, OUT)."""
    env = {**os.environ, "PYTHON": sys.executable, "PYSEG_DEVICE_DIR": str(tmp_path / "device")}
    env["OUT"] = str(tmp_path / "out")
    env["PYSEG_CACHE_DIR"] = str(tmp_path / "cache")
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_missing_or_unknown_stage_is_a_usage_error(tmp_path):
    for args in ([], ["build-test", "nope"], ["sanitize", "--tools", "memcheck,leakcheck"]):
        done = gpu_check_run(tmp_path, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.splitlines()[-1].startswith("gpu_check: error:"), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")
def test_without_a_gpu_every_stage_fails_and_says_why_in_its_json(tmp_path):
    done = gpu_check_run(tmp_path, "build-test", "sanitize", "bench", "train")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 of 4 stages passed" in done.stdout
    for stage in gpu_check.STAGES:
        result = json.loads((tmp_path / "out" / f"{stage}.json").read_text())
        assert result["stage"] == stage and result["ok"] is False
        assert "sees no CUDA device" in result["error"]
        assert result["environment"]["torch"] == torch.__version__ and result["environment"]["device"] == "cpu"
        assert (tmp_path / "out" / f"{stage}.log").is_file()
    assert not (tmp_path / "device" / "build.log").exists()  # no build was tried


def test_the_train_stage_reports_images_per_second_and_mask_map(tiny_data, tmp_path):
    # --device cpu checks the stage on a CPU machine: pyseg.train in a subprocess, its results.csv read back.
    done = gpu_check_run(
        tmp_path,
        "train",
        "--device",
        "cpu",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        "--imgsz",
        "64",
        "--batch",
        "4",
        "--workers",
        "0",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["ok"] is True and result["error"] is None, result
    figures = result["figures"]
    assert figures["epochs"] == 1 and figures["imgsz"] == 64 and figures["device"] == "cpu"
    assert figures["masks_made_on"] == "loader"  # on a GPU: "device"
    assert figures["images_per_s_median"] > 0 and 0.0 <= figures["mask_map50_95"] <= 1.0
    assert set(figures["losses_last"]) == {"train/box", "train/cls", "train/dfl", "train/mask"}
    assert Path(figures["run_dir"]).is_relative_to(tmp_path / "device" / "runs")
    assert "results in" in (tmp_path / "out" / "train.log").read_text()


def write_run(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    (run_dir / "results.csv").write_text("\n".join(lines) + "\n")
    (run_dir / "args.yaml").write_text("imgsz: 640\nbatch: 16\namp: true\ndevice: '0'\n")


def epoch_row(epoch: int, mask_loss: float, **changes) -> dict:
    row = {"epoch": epoch, "train/box": 3.0, "train/mask": mask_loss, "images_per_s": 100.0 + epoch}
    row.update({"epoch_seconds": 2.0, "mask/map": 0.01 * epoch, "mask/map50": 0.02 * epoch, "box/map": 0.01})
    row.update(changes)
    return row


def test_a_run_passes_only_when_complete_finite_and_learning(tmp_path):
    # validated after epochs 1 and 3 (--val-period 2): epoch 2 has blank metric cells
    unvalidated = {"mask/map": "", "mask/map50": "", "box/map": ""}
    write_run(tmp_path / "good", [epoch_row(1, 9.0), epoch_row(2, 7.0, **unvalidated), epoch_row(3, 6.0)])
    figures = gpu_check.train_figures(tmp_path / "good", 3)
    assert figures["images_per_s_median"] == 102.5  # epochs 2 and 3: epoch 1 holds the warm-up
    assert figures["validated_epochs"] == [1, 3]
    assert figures["mask_map50_95"] == 0.03 and figures["best_mask_map50_95"] == 0.03
    assert figures["losses_first"]["train/mask"] == 9.0 and figures["losses_last"]["train/mask"] == 6.0

    cases = {
        "short": ([epoch_row(1, 9.0), epoch_row(2, 7.0)], "holds 2 epochs, not 3"),
        "nan": ([epoch_row(1, 9.0), epoch_row(2, "nan"), epoch_row(3, 6.0)], "non-finite losses: train/mask epoch 2"),
        "flat": ([epoch_row(1, 6.0), epoch_row(2, 7.0), epoch_row(3, 6.5)], "the mask loss did not fall"),
        "no map": ([epoch_row(1, 9.0), epoch_row(2, 7.0), epoch_row(3, 6.0, **{"mask/map": ""})], "no mask mAP"),
    }
    for name, (rows, message) in cases.items():
        write_run(tmp_path / name, rows)
        with pytest.raises(gpu_check.StageError, match=message):
            gpu_check.train_figures(tmp_path / name, 3)


def test_test_counts_come_from_the_junit_report(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_a" name="test_broken"><error message="fixture failed"/></testcase>'
        '<testcase classname="tests.test_a" name="test_later"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(report)
    assert {key: counts[key] for key in ("tests", "passed", "failed", "errors", "skipped")} == {
        "tests": 4,
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert counts["failed_tests"] == [
        "tests.test_a::test_bad: assert 1 == 2",
        "tests.test_a::test_broken: fixture failed",
    ]
    assert counts["skipped_tests"] == ["tests.test_a::test_later: needs a CUDA device"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml")["tests"] == 0


def test_sanitizer_summaries_are_read_per_tool():
    memcheck = "========= COMPUTE-SANITIZER\nexercise-ops: ok\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.sanitizer_summary("memcheck", memcheck) == (0, None)
    assert gpu_check.sanitizer_summary("initcheck", "========= ERROR SUMMARY: 1 error\n") == (1, None)
    racecheck = "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
    assert gpu_check.sanitizer_summary("racecheck", racecheck) == (1, 2)
    # a run that died before its summary has no count, which the stage treats as a failure
    assert gpu_check.sanitizer_summary("synccheck", "Segmentation fault\n") == (None, None)
    assert gpu_check.sanitizer_summary("racecheck", memcheck) == (None, None)


def test_prepare_copies_coco128_seg_to_carry(tmp_path):
    source = tmp_path / "coco128-seg"
    for part, name, text in (("images", "a.jpg", "jpeg"), ("labels", "a.txt", "0 0.1 0.1 0.5 0.1 0.5 0.5\n")):
        (source / part / "train2017").mkdir(parents=True)
        (source / part / "train2017" / name).write_text(text)
    done = gpu_check_run(tmp_path, "prepare", "--no-wheels", "--coco128", str(source))
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "device" / "coco128-seg"
    assert (copy / "labels" / "train2017" / "a.txt").read_text() == "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    assert (copy / "images" / "train2017" / "a.jpg").is_file()
    assert 'carry ["' in done.stdout
    missing = gpu_check_run(tmp_path, "prepare", "--no-wheels", "--coco128", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "COCO128-Seg not found" in missing.stderr


def test_the_device_files_are_git_ignored():
    done = subprocess.run(["git", "check-ignore", "-q", ".device/coco128-seg"], cwd=ROOT)
    assert done.returncode == 0, ".device/ must be in .gitignore: it holds the data and wheels a device call carries"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")
def test_bench_ops_gpu_mode_says_it_needs_a_cuda_device(tmp_path):
    report = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--gpu", "--json", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "sees no CUDA device" in done.stderr and not report.exists()
    misuse = subprocess.run(command[:2] + ["--json", str(report)], capture_output=True, text=True, timeout=300)
    assert misuse.returncode == 2 and "--json goes with --gpu" in misuse.stderr


def test_a_carried_wheel_that_does_not_install_fails_every_stage(tmp_path):
    wheels = tmp_path / "device" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    done = gpu_check_run(tmp_path, "train", "bench", "--device", "cpu")
    assert done.returncode == 1, done.stdout + done.stderr
    for stage in ("train", "bench"):
        result = json.loads((tmp_path / "out" / f"{stage}.json").read_text())
        assert result["ok"] is False and result["error"].startswith("installing broken-1.0-py3-none-any.whl failed")
    assert not (tmp_path / "device" / "runs").exists()  # no training started


def test_a_stage_with_too_little_of_the_budget_left_fails_saying_so(tiny_data, tmp_path):
    # 25 s for the whole call, 20 of them kept back to write the JSON: too little to start a training
    done = gpu_check_run(tmp_path, "train", "--device", "cpu", "--data", str(tiny_data), "--budget", "25")
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["ok"] is False and result["error"] == "out of time: the call's --budget of 25 s is spent"
    assert not (tmp_path / "device" / "runs").exists()
