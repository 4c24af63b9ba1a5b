"""Shared fixtures: the needs_cuda mark, the per-device op fixture and its oracle, the COCO128-Seg location, polygon
batches, a tiny shapes-seg."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COCO128_SEG = Path(os.environ.get("PYSEG_COCO128_SEG", SHARED_DATASETS / "coco128-seg"))


MLFLOW_LOCKS = "db_init_lock-*"  # MLflow's lock files of new SQLite stores, in the temp folder
MULTIPROCESSING_FOLDERS = "pymp-*"  # multiprocessing's folders (a DataLoader's resource sharer), in the temp folder
_locks_before: set[Path] = set()
_pymp_before: set[Path] = set()


def pytest_configure(config):
    """Every Ray the suite starts (local ray.init, `ray start`, jobs) authenticates with a token of this test session,
    taken from the environment: without one, a local Ray writes a new token to ~/.ray/auth_token, outside the tests'
    folders. A test that needs its own token sets RAY_AUTH_TOKEN_PATH and removes this variable."""
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    _locks_before.update(Path(tempfile.gettempdir()).glob(MLFLOW_LOCKS))
    _pymp_before.update(Path(tempfile.gettempdir()).glob(MULTIPROCESSING_FOLDERS))


def pytest_unconfigure(config):
    """Removes the lock files MLflow left in the temp folder for the SQLite stores the tests made, and the folders
    that multiprocessing made for processes the tests killed (each holds only the dead process's listener socket).
    Under pytest-xdist only the controlling process does, once every worker process has ended (a worker that ends
    first would remove the locks of another's tests still running)."""
    if hasattr(config, "workerinput"):  # an xdist worker
        return
    for lock in set(Path(tempfile.gettempdir()).glob(MLFLOW_LOCKS)) - _locks_before:
        lock.unlink(missing_ok=True)
    for folder in set(Path(tempfile.gettempdir()).glob(MULTIPROCESSING_FOLDERS)) - _pymp_before:
        if _is_abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _is_abandoned(folder: Path) -> bool:
    """True for a multiprocessing folder that holds listener sockets only, none of which anything listens on."""
    import socket

    entries = list(folder.iterdir()) if folder.is_dir() else []
    for entry in entries:
        if not entry.name.startswith("listener-") or not entry.is_socket():
            return False
        with socket.socket(socket.AF_UNIX) as client:
            try:
                client.connect(str(entry))
            except ConnectionRefusedError:
                continue
            except OSError:
                return False
            return False  # someone listens: a live process's
    return bool(entries)


# PYSEG_EXPECT_GPU=1: this run is on a GPU machine (benchmarks/gpu_check.sh build-test). Every needs_cuda test must
# then run on the CUDA kernels: without a CUDA device, without pyseg._C or without its CUDA kernels each one fails
# (pyseg.ops would run the pure-torch reference on both sides and compare it with itself), and a needs_cuda test
# that skips for any other reason (COCO128-Seg not found, say) fails too.
EXPECT_GPU = os.environ.get("PYSEG_EXPECT_GPU") == "1"


@functools.cache
def gpu_run_problem() -> str | None:
    """Why the needs_cuda tests cannot test the CUDA kernels here, or None when they can."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    import pyseg.ops as ops
    from pyseg._extension import registered_ops

    info = ops.build_info()
    if not ops.has_ops():
        return f"pyseg._C did not load ({info.get('error')})"
    if not info["cuda"]:
        return "pyseg._C was built without its CUDA kernels (build with FORCE_CUDA=1)"
    if not registered_ops():
        return "pyseg._C registers no op"
    missing = [
        op for op in registered_ops() if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", "CUDA")
    ]
    if missing:
        return f"pyseg._C has no CUDA kernel for {', '.join(missing)}"
    return None


# make test runs the modules on 2 processes (pytest-xdist: -n 2 --dist loadfile --no-loadscope-reorder), handing
# out whole modules in collection order as a process runs out of work. The modules that take longest go first, so
# that the two processes end together (longest first: the per-module seconds of a `make test` on 2 cores, most
# first); the others follow in their usual order.
LONGEST_MODULES = (
    "test_search.py",
    "test_distributed.py",
    "test_storage.py",
    "test_node_failure.py",
    "test_mlflow_ui.py",
    "test_trainer.py",
    "test_submit_cluster.py",
    "test_gpu_check.py",
    "test_tracking_load.py",
    "test_cluster.py",
    "test_pbt.py",
    "test_seed_recipe.py",
    "test_ultralytics_import.py",
    "test_tracking.py",
    "test_submit.py",
)


def longest_modules_first(items: list) -> None:
    """Sorts items (in place, stably) so that the modules of LONGEST_MODULES come first, in that order."""
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items):
    longest_modules_first(items)
    if EXPECT_GPU or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if EXPECT_GPU and "needs_cuda" in item.keywords and gpu_run_problem():
        pytest.fail(f"PYSEG_EXPECT_GPU=1, but {gpu_run_problem()}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under PYSEG_EXPECT_GPU=1 a needs_cuda test that skips (a fixture's data not found, say) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if EXPECT_GPU and report.skipped and "needs_cuda" in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"PYSEG_EXPECT_GPU=1: a needs_cuda test must run, but it skipped: {reason}"


def use_reference_fallback(monkeypatch) -> None:
    """Makes pyseg.ops behave as if pyseg._C were missing (its warning already given)."""
    monkeypatch.setattr("pyseg._extension._C", None)
    monkeypatch.setattr("pyseg._extension._warned", True)


# Op tests run once per device; the cuda case is marked needs_cuda (skipped where no CUDA device is).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device an op test runs on: "cpu", then "cuda" where a CUDA device is."""
    return request.param


def to_device(values, device, copy: bool = True):
    """values with every tensor moved to device, copied unless copy is False (so that two runs never share an
    input); tuples, lists and dicts are walked, other values kept."""
    if isinstance(values, torch.Tensor):
        return values.to(device, copy=copy)
    if isinstance(values, tuple | list):
        return type(values)(to_device(v, device, copy) for v in values)
    if isinstance(values, dict):
        return {key: to_device(v, device, copy) for key, v in values.items()}
    return values


def oracle_ops(device):
    """What results computed on device are checked against: on cpu, pyseg.ops.reference (the definitions of the
    ops); on cuda, the CPU kernels (pyseg.ops on CPU tensors). Both have pyseg.ops' function names."""
    import pyseg.ops
    from pyseg.ops import reference

    return reference if torch.device(device).type == "cpu" else pyseg.ops


def got_and_want(device, compute, *args):
    """(got, want) on the CPU: got = compute(pyseg.ops, *args copied to device), want = compute(oracle_ops(device),
    *args copied to the CPU). compute(ops, *args) calls the op(s) through ops and returns tensors (or tuples of
    them); pass keyword arguments that the reference requires (mask_loss's overlap) by keyword."""
    import pyseg.ops

    got = compute(pyseg.ops, *to_device(args, device))
    want = compute(oracle_ops(device), *to_device(args, "cpu"))
    return to_device(detached(got), "cpu", copy=False), to_device(detached(want), "cpu", copy=False)


def detached(values):
    """values with every tensor detached (tuples and lists walked)."""
    if isinstance(values, torch.Tensor):
        return values.detach()
    if isinstance(values, tuple | list):
        return type(values)(detached(v) for v in values)
    return values


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside the block, the previous setting restored afterwards. With it,
    torch.empty fills new memory with NaN (integers: their largest value), so an output element a kernel never
    writes shows up."""
    import torch.utils.deterministic

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(scope="session")
def coco128_labels() -> list[list[tuple[int, np.ndarray]]]:
    """Polygons of every COCO128-Seg label file: per file, (class, Tensor[n, 2] normalized xy) rows."""
    label_dir = COCO128_SEG / "labels" / "train2017"
    if not label_dir.is_dir():
        pytest.skip(f"COCO128-Seg not found at {COCO128_SEG} (set PYSEG_COCO128_SEG)")
    files = []
    for path in sorted(label_dir.glob("*.txt")):
        rows = []
        for line in path.read_text().splitlines():
            values = line.split()
            if len(values) >= 7 and len(values) % 2 == 1:
                rows.append((int(values[0]), np.asarray(values[1:], dtype=np.float32).reshape(-1, 2)))
        files.append(rows)
    return files


def pack_polygons(polygons: list[np.ndarray], owners: list[int] | None = None):
    """(vertices Tensor[V, 2] float32, poly_offsets Tensor[P + 1] int64, poly_to_mask Tensor[P] int64)."""
    owners = list(range(len(polygons))) if owners is None else owners
    lengths = [len(p) for p in polygons]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]) if lengths else [0], dtype=torch.int64)
    vertices = (
        torch.from_numpy(np.concatenate(polygons).astype(np.float32)) if polygons else torch.zeros((0, 2))
    ).reshape(-1, 2)
    return vertices, offsets, torch.tensor(owners, dtype=torch.int64)


def random_polygons(rng: np.random.Generator, height: int, width: int) -> list[np.ndarray]:
    """Polygons of every kind the rasterizer must handle, in pixels."""
    polys = []
    cx, cy = width / 2, height / 2
    for _ in range(6):  # convex and concave (star-like) polygons, some partly outside
        n = int(rng.integers(3, 24))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.2, 1.0, n) * min(height, width) * rng.uniform(0.1, 0.9)
        centre = rng.uniform([-0.2 * width, -0.2 * height], [1.2 * width, 1.2 * height])
        polys.append(np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1))
    for _ in range(3):  # self-intersecting: random vertex order
        polys.append(rng.uniform([-5, -5], [width + 5, height + 5], (int(rng.integers(4, 12)), 2)))
    polys.append(np.array([[cx - 3, cy - 3], [cx + 3, cy + 3], [cx + 6, cy + 6]]))  # collinear: zero area
    polys.append(np.array([[1.0, 1.0], [5.0, 5.0]]))  # fewer than 3 vertices
    polys.append(np.array([[cx, cy], [cx, cy], [cx, cy]]))  # a point
    polys.append(np.array([[cx + 0.1, cy + 0.1], [cx + 0.4, cy + 0.1], [cx + 0.4, cy + 0.45]]))  # sub-pixel
    # Vertices exactly on pixel centres and edges, where the half-open rules decide.
    polys.append(np.array([[0.5, 0.5], [4.5, 0.5], [4.5, 3.5], [0.5, 3.5]]))
    polys.append(np.array([[2.0, 1.0], [6.0, 1.0], [6.0, 5.0], [2.0, 5.0]]))
    polys.append(np.array([[-1e6, -1e6], [1e6, -1e6], [1e6, 1e6]]))  # huge, covers half the grid
    return [p.astype(np.float32) for p in polys]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny shapes-seg (8 train, 4 val images at 96 px); returns its dataset YAML."""
    from pyseg.data.synthetic import SHAPES_CLASSES, generate_shapes_seg

    root = tmp_path_factory.mktemp("data")
    generate_shapes_seg(root / "shapes", train=8, val=4, imgsz=96, seed=1)
    config = root / "shapes.yaml"
    names = "".join(f"\n  {i}: {name}" for i, name in enumerate(SHAPES_CLASSES))
    config.write_text(f"path: shapes\ntrain: images/train\nval: images/val\nnames:{names}\n")
    return config


def tiny_config(data, tmp_path, **overrides):
    """A TrainConfig of a few seconds per epoch on tiny_data (64 px, batch 4, CPU, one thread)."""
    from pyseg.config import make_config

    values = {
        "data": str(data),
        "epochs": 2,
        "imgsz": 64,
        "batch": 4,
        "workers": 0,
        "device": "cpu",
        "project": str(tmp_path / "runs"),
        "name": "tiny",
        "close_mosaic": 1,
        "warmup_epochs": 0.5,
        "threads": 1,
    }
    values.update(overrides)
    return make_config(values)


def free_port() -> int:
    from pyseg.distributed.ray_train import free_local_port

    return free_local_port()


class MlflowServer:
    """An `mlflow server` on 127.0.0.1 with a SQLite store under root; stop() and start() keep its URI."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 90.0) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        # no job runner (huey consumers: MLflow's GenAI jobs), which nothing here uses and which cost CPU at each start
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server on {self.uri} did not answer within {timeout} s")

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def short_temp_dir(prefix: str = "pyseg-test-"):
    """A new folder directly under /tmp, removed afterwards. Ray keeps unix sockets in its temp dir, and a socket
    path must stay under 107 bytes: pytest's tmp_path is too deep for a Ray session folder."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """pyseg's cache (verified labels, generated datasets) in this test's tmp_path; Ray workers inherit it."""
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def short_tmp():
    """A short private folder under /tmp for this test (Ray temp dirs, TMPDIR of subprocesses that start Ray)."""
    with short_temp_dir() as folder:
        yield folder


def python_env(**changes: str | None) -> dict[str, str]:
    """os.environ for a subprocess, with this interpreter's bin first on PATH (the `ray` command) and changes
    applied (None removes a variable)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class RayHead:
    """`ray start --head --block` on 127.0.0.1 in its own process group; stop() ends the whole group.

    token_path: a file to write a fresh token to; the head then requires it (RAY_AUTH_MODE=token).

    temp_dir: Ray's --temp-dir. Leave it None only with TMPDIR set in env to a private folder: the head then keeps
    its session and its ray_current_cluster record there, where a default head keeps them under /tmp/ray.
    """

    def __init__(
        self,
        log: Path,
        env: dict[str, str],
        temp_dir: Path | None = None,
        num_cpus: int = 2,
        token_path: Path | None = None,
    ):
        if token_path is not None:  # token authentication on, with this token (not the user's ~/.ray/auth_token)
            token_path.write_text(secrets.token_hex(16))
            env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
            env.pop("RAY_AUTH_TOKEN", None)
        if temp_dir is None and not env.get("TMPDIR", "").startswith("/tmp/pyseg-"):
            raise ValueError("a RayHead without temp_dir needs TMPDIR set to a private folder (short_temp_dir)")
        self.port, self.dashboard_port, self.agent_port = free_port(), free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        command = ["ray", "start", "--head", "--block", "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1"]
        command += ["--port", str(self.port), "--dashboard-host", "127.0.0.1"]
        command += ["--dashboard-port", str(self.dashboard_port), "--dashboard-agent-listen-port", str(self.agent_port)]
        if temp_dir is not None:
            command += ["--temp-dir", str(temp_dir)]
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=output, start_new_session=True, env=env)

    def wait_until_up(self, timeout: float = 180.0) -> None:
        """Returns once `ray start` has finished starting (it then blocks, and has recorded its address), the
        dashboard answers (401 without a token counts: it is up) and the head's dashboard agent, which runs
        submitted jobs, listens (on a busy machine it comes up a minute after the dashboard)."""
        import socket
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"ray start --head did not come up: {self.log.read_text()[-3000:]}")
            if "block forever" in self.log.read_text():
                try:
                    urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=1)
                    dashboard_up = True
                except urllib.error.HTTPError:
                    dashboard_up = True
                except OSError:
                    dashboard_up = False
                if dashboard_up:
                    try:
                        socket.create_connection(("127.0.0.1", self.agent_port), timeout=1).close()
                        return
                    except OSError:
                        pass
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to `ray start`, which stops its processes; SIGKILL to whatever of its group is left after 60 s."""
        end_process_group(self.process, grace_s=60, leader_only=True)

    def kill(self) -> None:
        """SIGKILL to the head's whole process group, as when its machine dies or the OOM killer strikes."""
        end_process_group(self.process, grace_s=0)


def kill_process_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Ends a process started with start_new_session=True and everything in its group: SIGTERM, then SIGKILL."""
    end_process_group(process, grace_s)


def end_process_group(process: subprocess.Popen, grace_s: float, leader_only: bool = False) -> None:
    """SIGTERM (to the leader only, or to the whole group), up to grace_s seconds for the group to end, then SIGKILL
    to whatever is left of it."""
    if grace_s > 0 and _group_alive(process):
        send = os.kill if leader_only else os.killpg
        with contextlib.suppress(ProcessLookupError):
            send(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(process):
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _group_alive(process) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.2)


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reaps the leader once it exits
    return bool(process_group_members(process.pid))


def process_group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry))
    return members


@pytest.fixture(scope="module")
def ray_worker_tmpdir():
    """The TMPDIR of local_ray's processes (its workers' tempfile folders): a short private folder."""
    with short_temp_dir("pyseg-ray-") as folder:
        yield folder


@pytest.fixture(scope="module")
def local_ray(ray_worker_tmpdir):
    """A private local Ray of 2 CPUs for this module (never a cluster started elsewhere on the machine): its session,
    its workers' temporary files and Ray's lock files in ray_worker_tmpdir, removed afterwards (nothing under /tmp)."""
    ray = pytest.importorskip("ray")
    tempfile.gettempdir()  # this process's temp dir stays what it is (tempfile caches it at the first call)
    saved = {key: os.environ.get(key) for key in ("TMPDIR", "RAY_TMPDIR")}
    # Ray's processes inherit TMPDIR at start; RAY_TMPDIR also moves what Ray does in this process (lock files)
    os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = str(ray_worker_tmpdir)
    try:
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls; its address goes to
        # every actor, so that a Ray started beside this one (a search of the user's) does not confuse the cleaner.
        from pyseg.distributed.ray_train import local_ray_state_api

        env_vars = {}
        kwargs = local_ray_state_api({"include_dashboard": True, "dashboard_host": "127.0.0.1"}, env_vars)
        ray.init(
            address="local",
            num_cpus=2,
            runtime_env={"env_vars": env_vars},
            _temp_dir=str(ray_worker_tmpdir / "ray"),
            **kwargs,
        )
    finally:
        _restore_env({"TMPDIR": saved["TMPDIR"]})
    try:
        yield ray
    finally:
        ray.shutdown()
        _restore_env(saved)


@contextlib.contextmanager
def ray_cluster(
    head_cpus: int = 1,
    worker_cpus: int = 1,
    worker_gpus: int = 0,
    head_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
):
    """A Ray cluster of two nodes on loopback (ray.cluster_utils.Cluster: a head and a worker node, each a raylet of
    its own), this process connected as its driver; yields the Cluster with .worker_node. Sessions, lock and address
    files stay in a private folder, removed afterwards. The worker node may declare GPUs (Ray schedules on declared
    resources, real or not). head_env and worker_env: environment variables of each node's processes (e.g. a TMPDIR
    of its own, as a machine of its own has)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    with short_temp_dir("pyseg-cluster-") as folder:
        saved = {key: os.environ.get(key) for key in ("TMPDIR", "RAY_TMPDIR")}
        os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = str(folder)
        nodes = None
        try:
            nodes = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": head_cpus,
                    "include_dashboard": True,  # its state API serves Ray Train's placement-group cleaner
                    "dashboard_host": "127.0.0.1",
                    "dashboard_port": None,
                    # each node's agent (it runs Ray Jobs) on a free port, not 52365: a Ray already running on
                    # this machine holds that one, and the node would have no agent
                    "dashboard_agent_listen_port": free_port(),
                    "env_vars": {"PATH": python_env()["PATH"], **(head_env or {})},  # `python` is this one
                    # a removed node is found dead after 3 missed health checks 1 s apart (Ray's defaults: 5 at
                    # 3 s), so the failure tests wait seconds, not half a minute, for Ray to notice
                    "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
                },
            )
            nodes.worker_node = nodes.add_node(
                num_cpus=worker_cpus,
                num_gpus=worker_gpus,
                env_vars={"PATH": python_env()["PATH"], **(worker_env or {})},
                dashboard_agent_listen_port=free_port(),
            )
            env_vars = {"RAY_API_SERVER_ADDRESS": "http://" + nodes.head_node.address_info["webui_url"]}
            # A worker group that cannot be placed whole (a node was removed) is given up after 30 s, not Ray
            # Train's 60 s, before an elastic training goes on with the workers left
            env_vars["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"
            ray.init(address=nodes.address, runtime_env={"env_vars": env_vars})
            yield nodes
        finally:
            ray.shutdown()
            if nodes is not None:
                nodes.shutdown()
            _restore_env(saved)


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def small_filesystem(size: str, read_only: bool = False):
    """A private tmpfs of `size` (e.g. "60m"), read-only when asked, mounted on a fresh folder and removed after;
    skips the test where mounting is not allowed (not root, no CAP_SYS_ADMIN). A full disk and a read-only one are
    real there (root ignores permission bits, so a chmod folder proves nothing)."""
    import subprocess

    folder = Path(tempfile.mkdtemp(prefix="pyseg-fs-"))
    options = f"size={size},mode=0777" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:120]})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def remount_read_only(folder: Path) -> None:
    """Makes a small_filesystem read-only from now on (its files stay)."""
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
