"""GPU checks in stages, each well under the 10 minutes one device command may take; several stages share a call.

    bash benchmarks/gpu_check.sh prepare        # here, with internet: fills .device/ (data, wheels) to carry
    bash benchmarks/gpu_check.sh build-test bench sanitize --budget 420   # there: one build, three stages
    bash benchmarks/gpu_check.sh train --budget 210                       # there, at once: the machine still warm

Stages (each writes its own JSON):
  build-test  pyseg._C built with its CUDA kernels for this GPU (build_info()["cuda"] true, this GPU's sm_XY
              compiled, a CUDA kernel for every op), tests/test_extension.py, then every needs_cuda test of
              tests/ with PYSEG_EXPECT_GPU=1. Which tests those are, pytest says: `--collect-only -m needs_cuda`
              over tests/ (however a test gets the mark: a decorator, or conftest's `device` fixture); the
              stage fails unless every collected test passed (a skip, a deselection or a test file that did
              not collect for another reason than a missing optional module such as Ray all fail it).
  sanitize    `benchmarks/gpu_check.py exercise-ops` (every CUDA op on small, odd-sized inputs, compared with
              its CPU kernel) under compute-sanitizer's memcheck, racecheck, synccheck and initcheck; any error
              reported fails the stage.
  bench       benchmarks/bench_ops.py --gpu: CUDA vs CPU agreement (bit-identical rasterization, assemble_masks
              and mask_loss within tolerance) asserted; GPU timings; assemble_masks' bandwidth over a copy's.
  train       python -m pyseg.train on COCO128-Seg: 10 epochs at 640, batch 16, AMP, on the GPU (which makes
              the ground-truth masks there), MLflow off, validation after epochs 5 and 10 (--val-period: a
              barely trained model keeps up to 300 detections an image, each mask RLE-encoded on the CPU); img/s,
              mask mAP and the AMP it used. Fails unless every epoch is there, the losses are finite and the mask
              loss fell. The run folder goes to --runs (default build/gpu_check/runs: not carried, not fetched).

Each stage writes $OUT/<stage>.json (stage, ok, error, seconds, device name, torch, CUDA, build_info, its
figures, the commands stopped for time) and $OUT/<stage>.log (the output of what it ran), and the call exits 1
when any stage failed; 2 for bad arguments (one line; each stage named gets a JSON saying so); 130 when
interrupted (Ctrl-C or SIGTERM: the running command gets SIGINT, then SIGKILL, and its stage's JSON says
"interrupted"). OUT defaults to benchmarks/out. The first stage that needs it builds pyseg._C from this
working tree when it is missing or was built from other sources, another torch or another arch list
(FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST = this GPU's, MAX_JOBS = all cores; build/pyseg_C.stamp records what it
was built from); the build log stays in .device/build.log, its tail goes into the JSON of the stage that built.

What travels: the device machine gets the working tree, and nothing beside it (no ../shared, no internet). The
device image has Python 3.12 and torch, but not pycocotools (validation's mAP) and no Ray or MLflow (the trainer
needs neither). `prepare` copies COCO128-Seg (images and labels, 7.7 MB) to .device/coco128-seg and downloads
the wheels of DEVICE_WHEELS for CPython 3.12 on x86-64 to .device/wheels; .device/ is git-ignored, so name it in
the device call's `carry` (64 MiB at most: prepare warns above 50). A stage first checks that torch imports and
sees a GPU, then installs those wheels into .device/site (no index, no dependencies): a wheel for another Python
is skipped when its module is importable anyway, else the stage fails naming the Python the wheel needs. It finds
COCO128-Seg at --coco128 DIR (which must hold labels/train2017), else $PYSEG_COCO128_SEG, else
.device/coco128-seg, else ../shared/datasets/coco128-seg.

Time: --budget (default 560 s, at least 60) is what the whole call may take; every command a stage runs is
stopped in time for its JSON to be written (SIGINT to its process group, as Ctrl-C would: pyseg.train stops
and says how to continue; SIGKILL GRACE_S later), and a stage started with too little time left fails saying
so. Set it 30 s below the device call's timeout_s.

`train --device cpu` (with a small --data, --epochs, --imgsz) runs the train stage on a CPU machine, which checks
the stage itself: no build, no AMP; the JSON says device cpu and amp false.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build-test", "sanitize", "bench", "train")
ALONE = {"prepare": "on this machine, before the device calls", "exercise-ops": "under compute-sanitizer"}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# Wheels the device image lacks, for `prepare` to download (pure-Python or cp312 manylinux x86-64 builds).
DEVICE_WHEELS = ("pycocotools==2.0.11",)
DEVICE_PYTHON = "3.12"  # the device image's Python, the one prepare downloads wheels for
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT_MIB = 64  # what a device call carries in all
CARRY_WARN_MIB = 50  # prepare warns when .device holds more
LOG_TAIL = 4000  # characters of a failing command's output kept in the JSON
USAGE_EXIT, INTERRUPTED_EXIT, TIMEOUT_EXIT = 2, 130, 124


class StageError(Exception):
    """A stage found something wrong; the message says what (and where the full log is)."""


class UsageError(Exception):
    """Bad arguments or environment for the call as a whole: one line on stderr, exit 2."""


# The whole call must end inside the device command's limit (600 s): every command a stage runs is stopped in time
# for its JSON to be written, and a stage that finds too little time left fails saying so.
STARTED = time.monotonic()
DEADLINE = {"at": math.inf, "budget": math.inf}
MIN_BUDGET_S = 60.0
MARGIN_S = 20.0  # kept back from every command's time: GRACE_S for it to stop, the rest to write the JSON
GRACE_S = 10.0  # from SIGINT to SIGKILL of a command's process group
TIMEOUTS: list[dict] = []  # the commands of the running stage that were stopped for time (its JSON's "timeouts")


def time_left(wanted: float) -> float:
    """Seconds a command may take now: wanted, or less so that the call ends within --budget."""
    left = DEADLINE["at"] - time.monotonic() - MARGIN_S
    if left < 10:
        raise StageError(f"out of time: the call's --budget of {DEADLINE['budget']:.0f} s is spent")
    return min(wanted, left)


# ------------------------------------------------------------------ paths and environment


def device_dir() -> Path:
    """Where the carried data, wheels and the stages' own small files live: $PYSEG_DEVICE_DIR or .device/."""
    return Path(os.environ.get("PYSEG_DEVICE_DIR", ROOT / ".device")).resolve()


def out_dir(given: str | None) -> Path:
    return Path(given or os.environ.get("OUT") or ROOT / "benchmarks" / "out").resolve()


def has_coco128(folder: str | Path) -> bool:
    return (Path(folder) / "labels" / "train2017").is_dir()


