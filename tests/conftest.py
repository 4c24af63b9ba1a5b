"""Shared fixtures: the needs_cuda mark, the COCO128-Seg location, polygon batches, a tiny shapes-seg."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COCO128_SEG = Path(os.environ.get("PYSEG_COCO128_SEG", SHARED_DATASETS / "coco128-seg"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def use_reference_fallback(monkeypatch) -> None:
    """Makes pyseg.ops behave as if pyseg._C were missing (its warning already given)."""
    monkeypatch.setattr("pyseg._extension._C", None)
    monkeypatch.setattr("pyseg._extension._warned", True)


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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
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


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray of 2 CPUs for this module (never a cluster started elsewhere on the machine)."""
    ray = pytest.importorskip("ray")
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=None)
    yield ray
    ray.shutdown()
