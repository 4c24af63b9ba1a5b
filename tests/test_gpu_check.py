"""benchmarks/gpu_check.py, the staged GPU check, where it can run without a GPU: its arguments, a stage that finds
no GPU or no torch, the train stage on CPU, prepare, the carried wheels, which tests build-test runs and how it
counts them, a command stopped for time or by an interrupt, and the checks it makes of a run's results."""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import process_group_members

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def gpu_check_run(tmp_path: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """bash benchmarks/gpu_check.sh ARGS with this interpreter, its files under tmp_path (device dir, OUT), env
    added to its environment."""
    env = {**os.environ, "PYTHON": sys.executable, "PYSEG_DEVICE_DIR": str(tmp_path / "device"), **env}
    env.setdefault("OUT", str(tmp_path / "out"))
    env["PYSEG_CACHE_DIR"] = str(tmp_path / "cache")
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_an_argument_error_is_one_line_exit_2_and_a_json_for_each_stage_named(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {
        "no stage": ([], "the following arguments are required: STAGE"),
        "unknown stage": (["build-test", "nope"], "unknown stage nope"),
        "unknown tool": (["sanitize", "--tools", "memcheck,leakcheck"], "--tools: a comma-separated subset"),
        "prepare and more": (["prepare", "train"], "prepare runs alone, on this machine"),
        "budget too small": (["train", "--budget", "25"], "--budget 25: at least 60 s"),
        "no such coco128": (["bench", "--coco128", str(tmp_path / "nowhere")], "COCO128-Seg not found there"),
        "mistyped flag": (["train", "--epoch", "3"], "unrecognized arguments: --epoch"),
        "out is a file": (["train", "--out", str(a_file)], f"--out {a_file}: a file, not a folder"),
        "stage twice": (["train", "bench", "train"], "stage train named twice"),
        "no such data": (["train", "--data", str(tmp_path / "no.yaml")], "not a built-in dataset name"),
        "runs carried": (
            ["train", "--runs", str(tmp_path / "runs_carried" / "device" / "runs")],
            "a device call carries",
        ),
    }
    for name, (args, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        done = gpu_check_run(folder, *args)
        assert done.returncode == 2, (name, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_check: "), (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
        named = [arg for arg in args if arg in gpu_check.STAGES]
        if named and name != "out is a file":
            for stage in named:
                result = json.loads((folder / "out" / f"{stage}.json").read_text())
                assert result["ok"] is False and result["error"].startswith("argument error: "), result
                assert message in result["error"], result
        else:
            assert not (folder / "out").exists(), name
        assert not (folder / "device").exists(), name  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")
def test_exercise_ops_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    done = gpu_check_run(tmp_path, "exercise-ops")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "sees no CUDA device" in done.stderr, done.stderr


def test_without_torch_every_stage_fails_and_says_why_in_its_json(tmp_path):
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    done = gpu_check_run(tmp_path, "build-test", "train", "--device", "cpu", PYTHONPATH=str(fake.parent))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for stage in ("build-test", "train"):
        result = json.loads((tmp_path / "out" / f"{stage}.json").read_text())
        assert result["ok"] is False and result["error"].startswith("torch cannot be imported by "), result
        assert result["error"].endswith("torch is not installed here") and "environment" not in result


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")
def test_without_a_gpu_every_stage_fails_and_says_why_in_its_json(tmp_path):
    # the GPU is checked before the carried wheels are installed: a wheel that cannot install does not hide it
    wheels = tmp_path / "device" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    done = gpu_check_run(tmp_path, "build-test", "sanitize", "bench", "train")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 of 4 stages passed" in done.stdout
    for stage in gpu_check.STAGES:
        result = json.loads((tmp_path / "out" / f"{stage}.json").read_text())
        assert result["stage"] == stage and result["ok"] is False
        assert "sees no CUDA device" in result["error"] and "wheels" not in result
        assert result["environment"]["torch"] == torch.__version__ and result["environment"]["device"] == "cpu"
        assert (tmp_path / "out" / f"{stage}.log").is_file()
    assert not (tmp_path / "device" / "build.log").exists()  # no build was tried


@pytest.mark.slow
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
        "--runs",
        str(tmp_path / "runs"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["ok"] is True and result["error"] is None, result
    figures = result["figures"]
    assert figures["epochs"] == 1 and figures["imgsz"] == 64 and figures["device"] == "cpu"
    assert figures["masks_made_on"] == "loader"  # on a GPU: "device"
    assert figures["amp"] is False  # --amp true does nothing on the CPU; on a GPU: "bf16" or "fp16"
    assert figures["images_per_s_median"] > 0 and 0.0 <= figures["mask_map50_95"] <= 1.0
    assert set(figures["losses_last"]) == {"train/box", "train/cls", "train/dfl", "train/mask"}
    assert Path(figures["run_dir"]).is_relative_to(tmp_path / "runs")
    assert not (tmp_path / "device" / "runs").exists() and not (tmp_path / "device" / "cache").exists()
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
        "no map": ([epoch_row(1, 9.0), epoch_row(2, 7.0), epoch_row(3, 6.0, **{"mask/map": ""})], "no mask mAP"),
    }
    for name, (rows, message) in cases.items():
        write_run(tmp_path / name, rows)
        with pytest.raises(gpu_check.StageError, match=message):
            gpu_check.train_figures(tmp_path / name, 3)
    # From 5 epochs on (the GPU stage runs 10) the mask loss must fall; a shorter CPU check of the stage need not.
    flat = [epoch_row(e, loss) for e, loss in enumerate([6.0, 7.0, 6.5, 6.2, 6.1], 1)]
    write_run(tmp_path / "flat", flat)
    with pytest.raises(gpu_check.StageError, match="the mask loss did not fall"):
        gpu_check.train_figures(tmp_path / "flat", 5)
    write_run(tmp_path / "short flat", flat[:3])
    assert gpu_check.train_figures(tmp_path / "short flat", 3)["losses_last"]["train/mask"] == 6.5


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


@pytest.fixture
def device_dir_in_repo():
    """A git-ignored device folder inside the repository (prepare refuses one outside: it could not be carried),
    removed afterwards, and build/ with it when the test made it."""
    build = ROOT / "build"
    build_existed = build.exists()
    folder = build / f"gpu-check-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield folder / "device"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if not build_existed:
            shutil.rmtree(build, ignore_errors=True)


def fake_coco128(folder: Path) -> Path:
    for part, name, text in (("images", "a.jpg", "jpeg"), ("labels", "a.txt", "0 0.1 0.1 0.5 0.1 0.5 0.5\n")):
        (folder / part / "train2017").mkdir(parents=True)
        (folder / part / "train2017" / name).write_text(text)
    return folder


def test_prepare_copies_coco128_seg_to_carry(tmp_path, device_dir_in_repo):
    source = fake_coco128(tmp_path / "coco128-seg")
    device = str(device_dir_in_repo)
    done = gpu_check_run(tmp_path, "prepare", "--no-wheels", "--coco128", str(source), PYSEG_DEVICE_DIR=device)
    assert done.returncode == 0, done.stderr
    copy = device_dir_in_repo / "coco128-seg"
    assert (copy / "labels" / "train2017" / "a.txt").read_text() == "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    assert (copy / "images" / "train2017" / "a.jpg").is_file()
    assert "git-ignored" in done.stdout and 'carry ["build/gpu-check-test-' in done.stdout
    assert "build-test bench sanitize" in done.stdout and "warning" not in done.stderr
    missing = gpu_check_run(
        tmp_path, "prepare", "--no-wheels", "--coco128", str(tmp_path / "nowhere"), PYSEG_DEVICE_DIR=device
    )
    assert missing.returncode == 2 and "COCO128-Seg not found" in missing.stderr


def test_prepare_warns_when_the_device_folder_is_too_big_to_carry(tmp_path, device_dir_in_repo):
    (device_dir_in_repo / "runs").mkdir(parents=True)
    with open(device_dir_in_repo / "runs" / "last.pt", "wb") as f:
        f.truncate(55 * 2**20)  # sparse: 55 MiB to stat, nothing on disk
    source = fake_coco128(tmp_path / "coco128-seg")
    done = gpu_check_run(
        tmp_path, "prepare", "--no-wheels", "--coco128", str(source), PYSEG_DEVICE_DIR=str(device_dir_in_repo)
    )
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "carries 64 MiB in all" in done.stderr and "runs 55 MiB" in done.stderr


def test_prepare_refuses_a_device_folder_outside_the_repository(tmp_path):
    source = fake_coco128(tmp_path / "coco128-seg")
    done = gpu_check_run(tmp_path, "prepare", "--no-wheels", "--coco128", str(source))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "outside the repository" in done.stderr and not (tmp_path / "device").exists()


def test_the_device_files_are_git_ignored(tmp_path):
    # The project's .gitignore in a fresh repository (the checkout under test may be an export, not a repository).
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    done = subprocess.run(["git", "check-ignore", "-q", ".device/coco128-seg"], cwd=tmp_path)
    assert done.returncode == 0, ".device/ must be in .gitignore: it holds the data and wheels a device call carries"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")
def test_bench_ops_gpu_mode_says_it_needs_a_cuda_device(tmp_path):
    report = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--gpu", "--json", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "sees no CUDA device" in done.stderr and not report.exists()
    misuse = subprocess.run(command[:2] + ["--json", str(report)], capture_output=True, text=True, timeout=300)
    assert misuse.returncode == 2 and "--json goes with --gpu" in misuse.stderr


def test_a_carried_wheel_that_does_not_install_fails_the_stage(tmp_path):
    wheels = tmp_path / "device" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    done = gpu_check_run(tmp_path, "train", "--device", "cpu", "--runs", str(tmp_path / "runs"))
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["ok"] is False and result["error"].startswith("installing broken-1.0-py3-none-any.whl failed")
    assert not (tmp_path / "runs").exists()  # no training started


def test_a_wheel_for_another_python_is_skipped_when_its_module_is_here_else_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_DEVICE_DIR", str(tmp_path / "device"))
    wheels = tmp_path / "device" / "wheels"
    wheels.mkdir(parents=True)
    tag = "cp399-cp399-manylinux_2_17_x86_64"
    (wheels / f"numpy-9.9-{tag}.whl").write_bytes(b"")  # no top_level.txt: the module is the distribution's name
    with zipfile.ZipFile(wheels / f"PyYAML-9.9-{tag}.whl", "w") as archive:
        archive.writestr("PyYAML-9.9.dist-info/top_level.txt", "yaml\n")
    assert gpu_check.install_carried_wheels() == {
        "installed": [],
        "skipped": [
            f"PyYAML-9.9-{tag}.whl: built for cp399, not {sys.executable} (Python {platform.python_version()}, "
            f"{sysconfig.get_platform()}); yaml importable",
            f"numpy-9.9-{tag}.whl: built for cp399, not {sys.executable} (Python {platform.python_version()}, "
            f"{sysconfig.get_platform()}); numpy importable",
        ],
    }
    (wheels / f"no_such_module_here-1.0-{tag}.whl").write_bytes(b"")
    with pytest.raises(gpu_check.StageError) as raised:
        gpu_check.install_carried_wheels()
    message = str(raised.value)
    assert message.startswith(f"no_such_module_here-1.0-{tag}.whl is built for cp399, not for {sys.executable}")
    assert "cannot import no_such_module_here: run the stages with a Python 3.12 (PYTHON=python3.12" in message


def test_a_stage_with_too_little_of_the_budget_left_fails_saying_so(tmp_path, monkeypatch):
    # 25 s left of the call, 20 of them kept back to write the JSON: too little to start a training
    monkeypatch.setenv("PYSEG_DEVICE_DIR", str(tmp_path / "device"))
    monkeypatch.setitem(gpu_check.DEADLINE, "at", time.monotonic() + 25)
    monkeypatch.setitem(gpu_check.DEADLINE, "budget", 100)
    args = gpu_check.parse_args(["train", "--device", "cpu", "--data", "shapes-seg.yaml", "--runs", str(tmp_path)])
    (tmp_path / "out").mkdir()
    assert gpu_check.run_stage("train", args, tmp_path / "out", {}) is False
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["ok"] is False and result["error"] == "out of time: the call's --budget of 100 s is spent"
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # no run folder


def test_train_data_passes_names_through_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("path: .\n")
    assert gpu_check.train_data("shapes-seg.yaml", None) == "shapes-seg.yaml"  # a built-in name, for pyseg.train
    assert gpu_check.train_data("mine.yaml", None) == str(tmp_path / "mine.yaml")
    assert gpu_check.train_data("missing.yaml", None) == "missing.yaml"  # pyseg.train says what it accepts
    with pytest.raises(gpu_check.StageError, match="--coco128 nowhere: COCO128-Seg not found there"):
        gpu_check.train_data(None, "nowhere")


# ------------------------------------------------------------------ which tests build-test runs

BLOCK_OPTIONAL_MODULES = """
import sys

class Blocker:  # the device machine has no Ray, MLflow or moto
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "moto"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.slow
def test_build_test_selects_every_test_pytest_marks_needs_cuda(tmp_path):
    # as on the device machine: Ray, MLflow and moto missing (a pytest plugin blocks their import)
    (tmp_path / "block_optional.py").write_text(BLOCK_OPTIONAL_MODULES)
    env = {**os.environ, "PYTEST_ADDOPTS": "-p block_optional", "PYSEG_EXPECT_GPU": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    env["PYSEG_CACHE_DIR"] = str(tmp_path / "cache")
    with open(tmp_path / "collect.log", "w") as log:
        collection = gpu_check.needs_cuda_collection(log, 300, env, tmp_path / "collection.json")
    assert collection["problems"] == [], collection["problems"]
    assert "tests/test_search.py" in collection["not_collected"]  # needs Ray; no needs_cuda test in it

    # what pytest collects with -m needs_cuda from the op tests and the trainer's, each file on its own
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_ops_*.py"))]
    expected = []
    for file in [*files, "tests/test_trainer.py"]:
        command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "needs_cuda"]
        done = subprocess.run([*command, file], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]  # 5: none collected
        found = [line for line in done.stdout.splitlines() if line.startswith(f"{file}::")]
        if found:
            assert file in collection["files"], file
        expected += found
    for name in ("rasterize", "assemble", "mask_loss"):  # their needs_cuda mark comes from the device fixture
        assert f"tests/test_ops_{name}.py" in collection["files"]
    assert "tests/test_trainer.py" in collection["files"]
    expected_files = {test.split("::")[0] for test in expected}
    # the same tests, in pytest's order within each file (conftest.py hands the longest modules out first)
    collected = [test for test in collection["tests"] if test.split("::")[0] in expected_files]
    assert sorted(collected, key=lambda test: test.split("::")[0]) == sorted(expected, key=lambda t: t.split("::")[0])
    assert len(expected) > 200


def test_a_collected_needs_cuda_test_that_did_not_pass_or_run_fails_build_test(tmp_path):
    # a small project of its own: its tests, pytest's JUnit XML of them, and the node ids the plugin recorded
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pytest.ini").write_text("[pytest]\nmarkers =\n    needs_cuda: a mark\n")
    (project / "tests" / "test_names.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.needs_cuda\n"
        "@pytest.mark.parametrize('size', ['a::b', 'c/d', 3])\n"
        "def test_sizes(size):\n    pass\n\n"
        "class TestCase:\n"
        "    @pytest.mark.needs_cuda\n"
        "    def test_in_a_class(self):\n        pass\n\n"
        "    @pytest.mark.needs_cuda\n"
        "    def test_skipped(self):\n        pytest.skip('no data')\n"
    )
    report, listed = tmp_path / "report.xml", tmp_path / "listed.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), gpu_check.COLLECTION_JSON_ENV: str(listed)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check", "-m", "needs_cuda"]
    done = subprocess.run([*command, f"--junitxml={report}", "tests"], cwd=project, env=env, capture_output=True)
    assert done.returncode == 0, done.stdout
    collected = json.loads(listed.read_text())["selected"]
    assert len(collected) == 5
    assert gpu_check.not_passed(collected, report) == ["tests/test_names.py::TestCase::test_skipped"]
    # a test the run left out (a file missing from its selection, or deselected) did not pass either
    assert gpu_check.not_passed([*collected, "tests/test_other.py::test_x[cuda]"], report) == [
        "tests/test_names.py::TestCase::test_skipped",
        "tests/test_other.py::test_x[cuda]",
    ]


def test_a_test_file_that_did_not_collect_fails_build_test_unless_it_lacks_only_an_optional_module(tmp_path):
    files = {
        "test_search.py": "import ray\ndef test_search():\n    pass\n",
        "test_ray_and_cuda.py": "import ray\nimport pytest\n@pytest.mark.needs_cuda\ndef test_x():\n    pass\n",
        "test_fixture.py": "import mlflow\ndef test_x(tmp_path, device):\n    pass\n",
        "test_broken.py": "def test_x(:\n",
        "test_no_build.py": "import pyseg._C\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    problems = gpu_check.collection_problems(
        {
            "test_search.py": "ModuleNotFoundError: No module named 'ray'",
            "test_ray_and_cuda.py": "ModuleNotFoundError: No module named 'ray'",
            "test_fixture.py": "skipped: could not import 'mlflow': No module named 'mlflow'",
            "test_broken.py": "SyntaxError: invalid syntax",
            "test_no_build.py": "ModuleNotFoundError: No module named 'pyseg._C'",
        },
        tmp_path,
    )
    assert [problem.split()[0] for problem in problems] == [
        "test_ray_and_cuda.py",
        "test_fixture.py",
        "test_broken.py",
        "test_no_build.py",
    ]


# ------------------------------------------------------------------ stopping what a stage runs

# The train stage's command, replaced: a child that starts a grandchild (same process group), each noting a SIGINT
# in MARKS, or ignoring it (CHILD_MODE=ignore).
CHILD = """
import os, signal, subprocess, sys, time

role = sys.argv[1]

def note(text):
    with open(os.environ["MARKS"], "a") as f:
        f.write(f"{role} {text}\\n")

def interrupted(signum, frame):
    note("got SIGINT")
    sys.exit(130)

signal.signal(signal.SIGINT, signal.SIG_IGN if os.environ.get("CHILD_MODE") == "ignore" else interrupted)
if role == "child":
    subprocess.Popen([sys.executable, __file__, "grandchild"])
note(f"ready {os.getpgid(0)}")
while True:
    time.sleep(0.1)
"""

DRIVER = """
import os, sys
sys.path.insert(0, os.environ["BENCHMARKS"])
import gpu_check
gpu_check.GRACE_S = float(os.environ["GRACE_S"])
gpu_check.train_command = lambda args, data, project: [sys.executable, os.environ["CHILD"], "child"]
sys.exit(gpu_check.main())
"""


def start_driver(tmp_path: Path, *args: str, mode: str = "trap", grace_s: float = 10) -> subprocess.Popen:
    """gpu_check's main() with the train stage's command replaced by CHILD: `train --device cpu ARGS`."""
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "BENCHMARKS": str(ROOT / "benchmarks"), "CHILD": str(tmp_path / "child.py")}
    env.update(MARKS=str(tmp_path / "marks"), CHILD_MODE=mode, GRACE_S=str(grace_s), OUT=str(tmp_path / "out"))
    env.update(PYSEG_DEVICE_DIR=str(tmp_path / "device"), PYSEG_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, str(tmp_path / "driver.py"), "train", "--device", "cpu", "--data", "shapes-seg.yaml"]
    command += ["--runs", str(tmp_path / "runs"), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def marks(tmp_path: Path) -> list[str]:
    path = tmp_path / "marks"
    return path.read_text().splitlines() if path.is_file() else []


def child_group(tmp_path: Path) -> int:
    return int(next(line for line in marks(tmp_path) if line.startswith("child ready")).split()[-1])


@pytest.mark.parametrize("mode", ["trap", "ignore"])
def test_a_command_out_of_time_gets_sigint_then_sigkill_and_the_json_says_so(tmp_path, mode):
    driver = start_driver(tmp_path, "--train-timeout", "4", mode=mode, grace_s=2)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 1, stdout + stderr
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["error"].startswith("python -m pyseg.train was stopped after 4 s (--train-timeout 4 s"), result
    assert [timeout["after_s"] for timeout in result["timeouts"]] == [4.0]
    got = sorted(line for line in marks(tmp_path) if line.endswith("got SIGINT"))
    assert got == ([] if mode == "ignore" else ["child got SIGINT", "grandchild got SIGINT"]), marks(tmp_path)
    assert process_group_members(child_group(tmp_path)) == []  # SIGKILL took what SIGINT left
    assert "[gpu_check] stopped after 4 s" in (tmp_path / "out" / "train.log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_call_stops_its_command_writes_the_json_and_exits_130(tmp_path, signum):
    driver = start_driver(tmp_path, "--train-timeout", "120")
    deadline = time.monotonic() + 90
    while sum(line.startswith(("child ready", "grandchild ready")) for line in marks(tmp_path)) < 2:
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.1)
    driver.send_signal(signum)
    stdout, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stdout + stderr
    assert stderr.splitlines()[-1] == "gpu_check: interrupted" and "Traceback" not in stderr, stderr
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert result["ok"] is False and result["error"] == "interrupted", result
    assert sorted(line for line in marks(tmp_path) if line.endswith("got SIGINT")) == [
        "child got SIGINT",
        "grandchild got SIGINT",
    ]
    assert process_group_members(child_group(tmp_path)) == []