def find_coco128(given: str | None) -> Path | None:
    """COCO128-Seg: --coco128 (only it, when given), else $PYSEG_COCO128_SEG, .device/coco128-seg,
    ../shared/datasets/coco128-seg."""
    if given:
        if not has_coco128(given):
            raise StageError(f"--coco128 {given}: COCO128-Seg not found there (no labels/train2017 folder)")
        return Path(given).resolve()
    candidates = [os.environ.get("PYSEG_COCO128_SEG"), device_dir() / "coco128-seg"]
    candidates.append(ROOT.parent / "shared" / "datasets" / "coco128-seg")
    for candidate in candidates:
        if candidate and has_coco128(candidate):
            return Path(candidate).resolve()
    return None


def put_on_path(path: Path) -> None:
    """path first on this process's sys.path and on the PYTHONPATH of every command it starts."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(path) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(path), *paths])


def wheel_tags(wheel: Path) -> tuple[str, set[str]]:
    """(the wheel's python tag, e.g. "cp312", every interpreter-abi-platform tag its file name allows)."""
    parts = wheel.name.removesuffix(".whl").split("-")
    if len(parts) not in (5, 6):
        return "?", set()
    python, abi, platform_tag = parts[-3:]
    tags = {f"{p}-{a}-{t}" for p in python.split(".") for a in abi.split(".") for t in platform_tag.split(".")}
    return python, tags


def interpreter_tags() -> set[str] | None:
    """Every wheel tag this Python accepts (pip's packaging), or None when neither packaging nor pip is here."""
    try:
        from packaging.tags import sys_tags
    except ImportError:
        try:
            from pip._vendor.packaging.tags import sys_tags
        except ImportError:
            return None
    return {str(tag) for tag in sys_tags()}


def wheel_modules(wheel: Path) -> list[str]:
    """The top-level modules a wheel installs: its top_level.txt, else its distribution name."""
    with contextlib.suppress(OSError, zipfile.BadZipFile):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.count("/") == 1 and name.endswith(".dist-info/top_level.txt"):
                    modules = archive.read(name).decode().split()
                    if modules:
                        return modules
    return [wheel.name.split("-")[0].lower().replace("-", "_")]


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_carried_wheels() -> dict:
    """pip-installs .device/wheels/*.whl into .device/site (no index, no dependencies) and puts that folder on the
    path of this process and of every command it starts. A wheel this Python cannot use is skipped when the modules
    it holds are importable anyway; otherwise StageError names the Python the wheel needs. Returns
    {"installed": [names], "skipped": [why, per wheel]}."""
    wheels = sorted((device_dir() / "wheels").glob("*.whl"))
    accepted = interpreter_tags()
    usable, skipped, problems = [], [], []
    this_python = f"{sys.executable} (Python {platform.python_version()}, {sysconfig.get_platform()})"
    for wheel in wheels:
        python, tags = wheel_tags(wheel)
        if accepted is None or tags & accepted:
            usable.append(wheel)
            continue
        modules = wheel_modules(wheel)
        if all(importable(module) for module in modules):
            skipped.append(f"{wheel.name}: built for {python}, not {this_python}; {', '.join(modules)} importable")
        else:
            problems.append(
                f"{wheel.name} is built for {python}, not for {this_python}, which cannot import "
                f"{', '.join(modules)}: run the stages with a Python {DEVICE_PYTHON} (PYTHON=python{DEVICE_PYTHON} "
                f"bash benchmarks/gpu_check.sh ...), or install {', '.join(modules)} into this Python"
            )
    if problems:
        raise StageError("; ".join(problems))
    if usable:
        site = device_dir() / "site"
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, usable)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise StageError(f"installing {', '.join(w.name for w in usable)} failed: {done.stderr[-LOG_TAIL:]}")
        put_on_path(site)
    return {"installed": [wheel.name for wheel in usable], "skipped": skipped}


def environment() -> dict:
    """The machine a stage ran on: GPU, driver, torch, CUDA, Python."""
    import torch

    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "driver": None,
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    return info


# ------------------------------------------------------------------ commands: run, stopped in time or when interrupted


def group_alive(process: subprocess.Popen) -> bool:
    """True while any process of process's group (it leads one: start_new_session) is alive (zombies aside)."""
    process.poll()  # reaps the leader once it exits
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: the leader is all that can be watched
        return process.returncode is None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == process.pid and state != "Z":
            return True
    return False


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to process's whole group (what Ctrl-C sends a terminal's foreground group: pyseg.train and its
    DataLoader workers stop cleanly), up to grace_s seconds for the group to end, then SIGKILL to what is left of
    it. An interrupt while waiting skips the rest of the wait, and is raised again once the group is gone."""
    interrupted = False
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_alive(process):
            time.sleep(0.1)
    except KeyboardInterrupt:
        interrupted = True
    deadline = time.monotonic() + 10
    while group_alive(process) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.1)
    process.wait()
    if interrupted:
        raise KeyboardInterrupt


def run_logged(command: list[str], log, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Runs command in its own process group, its output appended to log (and returned). After timeout seconds,
    or when this process is interrupted (Ctrl-C, SIGTERM), the group is stopped (stop_process_group). Returns
    (exit code, output): TIMEOUT_EXIT (124) for a timeout, recorded in TIMEOUTS; an interrupt is raised again once
    the command is stopped."""
    log.write(f"\n$ {shlex.join(command)}\n")
    log.flush()
    start = os.path.getsize(log.name)
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True
    )
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.write(f"\n[gpu_check] stopped after {timeout:.0f} s: SIGINT, SIGKILL {GRACE_S:.0f} s later\n")
        log.flush()
        stop_process_group(process, GRACE_S)
        code = TIMEOUT_EXIT
        TIMEOUTS.append({"command": shlex.join(command)[:300], "after_s": round(timeout, 1)})
    except KeyboardInterrupt:
        log.write("\n[gpu_check] interrupted: SIGINT to the command, SIGKILL to what is left of it after ")
        log.write(f"{GRACE_S:.0f} s\n")
        log.flush()
        stop_process_group(process, GRACE_S)
        raise
    log.flush()
    with open(log.name, "rb") as f:
        f.seek(start)
        return code, f.read().decode(errors="replace")


# ------------------------------------------------------------------ the build


def source_digest(arch_list: str) -> str:
    """What a build of pyseg._C depends on: csrc/, setup.py, torch, Python and the arch list."""
    import torch

    digest = hashlib.sha256()
    for path in sorted([ROOT / "setup.py", *(p for p in (ROOT / "csrc").rglob("*") if p.is_file())]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"torch {torch.__version__} python {sys.version} arch {arch_list} cuda".encode())
    return digest.hexdigest()


def built_extension() -> Path:
    return ROOT / "pyseg" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"


