"""Shared fixtures: the needs_cuda mark, the COCO128-Seg location, polygon batches."""

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