def ensure_build() -> dict:
    """Builds pyseg._C with its CUDA kernels for this GPU unless the build in place came from the same sources,
    torch, Python and arch list; then checks what it holds. Returns {built, seconds, arch_list, build_info}."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{major}.{minor}"
    stamp = ROOT / "build" / "pyseg_C.stamp"  # beside the objects, kept by a warm device machine (.device is not)
    digest = source_digest(arch_list)
    built, seconds, tail = False, 0.0, None
    if not (built_extension().is_file() and stamp.is_file() and stamp.read_text() == digest):
        for old in (ROOT / "pyseg").glob("_C*.so"):
            old.unlink()
        stamp.unlink(missing_ok=True)
        env = {**os.environ, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch_list}
        env["MAX_JOBS"] = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 4)
        print(f"[gpu_check] building pyseg._C (CUDA, TORCH_CUDA_ARCH_LIST={arch_list}, MAX_JOBS={env['MAX_JOBS']})")
        start = time.perf_counter()
        with open(device_dir() / "build.log", "w") as log:
            code, output = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, time_left(480), env)
        seconds = time.perf_counter() - start
        tail = output[-LOG_TAIL:]
        if code != 0:
            raise StageError(f"building pyseg._C failed (exit {code}, {device_dir() / 'build.log'}): {tail}")
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(digest)
        built = True
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # test_extension checks the build holds these archs
    info = check_build(f"sm_{major}{minor}")
    return {"built": built, "seconds": round(seconds, 1), "arch_list": arch_list, "build_info": info, "log": tail}


def check_build(arch: str) -> dict:
    """build_info() of the pyseg._C in place; StageError unless it loaded with CUDA kernels for arch and every op."""
    import torch

    import pyseg.ops as ops
    from pyseg._extension import registered_ops

    info = ops.build_info()
    if not ops.has_ops():
        raise StageError(f"pyseg._C did not load: {info['error']}")
    if not registered_ops():
        raise StageError("pyseg._C registers no op")
    if info["cuda"] is not True:
        raise StageError(f"pyseg._C holds no CUDA kernels: build_info() = {info}")
    if arch not in info["cuda_archs"]:
        raise StageError(f"pyseg._C was compiled for {info['cuda_archs']}, not for this GPU ({arch})")
    missing = [
        op for op in registered_ops() if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", "CUDA")
    ]
    if missing:
        raise StageError(f"pyseg._C registers no CUDA kernel for {', '.join(missing)}")
    return info


def require_torch():
    """torch, or StageError saying that this Python cannot import it."""
    try:
        import torch
    except ImportError as error:
        raise StageError(f"torch cannot be imported by {sys.executable}: {error}") from error
    return torch


def require_gpu() -> None:
    torch = require_torch()
    if not torch.cuda.is_available():
        raise StageError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")


# ------------------------------------------------------------------ stage (a): build + tests


def junit_counts(path: Path) -> dict:
    """tests, passed, failed, errors, skipped and the names of the failed and skipped tests of a JUnit XML."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": [], "skipped_tests": []}
    if not path.is_file():
        return counts
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        counts["tests"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            kind = "failed" if case.find("failure") is not None else "errors"
            counts[kind] += 1
            element = case.find("failure") if kind == "failed" else case.find("error")
            counts["failed_tests"].append(f"{name}: {(element.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skipped_tests"].append(f"{name}: {(case.find('skipped').get('message') or '')[:300]}")
        else:
            counts["passed"] += 1
    return counts


def junit_passed(path: Path) -> set[str]:
    """The tests of a JUnit XML that passed, as classname::name (see junit_name)."""
    if not path.is_file():
        return set()
    return {
        f"{case.get('classname')}::{case.get('name')}"
        for case in ElementTree.parse(path).getroot().iter("testcase")
        if all(case.find(kind) is None for kind in ("failure", "error", "skipped"))
    }


def not_passed(collected: list[str], report: Path) -> list[str]:
    """The collected tests (pytest node ids) that did not pass in the JUnit XML report: failed, skipped, or missing
    from the run (deselected, or in a file the run did not name)."""
    passed = junit_passed(report)
    return [test for test in collected if junit_name(test) not in passed]


def junit_name(nodeid: str) -> str:
    """A pytest node id as pytest's JUnit XML names its test: tests/test_a.py::Case::test_x[p] is
    tests.test_a.Case::test_x[p] (classname::name)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    return ".".join(names[:-1]) + "::" + names[-1] + bracket + params


# A pytest plugin (`-p gpu_check`, benchmarks/ on PYTHONPATH): what a collection selected, and the test files that
# did not collect and why, written as JSON to $GPU_CHECK_COLLECTION_JSON.
COLLECTION_JSON_ENV = "GPU_CHECK_COLLECTION_JSON"
_not_collected: dict[str, str] = {}


def pytest_collectreport(report) -> None:
    """pytest hook: a test file (or folder) that failed or skipped at collection, with the reason."""
    if not os.environ.get(COLLECTION_JSON_ENV) or not report.nodeid or not (report.failed or report.skipped):
        return
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    else:
        lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
        errors = [line[1:].strip() for line in lines if line.startswith("E ")]
        reason = errors[-1] if errors else (lines[-1] if lines else "no reason given")
    _not_collected[report.nodeid] = ("skipped: " if report.skipped else "") + reason


def pytest_collection_finish(session) -> None:
    """pytest hook: writes what the collection selected (after -m) and what did not collect."""
    target = os.environ.get(COLLECTION_JSON_ENV)
    if target:
        selected = [item.nodeid for item in session.items]
        Path(target).write_text(json.dumps({"selected": selected, "not_collected": _not_collected}, indent=1))


def may_have_needs_cuda_tests(path: Path) -> bool:
    """Whether a test file's text suggests needs_cuda tests: the mark's name, or a test taking conftest's `device`
    fixture (its cuda case carries the mark). Asked only of files that did not collect."""
    text = path.read_text(errors="replace")
    return "needs_cuda" in text or re.search(r"def test_\w*\([^)]*\bdevice\b", text) is not None


# Modules a test file may lack on the device machine without hiding a needs_cuda test (the file says so at import).
PROJECT_MODULES = ("pyseg", "tests", "torch", "numpy", "pytest")


def needs_cuda_collection(log, timeout: float, env: dict, report: Path) -> dict:
    """What `pytest --collect-only -m needs_cuda tests/` selects here (test_extension.py aside: build-test runs all
    of it), however a test gets the mark: {"tests": node ids, "files", "not_collected": {file: why}, "problems"}.
    A test file that did not collect is a problem unless it lacks an optional module (Ray, MLflow, moto: the device
    has none) and its text shows no sign of needs_cuda tests."""
    env = {**env, COLLECTION_JSON_ENV: str(report)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), env.get("PYTHONPATH")]))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "gpu_check"]
    command += ["-m", "needs_cuda", "--continue-on-collection-errors", "--ignore=tests/test_extension.py", "tests"]
    code, output = run_logged(command, log, timeout, env)
    if not report.is_file():
        raise StageError(f"pytest --collect-only -m needs_cuda listed nothing (exit {code}): {output[-LOG_TAIL:]}")
    found = json.loads(report.read_text())
    tests = found["selected"]
    return {
        "tests": tests,
        "files": sorted({test.split("::")[0] for test in tests}),
        "not_collected": found["not_collected"],
        "problems": collection_problems(found["not_collected"]),
    }


def collection_problems(not_collected: dict[str, str], root: Path = ROOT) -> list[str]:
    """The test files (paths relative to root) that did not collect, other than those that lack an optional module
    and show no sign of needs_cuda tests: each may hide needs_cuda tests, so each fails build-test."""
    problems = []
    for file, why in not_collected.items():
        missing = re.search(r"No module named '([\w.]+)'", why)
        optional = missing is not None and missing.group(1).split(".")[0] not in PROJECT_MODULES
        if not optional or not (root / file).is_file() or may_have_needs_cuda_tests(root / file):
            problems.append(f"{file} did not collect ({why[:300]})")
    return problems


def stage_build_test(args, log) -> dict:
    coco128 = find_coco128(args.coco128)
    if coco128 is None:
        raise StageError(
            "COCO128-Seg not found (its needs_cuda tests would fail): run `bash benchmarks/gpu_check.sh prepare` "
            "here and carry .device, or pass --coco128 DIR"
        )
    env = {**os.environ, "PYSEG_EXPECT_GPU": "1", "PYSEG_EXPECT_CUDA_BUILD": "1", "PYSEG_COCO128_SEG": str(coco128)}
    env["PYSEG_CACHE_DIR"] = str(cache_dir())
    collection = needs_cuda_collection(log, time_left(120), env, device_dir() / "tmp" / "needs_cuda_collection.json")
    collected = collection["tests"]
    figures = {"coco128": str(coco128), "needs_cuda_files": collection["files"], "needs_cuda_collected": len(collected)}
    figures["not_collected"] = collection["not_collected"]
    problems = list(collection["problems"])
    if not collected:
        raise StageError("pytest collects no needs_cuda test under tests/; " + "; ".join(problems), figures)
    runs = {"extension": ["tests/test_extension.py"], "needs_cuda": ["-m", "needs_cuda", *collection["files"]]}
    for name, selection in runs.items():
        report = device_dir() / "tmp" / f"{name}.xml"
        report.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
        code, _ = run_logged([*command, *selection], log, time_left(args.test_timeout), env)
        counts = junit_counts(report)
        figures[name] = {"exit_code": code, **counts}
        if code == TIMEOUT_EXIT:
            problems.append(f"{name} tests: stopped for time ({TIMEOUTS[-1]['after_s']:.0f} s)")
        elif code != 0 or counts["failed"] or counts["errors"]:
            problems.append(f"{name} tests: exit {code}, {counts['failed']} failed, {counts['errors']} errors")
        if counts["skipped"]:
            problems.append(f"{name} tests: {counts['skipped']} skipped: {'; '.join(counts['skipped_tests'][:5])}")
        if counts["passed"] == 0:
            problems.append(f"{name} tests: none passed")
    # every test the collection selected must have run and passed: one missing from the run fails the stage too
    missing = not_passed(collected, device_dir() / "tmp" / "needs_cuda.xml")
    figures["needs_cuda"]["not_passed"] = missing[:50]
    if missing:
        problems.append(
            f"needs_cuda tests: {len(missing)} of the {len(collected)} that pytest collects did not pass "
            f"(failed, skipped or not run): {', '.join(missing[:5])}"
        )
    print(
        f"[gpu_check] needs_cuda tests: {len(collected)} collected, {figures['needs_cuda']['passed']} passed, "
        f"{figures['needs_cuda']['failed'] + figures['needs_cuda']['errors']} failed, "
        f"{figures['needs_cuda']['skipped']} skipped; test_extension.py: {figures['extension']['passed']} passed"
    )
    if problems:
        failed = figures["needs_cuda"]["failed_tests"] + figures["extension"]["failed_tests"]
        raise StageError("; ".join(problems) + (f"; failing: {'; '.join(failed[:5])}" if failed else ""), figures)
    return figures


# ------------------------------------------------------------------ stage (b): compute-sanitizer


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for home in filter(None, homes):
        for candidate in (
            Path(home) / "bin" / "compute-sanitizer",
            Path(home) / "compute-sanitizer" / "compute-sanitizer",
        ):
            if candidate.is_file():
                return str(candidate)
    return None


def sanitizer_summary(tool: str, output: str) -> tuple[int | None, int | None]:
    """(errors, warnings) of a compute-sanitizer run's last summary line; None where it printed none (it died).

    racecheck prints "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)", the others "ERROR SUMMARY: E
    errors". Warnings (racecheck's possible hazards) are recorded, errors fail the stage.
    """
    if tool == "racecheck":
        found = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
        return (int(found[-1][0]), int(found[-1][1])) if found else (None, None)
    found = re.findall(r"ERROR SUMMARY: (\d+) errors?", output)
    return (int(found[-1]), None) if found else (None, None)


def stage_sanitize(args, log) -> dict:
    sanitizer = find_sanitizer()
    if sanitizer is None:
        raise StageError("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")
    # Without the caching allocator every tensor is an allocation of its own: memcheck sees an access past a tensor's
    # end, initcheck a read of bytes nothing wrote.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    figures, problems = {"sanitizer": sanitizer, "tools": {}}, []
    for tool in args.tools:
        start = time.perf_counter()
        command = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "50"]
        command += shlex.split(args.sanitizer_args)
        command += [sys.executable, str(Path(__file__).resolve()), "exercise-ops"]
        code, output = run_logged(command, log, time_left(args.sanitizer_timeout), env)
        errors, warnings = sanitizer_summary(tool, output)
        agreed = "exercise-ops: every CUDA op agrees with its CPU kernel" in output
        figures["tools"][tool] = {
            "exit_code": code,
            "errors": errors,
            "warnings": warnings,
            "ops_agree": agreed,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(
            f"[gpu_check] compute-sanitizer --tool {tool}: exit {code}, {errors} errors"
            + (f", {warnings} warnings" if warnings is not None else "")
            + f", ops agree: {agreed}"
        )
        if code != 0 or errors != 0 or not agreed:
            problems.append(f"{tool}: exit {code}, {errors} errors reported, ops agree: {agreed}")
    if problems:
        raise StageError("; ".join(problems) + " (see sanitize.log)", figures)
    return figures


def exercise_ops() -> int:
    """Every CUDA op once or twice on small, odd-sized inputs (edges, empty, non-contiguous, bf16), compared with
    the CPU kernel; what compute-sanitizer runs. Exit 0 when all agree; UsageError without a CUDA device."""
    try:
        import torch
    except ImportError as error:
        raise UsageError(f"exercise-ops: torch cannot be imported by {sys.executable}: {error}") from error
    if not torch.cuda.is_available():
        raise UsageError(
            f"exercise-ops runs the CUDA ops, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
            "CUDA device"
        )
    import numpy as np

    import pyseg.ops as ops

    rng = np.random.default_rng(0)
    problems = []

    def agree(name: str, cpu, gpu, tolerance: float = 0.0) -> None:
        """Each CPU output against the CUDA one: equal (tolerance 0) or within tolerance (absolute and relative)."""
        cpu, gpu = (cpu, gpu) if isinstance(cpu, tuple) else ((cpu,), (gpu,))
        for index, (want, got) in enumerate(zip(cpu, gpu, strict=True)):
            got = got.cpu()
            where = f"{name} output {index}"
            if want.shape != got.shape or want.dtype != got.dtype:
                problems.append(f"{where}: CUDA {tuple(got.shape)} {got.dtype}, CPU {tuple(want.shape)} {want.dtype}")
            elif tolerance == 0.0 and not torch.equal(want, got):
                problems.append(f"{where}: {int((want != got).sum())} elements differ")
            elif tolerance and not torch.allclose(want.double(), got.double(), rtol=tolerance, atol=tolerance):
                problems.append(f"{where}: max |diff| {float((want.double() - got.double()).abs().max()):.3g}")

    # 9 stars (some partly outside the grid), two to a mask, and a self-intersecting polygon: 5 masks in 3 images
    polys, owners = [], []
    for i in range(9):
        n = int(rng.integers(3, 20))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.2, 1.0, n) * rng.uniform(3, 30)
        centre = rng.uniform(-5, 45, 2)
        polys.append(np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1))
        owners.append(i // 2)
    polys.append(rng.uniform(-3, 40, (7, 2)))
    owners.append(4)
    image_index = [0, 0, 1, 1, 2]
    vertices = torch.from_numpy(np.concatenate(polys)).float()
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(p) for p in polys])]), dtype=torch.int64)
    owner = torch.tensor(owners)
    cuda = [vertices.cuda(), offsets.cuda(), owner.cuda()]
    for height, width in ((7, 13), (33, 50)):
        agree(
            f"rasterize_polygons {height}x{width}",
            ops.rasterize_polygons(vertices, offsets, owner, 5, height, width),
            ops.rasterize_polygons(*cuda, 5, height, width),
        )
        index = torch.tensor(image_index)
        agree(
            f"rasterize_polygons_overlap {height}x{width}",
            ops.rasterize_polygons_overlap(vertices, offsets, owner, index, 3, height, width),
            ops.rasterize_polygons_overlap(*cuda, index.cuda(), 3, height, width),
        )
    none = [torch.zeros((0, 2)), torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)]
    agree(
        "rasterize_polygons empty",
        ops.rasterize_polygons(*none, 2, 5, 6),
        ops.rasterize_polygons(*[t.cuda() for t in none], 2, 5, 6),
    )

    generator = torch.Generator().manual_seed(0)
    protos = torch.randn((3, 8, 20, 24), generator=generator)
    coeffs = torch.randn((22, 8), generator=generator)
    instance_image = torch.randint(0, 3, (22,), generator=generator)
    xy = torch.rand((22, 2), generator=generator) * 24 - 2
    boxes = torch.cat([xy, xy + torch.rand((22, 2), generator=generator) * 16], 1)
    boxes[0] = torch.tensor([-5.0, -5.0, 30.0, 30.0])
    boxes[1] = torch.tensor([3.0, 3.0, 3.0, 9.0])
    head = [protos, coeffs, instance_image, boxes]
    head_cuda = [t.cuda() for t in head]
    for out_size in (None, (33, 50)):
        for threshold in (None, 0.5):
            cpu = ops.assemble_masks(*head, out_size, threshold)
            gpu = ops.assemble_masks(*head_cuda, out_size, threshold)
            if threshold is None:
                agree(f"assemble_masks {out_size}", cpu, gpu, 1e-5)
            else:
                decided = (ops.assemble_masks(*head, out_size) - threshold).abs() > 1e-3
                if not torch.equal(cpu[decided], gpu.cpu()[decided]):
                    problems.append(f"assemble_masks {out_size} > {threshold}: thresholded masks differ")
    half = [protos.bfloat16(), coeffs.bfloat16(), instance_image, boxes]
    agree(
        "assemble_masks bf16",
        ops.assemble_masks(*half, (17, 19)),
        ops.assemble_masks(*[t.cuda() for t in half], (17, 19)),
        2e-2,
    )
    strided = [protos, coeffs[::2], instance_image[::2], boxes[::2]]
    agree(
        "assemble_masks strided", ops.assemble_masks(*strided), ops.assemble_masks(*[t.cuda() for t in strided]), 1e-5
    )
    agree(
        "assemble_masks empty",
        ops.assemble_masks(protos, coeffs[:0], instance_image[:0], boxes[:0], (9, 11)),
        ops.assemble_masks(protos.cuda(), coeffs[:0].cuda(), instance_image[:0].cuda(), boxes[:0].cuda(), (9, 11)),
    )

    index_map = torch.randint(0, 6, (3, 20, 24), generator=generator, dtype=torch.int32)
    instance_masks = torch.randint(0, 2, (7, 20, 24), generator=generator, dtype=torch.uint8)
    for kind, targets, gt_index in (
        ("overlap", index_map, torch.randint(1, 6, (22,), generator=generator)),
        ("per-instance", instance_masks, torch.randint(0, 7, (22,), generator=generator)),
    ):
        results = []
        for device in ("cpu", "cuda"):
            p = protos.to(device).requires_grad_()
            c = coeffs.to(device).requires_grad_()
            loss = ops.mask_loss(
                p, c, instance_image.to(device), targets.to(device), gt_index.to(device), boxes.to(device)
            )
            (loss * torch.linspace(0.5, 1.5, loss.numel(), device=device)).sum().backward()
            results.append((loss.detach().cpu(), p.grad.cpu(), c.grad.cpu()))
        agree(f"mask_loss {kind} (loss, grad protos, grad coeffs)", results[0], results[1], 1e-4)
    torch.cuda.synchronize()
    if problems:
        print("exercise-ops: CUDA and CPU kernels disagree:\n  " + "\n  ".join(problems))
        return 1
    print("exercise-ops: every CUDA op agrees with its CPU kernel")
    return 0


# ------------------------------------------------------------------ stage (c): bench_ops --gpu


def stage_bench(args, log) -> dict:
    env = dict(os.environ)
    coco128 = find_coco128(args.coco128)
    if coco128 is not None:
        env["PYSEG_COCO128_SEG"] = str(coco128)
    report = device_dir() / "tmp" / "bench_ops.json"
    report.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--gpu", "--json", str(report)]
    code, output = run_logged(command, log, time_left(args.bench_timeout), env)
    figures = json.loads(report.read_text()) if report.is_file() else {}
    figures["exit_code"] = code
    print(output[-3000:])
    if code != 0 or not figures.get("ok"):
        failed = [name for name, value in figures.get("agreement", {}).items() if not value.get("ok")]
        raise StageError(f"bench_ops.py --gpu exit {code}; disagreeing: {failed or 'none recorded'}", figures)
    return figures


# ------------------------------------------------------------------ stage (d): COCO128-Seg training


def coco128_yaml(coco128: Path, folder: Path) -> Path:
    """A dataset YAML for the COCO128-Seg at coco128: the built-in one's splits and names, this path, no download."""
    import yaml

    builtin = yaml.safe_load((ROOT / "pyseg" / "data" / "builtin" / "coco128-seg.yaml").read_text())
    builtin.pop("download", None)
    builtin["path"] = str(coco128)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "coco128-seg.yaml"
    path.write_text(yaml.safe_dump(builtin, sort_keys=False))
    return path


def train_figures(run_dir: Path, epochs: int) -> dict:
    """img/s, mask and box mAP and the losses of a finished run folder; StageError when the run is incomplete."""
    import csv

    import yaml

    results = run_dir / "results.csv"
    if not results.is_file():
        raise StageError(f"{results} was not written")
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != epochs:
        raise StageError(f"{results} holds {len(rows)} epochs, not {epochs}")

    def number(row: dict, key: str) -> float:
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            return math.nan

    losses = [key for key in rows[0] if key.startswith("train/")]
    rates = [number(row, "images_per_s") for row in rows]
    settings = yaml.safe_load((run_dir / "args.yaml").read_text())
    last = rows[-1]
    figures = {
        "run_dir": str(run_dir),
        "epochs": len(rows),
        "imgsz": settings["imgsz"],
        "batch": settings["batch"],
        "device": settings["device"],
        "images_per_s_median": statistics.median(rates[1:] or rates),  # epoch 1 holds the warm-up
        "images_per_s": rates,
        "train_seconds": round(sum(number(row, "epoch_seconds") for row in rows), 1),
        "mask_map50_95": number(last, "mask/map"),
        "mask_map50": number(last, "mask/map50"),
        "box_map50_95": number(last, "box/map"),
        "validated_epochs": [int(row["epoch"]) for row in rows if math.isfinite(number(row, "mask/map"))],
        "best_mask_map50_95": max(
            (number(row, "mask/map") for row in rows if math.isfinite(number(row, "mask/map"))), default=math.nan
        ),
        "losses_first": {key: number(rows[0], key) for key in losses},
        "losses_last": {key: number(last, key) for key in losses},
    }
    not_finite = [
        f"{key} epoch {row['epoch']}" for row in rows for key in losses if not math.isfinite(number(row, key))
    ]
    if not_finite:
        raise StageError(f"non-finite losses: {', '.join(not_finite[:5])}", figures)
    if not math.isfinite(figures["mask_map50_95"]) or not all(r > 0 for r in rates):
        raise StageError("the last epoch has no mask mAP, or an epoch no images/s", figures)
    # Ten epochs on a GPU must lower the mask loss; a short CPU check of the stage itself (a few optimizer steps on a
    # tiny set) need not, so there only finite losses and a last mAP are asked for.
    if epochs >= 5 and not figures["losses_last"]["train/mask"] < figures["losses_first"]["train/mask"]:
        raise StageError("the mask loss did not fall from the first epoch to the last", figures)
    return figures


def masks_made_on(device: str) -> str:
    """Where pyseg.train makes the ground-truth masks on this --device: "device" (GPU-side) or "loader"."""
    from pyseg.engine.device import masks_made_by_loader, select_device

    return "loader" if masks_made_by_loader(select_device(device)) else "device"


def amp_used(device: str, amp: bool) -> str | bool:
    """The mixed precision pyseg.train uses on this --device with --amp amp: "bf16" or "fp16" on CUDA, False on the
    CPU (pyseg.engine.device.autocast_dtype decides, for the Trainer too)."""
    import torch

    from pyseg.engine.device import autocast_dtype, select_device

    dtype = autocast_dtype(select_device(device), amp)
    return {None: False, torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cache_dir() -> Path:
    """pyseg's cache for what the stages run: $PYSEG_CACHE_DIR, else build/gpu_check/cache (.device is carried: what
    the stages make stays out of it)."""
    return Path(os.environ.get("PYSEG_CACHE_DIR") or ROOT / "build" / "gpu_check" / "cache").resolve()


def train_data(data: str | None, coco128: str | None) -> str:
    """--data for pyseg.train: a path that exists, made absolute; anything else as given (a built-in dataset name
    such as shapes-seg.yaml: pyseg.train resolves it, or says what it accepts); without --data, a dataset YAML for
    the COCO128-Seg that find_coco128 finds."""
    if data:
        return str(Path(data).resolve()) if Path(data).exists() else data
    found = find_coco128(coco128)
    if found is None:
        raise StageError(
            "COCO128-Seg not found: run `bash benchmarks/gpu_check.sh prepare` here and carry .device, or pass "
            "--coco128 DIR or --data YAML"
        )
    return str(coco128_yaml(found, device_dir() / "tmp"))


def train_command(args, data: str, project: Path) -> list[str]:
    """The pyseg.train command of the train stage, its run folder project/train."""
    command = [sys.executable, "-m", "pyseg.train", "--data", data, "--epochs", str(args.epochs)]
    command += ["--imgsz", str(args.imgsz), "--batch", str(args.batch), "--device", args.device, "--amp", "true"]
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    command += ["--workers", str(workers), "--project", str(project)]
    command += ["--val-period", str(args.val_period), "--name", "train", "--no-mlflow"]
    return command


def stage_train(args, log) -> dict:
    data = train_data(args.data, args.coco128)
    project = Path(args.runs).resolve() / time.strftime("%Y%m%d-%H%M%S")
    env = {**os.environ, "PYSEG_CACHE_DIR": str(cache_dir())}
    start = time.perf_counter()
    limit = time_left(args.train_timeout)
    code, output = run_logged(train_command(args, data, project), log, limit, env)
    wall = time.perf_counter() - start
    print("\n".join(line for line in output.splitlines() if not line.startswith("/"))[-3000:])
    if code == TIMEOUT_EXIT:
        raise StageError(
            f"python -m pyseg.train was stopped after {limit:.0f} s (--train-timeout {args.train_timeout:g} s, or "
            f"what --budget left): {output[-LOG_TAIL:]}",
            {"wall_seconds": round(wall, 1), "run_dir": str(project / "train")},
        )
    if code != 0:
        raise StageError(f"python -m pyseg.train exit {code}: {output[-LOG_TAIL:]}", {"wall_seconds": round(wall, 1)})
    figures = train_figures(project / "train", args.epochs)
    figures["wall_seconds"] = round(wall, 1)
    figures["amp"] = amp_used(args.device, True)
    figures["masks_made_on"] = masks_made_on(args.device)
    figures["data"] = data
    figures["ray_installed"] = importable("ray")
    figures["mlflow_installed"] = importable("mlflow")
    print(
        f"[gpu_check] train: {figures['epochs']} epochs at {figures['imgsz']} in {wall:.0f} s, "
        f"{figures['images_per_s_median']:.1f} img/s (median of epochs 2..), mask mAP50-95 "
        f"{figures['mask_map50_95']:.4f}, mAP50 {figures['mask_map50']:.4f}, AMP {figures['amp'] or 'off'}"
    )
    return figures


# ------------------------------------------------------------------ prepare (here, not there)

# The device calls prepare points to (README, "GPU check"): 15 minutes of device time in all, machine start-ups
# included; the first call builds, the second follows at once to find the machine (and the build) still warm.
DEVICE_PLAN = (
    'command "bash benchmarks/gpu_check.sh build-test bench sanitize --budget 420" with timeout_s 450, then at once '
    '"bash benchmarks/gpu_check.sh train --budget 210" with timeout_s 240'
)


def folder_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def prepare(args) -> int:
    """Fills .device/ with what the device lacks: COCO128-Seg and the wheels of DEVICE_WHEELS. Runs here."""
    target = device_dir()
    if not target.is_relative_to(ROOT):
        raise UsageError(
            f"PYSEG_DEVICE_DIR={target} is outside the repository ({ROOT}): a device call carries only paths "
            "inside its working tree; leave PYSEG_DEVICE_DIR unset (.device) or name a git-ignored folder inside"
        )
    source = Path(args.coco128 or os.environ.get("PYSEG_COCO128_SEG") or ROOT.parent / "shared/datasets/coco128-seg")
    if not has_coco128(source):
        raise UsageError(f"prepare: COCO128-Seg not found at {source} (pass --coco128 DIR)")
    target.mkdir(parents=True, exist_ok=True)
    copy = target / "coco128-seg"
    if copy.resolve() != source.resolve():
        shutil.rmtree(copy, ignore_errors=True)
        for part in ("images", "labels"):
            shutil.copytree(source / part, copy / part)
    if not args.no_wheels:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", DEVICE_PYTHON, "--implementation", "cp"]
        for platform_tag in WHEEL_PLATFORMS:
            command += ["--platform", platform_tag]
        command += ["-d", str(target / "wheels"), *DEVICE_WHEELS]
        if subprocess.run(command).returncode != 0:
            print(f"gpu_check prepare: pip download of {', '.join(DEVICE_WHEELS)} failed", file=sys.stderr)
            return 1
    size = folder_mib(target)
    carry = os.path.relpath(target, ROOT)
    if subprocess.run(["git", "check-ignore", "-q", str(target)], cwd=ROOT, capture_output=True).returncode == 0:
        where = "git-ignored: name it in the device call's carry"
    else:
        where = "NOT git-ignored: add it to .gitignore, or it travels as untracked files"
    print(f"{target}: {size:.1f} MiB, {where}")
    if size > CARRY_WARN_MIB:
        largest = sorted(((folder_mib(p), p.name) for p in target.iterdir()), reverse=True)[:3]
        print(
            f"gpu_check prepare: warning: {carry} holds {size:.0f} MiB and a device call carries {CARRY_LIMIT_MIB} MiB "
            f"in all; remove what the device does not need from it (largest: "
            f"{', '.join(f'{name} {mib:.0f} MiB' for mib, name in largest)})",
            file=sys.stderr,
        )
    print(f'device calls: carry ["{carry}"]; {DEVICE_PLAN}')
    return 0


# ------------------------------------------------------------------ main


STAGE_FUNCTIONS = {
    "build-test": stage_build_test,
    "sanitize": stage_sanitize,
    "bench": stage_bench,
    "train": stage_train,
}


def wheels_once(state: dict) -> dict:
    """install_carried_wheels() once per call; its StageError fails every stage that asks."""
    if "wheels" not in state:
        try:
            state["wheels"] = install_carried_wheels()
        except StageError as error:
            state["wheels"] = error
            raise
    if isinstance(state["wheels"], StageError):
        raise state["wheels"]
    return state["wheels"]


def build_once(state: dict) -> dict:
    """ensure_build() once per call: its result (with the build log's tail) for the stage that built, the same less
    the log for the later ones; a failed build fails every stage."""
    if "build" not in state:
        try:
            state["build"] = ensure_build()
        except StageError as error:
            state["build"] = error
            raise
        return state["build"]
    if isinstance(state["build"], StageError):
        raise StageError(f"the build failed (see the first stage's JSON): {state['build']}")
    return {key: value for key, value in state["build"].items() if key != "log"}


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM ignored inside the block (in the main thread): an interrupted call writes its JSON whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def run_stage(stage: str, args, out: Path, state: dict) -> bool:
    """Runs one stage and writes OUT/<stage>.json and OUT/<stage>.log; True when it passed. The stage first checks
    that torch imports and (unless it is `train --device cpu`) sees a GPU, then installs the carried wheels and
    builds. An interrupt (Ctrl-C, SIGTERM) stops what the stage runs, writes its JSON (error "interrupted") and is
    raised again."""
    start = time.perf_counter()
    result = {"stage": stage, "ok": False, "error": None, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    figures, interrupted = {}, False
    TIMEOUTS.clear()
    with open(out / f"{stage}.log", "w") as log:
        try:
            with contextlib.suppress(ImportError):  # require_torch says so when torch is missing
                result["environment"] = environment()
            on_gpu = not (stage == "train" and args.device == "cpu")
            if on_gpu:
                require_gpu()
            else:
                require_torch()
            result["wheels"] = wheels_once(state)
            if on_gpu:
                result["build"] = build_once(state)
                result["build_info"] = result["build"]["build_info"]
            figures = STAGE_FUNCTIONS[stage](args, log)
            result["ok"] = True
        except StageError as error:
            result["error"] = str(error.args[0])
            figures = error.args[1] if len(error.args) > 1 else figures
        except KeyboardInterrupt:
            result["error"] = "interrupted"
            interrupted = True
            log.write("\n[gpu_check] interrupted\n")
        except Exception as error:  # a bug in a stage: recorded, and the next stage still runs
            import traceback

            result["error"] = f"{type(error).__name__}: {error}"
            log.write(traceback.format_exc())
            traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["timeouts"] = list(TIMEOUTS)
    result["figures"] = figures
    with signals_held() if interrupted else contextlib.nullcontext():
        (out / f"{stage}.json").write_text(json.dumps(result, indent=2, default=str))
    verdict = "ok" if result["ok"] else f"FAILED: {str(result['error'])[:2000]}"
    print(f"[gpu_check] {stage}: {verdict} ({result['seconds']} s)")
    if interrupted:
        raise KeyboardInterrupt
    return result["ok"]


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is a UsageError: one line and exit 2, as pyseg.errors.CommandParser answers (no usage dump)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see python benchmarks/gpu_check.py --help)")


def builtin_dataset(name: str) -> bool:
    """True for a dataset name pyseg.train resolves itself (shapes-seg.yaml, coco128-seg.yaml)."""
    from pyseg.data.dataset_config import builtin_yaml

    return builtin_yaml(name) is not None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("stages", nargs="+", metavar="STAGE", help=f"prepare, or one or more of: {', '.join(STAGES)}")
    parser.add_argument("--out", default=None, help="where the JSON and logs go (default $OUT, else benchmarks/out)")
    parser.add_argument("--coco128", default=None, help="COCO128-Seg folder (images/, labels/train2017)")
    parser.add_argument("--data", default=None, help="train: a dataset YAML or built-in name instead of COCO128-Seg")
    parser.add_argument(
        "--runs", default=str(ROOT / "build" / "gpu_check" / "runs"), help="train: where run folders go (not .device)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="train: epochs (default 10)")
    parser.add_argument("--imgsz", type=int, default=640, help="train: image size (default 640)")
    parser.add_argument("--batch", type=int, default=16, help="train: batch (default 16)")
    parser.add_argument(
        "--val-period", type=int, default=5, help="train: validate every N epochs and after the last (default 5)"
    )
    parser.add_argument("--workers", type=int, default=None, help="train: loader workers (default min(8, cores))")
    parser.add_argument(
        "--device", default="0", help="train: --device of pyseg.train (default 0; cpu checks the stage)"
    )
    parser.add_argument("--tools", default=",".join(SANITIZER_TOOLS), help="sanitize: comma-separated tools")
    parser.add_argument("--no-wheels", action="store_true", help="prepare: copy the data only")
    parser.add_argument("--test-timeout", type=float, default=300, help="build-test: seconds per pytest run")
    parser.add_argument("--sanitizer-timeout", type=float, default=150, help="sanitize: seconds per tool")
    parser.add_argument("--bench-timeout", type=float, default=400, help="bench: seconds")
    parser.add_argument("--train-timeout", type=float, default=480, help="train: seconds")
    parser.add_argument(
        "--budget",
        type=float,
        default=560,
        help=f"seconds the whole call may take, at least {MIN_BUDGET_S:.0f} (default 560: a device command's 600)",
    )
    parser.add_argument("--sanitizer-args", default="", help="sanitize: more compute-sanitizer flags (one string)")
    args = parser.parse_args(argv)
    for stage, how in ALONE.items():
        if stage in args.stages and len(args.stages) > 1:
            raise UsageError(f"{stage} runs alone, {how}: `bash benchmarks/gpu_check.sh {stage}`")
    if args.coco128 and not has_coco128(args.coco128):
        raise UsageError(f"--coco128 {args.coco128}: COCO128-Seg not found there (no labels/train2017 folder)")
    if args.stages[0] in ALONE:
        return args
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise UsageError(f"unknown stage {', '.join(unknown)}: prepare, or one or more of {', '.join(STAGES)}")
    repeated = sorted({s for s in args.stages if args.stages.count(s) > 1})
    if repeated:
        raise UsageError(f"stage {', '.join(repeated)} named twice: each stage runs once a call")
    if args.data and not Path(args.data).exists() and not builtin_dataset(args.data):
        raise UsageError(f"--data {args.data}: no such file or folder, and not a built-in dataset name")
    runs = Path(args.runs).resolve()
    if runs == device_dir() or device_dir() in runs.parents:
        raise UsageError(f"--runs {args.runs}: inside {device_dir()}, which a device call carries (64 MiB at most)")
    args.tools = [t for t in args.tools.split(",") if t]
    if not args.tools or any(t not in SANITIZER_TOOLS for t in args.tools):
        raise UsageError(f"--tools: a comma-separated subset of {','.join(SANITIZER_TOOLS)}")
    if not (math.isfinite(args.budget) and args.budget >= MIN_BUDGET_S):
        raise UsageError(
            f"--budget {args.budget:g}: at least {MIN_BUDGET_S:.0f} s; it is what the whole call may take: pass the "
            "device call's timeout_s less 30 (the default, 560, goes with timeout_s 600)"
        )
    for flag, value, least in (
        ("--epochs", args.epochs, 1),
        ("--imgsz", args.imgsz, 32),
        ("--batch", args.batch, 1),
        ("--val-period", args.val_period, 1),
        ("--workers", 0 if args.workers is None else args.workers, 0),
    ):
        if value < least:
            raise UsageError(f"{flag} {value}: at least {least}")
    for flag, value in (
        ("--test-timeout", args.test_timeout),
        ("--sanitizer-timeout", args.sanitizer_timeout),
        ("--bench-timeout", args.bench_timeout),
        ("--train-timeout", args.train_timeout),
    ):
        if not value > 0:
            raise UsageError(f"{flag} {value:g}: seconds, more than 0")
    out = out_dir(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{f'--out {args.out}' if args.out else f'OUT={out}'}: a file, not a folder")
    return args


def record_usage_error(argv: list[str], message: str) -> None:
    """A JSON per stage that argv names, saying the call stopped at its arguments, where --out (or $OUT) is a
    folder that can be made."""
    named = [token for token in dict.fromkeys(argv) if token in STAGES]
    given = None
    for index, token in enumerate(argv):
        if token == "--out" and index + 1 < len(argv):
            given = argv[index + 1]
        elif token.startswith("--out="):
            given = token.split("=", 1)[1]
    if not named:
        return
    result = {"ok": False, "error": f"argument error: {message}", "seconds": 0.0, "timeouts": [], "figures": {}}
    with contextlib.suppress(OSError):
        out = out_dir(given)
        out.mkdir(parents=True, exist_ok=True)
        for stage in named:
            (out / f"{stage}.json").write_text(json.dumps({"stage": stage, **result}, indent=2))


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_call(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.stages == ["prepare"]:
        return prepare(args)
    put_on_path(ROOT)
    if args.stages == ["exercise-ops"]:
        return exercise_ops()
    out = out_dir(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot make that folder ({error.strerror})") from error
    (device_dir() / "tmp").mkdir(parents=True, exist_ok=True)
    DEADLINE.update(at=STARTED + args.budget, budget=args.budget)
    state: dict = {}
    passed = [run_stage(stage, args, out, state) for stage in args.stages]
    print(f"[gpu_check] {sum(passed)} of {len(passed)} stages passed; JSON in {out}")
    return 0 if all(passed) else 1


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every stage passed, 1 when one failed, 2 for bad arguments, 130 when interrupted (Ctrl-C or
    SIGTERM: the running command is stopped and its stage's JSON says so)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = None
    if threading.current_thread() is threading.main_thread():
        saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        if saved[signal.SIGINT] is signal.SIG_IGN:  # started in the background of a script: kill -INT still stops it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return run_call(argv)
    except UsageError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        record_usage_error(argv, str(error))
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("\ngpu_check: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        for number, handler in (saved or {}).items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
