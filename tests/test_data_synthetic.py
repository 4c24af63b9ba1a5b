"""shapes-seg generation: YOLO files, determinism, labels matching pixels, resumability, the YAML."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import pyseg.ops as ops
from pyseg.data import synthetic
from pyseg.data.synthetic import SHAPES_CLASSES, generate_shapes_seg

YAML_PATH = Path(synthetic.__file__).parent / "builtin" / "shapes-seg.yaml"


def read_labels(path: Path) -> list[tuple[int, np.ndarray]]:
    """(class, float64 [n, 2] normalized xy) per row of a YOLO segmentation label file."""
    rows = []
    for line in path.read_text().splitlines():
        values = line.split()
        rows.append((int(values[0]), np.asarray(values[1:], dtype=np.float64).reshape(-1, 2)))
    return rows


def rasterize(polygon_px: np.ndarray, size: int) -> np.ndarray:
    """bool [size, size] mask of one polygon in pixels, by pyseg.ops.rasterize_polygons."""
    vertices = torch.from_numpy(polygon_px.astype(np.float32))
    offsets = torch.tensor([0, len(polygon_px)], dtype=torch.int64)
    return ops.rasterize_polygons(vertices, offsets, torch.zeros(1, dtype=torch.int64), 1, size, size)[0].numpy() > 0


def blur(image: np.ndarray) -> np.ndarray:
    """float32 image smoothed like JPEG smooths the sensor noise, for comparing a JPEG with its source."""
    return cv2.GaussianBlur(image.astype(np.float32), (5, 5), 0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_splits_hold_matching_images_and_valid_label_rows(tmp_path):
    root = generate_shapes_seg(tmp_path / "shapes-seg", train=6, val=2, imgsz=96)
    assert root == tmp_path / "shapes-seg"
    rows = 0
    for split, count in (("train", 6), ("val", 2)):
        images = sorted(p.stem for p in (root / "images" / split).glob("*.jpg"))
        labels = sorted(p.stem for p in (root / "labels" / split).glob("*.txt"))
        assert len(images) == count and images == labels
        for stem in images:
            image = cv2.imread(str(root / "images" / split / f"{stem}.jpg"))
            assert image.shape == (96, 96, 3) and image.dtype == np.uint8
            for line in (root / "labels" / split / f"{stem}.txt").read_text().splitlines():
                values = line.split()
                assert 0 <= int(values[0]) < len(SHAPES_CLASSES)
                coords = np.asarray(values[1:], dtype=np.float64)
                assert len(coords) >= 6 and len(coords) % 2 == 0
                assert coords.min() >= 0.0 and coords.max() <= 1.0
                rows += 1
    assert rows > 0
    marker = json.loads((root / synthetic.MARKER).read_text())
    assert {key: marker[key] for key in ("train", "val", "imgsz", "seed")} == {
        "train": 6,
        "val": 2,
        "imgsz": 96,
        "seed": 0,
    }


def test_generation_is_deterministic_and_depends_on_the_seed(tmp_path):
    first = generate_shapes_seg(tmp_path / "a", train=6, val=2, imgsz=96, seed=3)
    second = generate_shapes_seg(tmp_path / "b", train=6, val=2, imgsz=96, seed=3)
    other = generate_shapes_seg(tmp_path / "c", train=6, val=2, imgsz=96, seed=4)
    for split in ("train", "val"):
        for path in sorted((first / "labels" / split).glob("*.txt")):
            assert path.read_text() == (second / "labels" / split / path.name).read_text()
        for path in sorted((first / "images" / split).glob("*.jpg")):
            assert np.array_equal(cv2.imread(str(path)), cv2.imread(str(second / "images" / split / path.name)))
    a, c = (cv2.imread(str(root / "images" / "train" / "000000.jpg")) for root in (first, other))
    assert not np.array_equal(a, c)


def test_image_does_not_depend_on_how_many_are_generated(tmp_path):
    small = generate_shapes_seg(tmp_path / "small", train=2, val=1, imgsz=96)
    large = generate_shapes_seg(tmp_path / "large", train=6, val=2, imgsz=96)
    for name in ("train/000001", "val/000000"):
        assert (small / "labels" / f"{name}.txt").read_text() == (large / "labels" / f"{name}.txt").read_text()


def test_labels_agree_with_the_pixels(tmp_path):
    imgsz, count = 128, 12
    root = generate_shapes_seg(tmp_path / "shapes-seg", train=count, val=0, imgsz=imgsz, seed=1)
    checked = 0
    for index in range(count):
        image, instances = synthetic._render_image(np.random.default_rng([1, 0, index]), imgsz)
        stem = f"{index:06d}"
        written = cv2.imread(str(root / "images" / "train" / f"{stem}.jpg")).astype(np.float32)
        assert np.abs(blur(written) - blur(image)).mean() < 3.0  # the JPEG is the rendered image
        rows = read_labels(root / "labels" / "train" / f"{stem}.txt")
        assert [c for c, _ in rows] == [inst.class_id for inst in instances]
        for (_, polygon_norm), inst in zip(rows, instances, strict=True):
            assert np.allclose(polygon_norm * imgsz, inst.polygon_px, atol=1e-6 * imgsz + 1e-4)
            if inst.visible_mask.sum() < 200:
                continue
            label_mask = rasterize(polygon_norm * imgsz, imgsz)
            assert iou(label_mask, inst.visible_mask) > 0.9, (index, inst.class_id)
            # What the label covers has the shape's colour, unlike the background just outside it.
            ring = cv2.dilate(label_mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~label_mask
            ring &= ~np.any([other.visible_mask for other in instances], axis=0)
            if ring.sum() >= 20:
                inside = np.median(written[label_mask & inst.visible_mask], axis=0)
                assert np.linalg.norm(inside - np.median(written[ring], axis=0)) > 25.0, (index, inst.class_id)
            checked += 1
    assert checked >= 10


def test_occluded_shapes_are_labelled_by_what_remains_visible():
    imgsz = 96
    touching = 0
    for index in range(60):
        _, instances = synthetic._render_image(np.random.default_rng([0, 0, index]), imgsz)
        for i, inst in enumerate(instances):
            label_mask = rasterize(inst.polygon_px, imgsz)
            grown = cv2.dilate(inst.visible_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            for later in instances[i + 1 :]:
                assert not (inst.visible_mask & later.visible_mask).any()  # each pixel belongs to one instance
                # The earlier label leaves out what the later shape hides (up to its boundary pixels).
                assert (label_mask & later.visible_mask).sum() <= 0.05 * label_mask.sum() + 2
                touching += bool((grown & later.visible_mask).any())
    assert touching >= 5  # some shapes do overlap


def test_shapes_contrast_with_the_background_around_them():
    distances = []
    for index in range(100):
        image, instances = synthetic._render_image(np.random.default_rng([0, 0, index]), 96)
        shapes = np.any([inst.visible_mask for inst in instances], axis=0) if instances else None
        for inst in instances:
            grown = cv2.dilate(inst.visible_mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            ring = grown & ~shapes
            if inst.visible_mask.sum() >= 30 and ring.sum() >= 10:
                inside, outside = np.median(image[inst.visible_mask], 0), np.median(image[ring], 0)
                distances.append(np.linalg.norm(inside.astype(np.float64) - outside))
    assert len(distances) > 100
    assert min(distances) > 100.0  # BGR levels; random colours would give some below 20


def test_bridge_joins_pieces_and_cuts_holes_under_the_even_odd_rule():
    outer = np.array([[2, 2], [30, 2], [30, 30], [2, 30]], dtype=np.float64)
    hole = np.array([[10, 10], [20, 10], [20, 20], [10, 20]], dtype=np.float64)
    apart = np.array([[34, 4], [40, 4], [40, 12], [34, 12]], dtype=np.float64)
    joined = synthetic._bridge(synthetic._bridge(outer, hole), apart)
    expected = (rasterize(outer, 48) & ~rasterize(hole, 48)) | rasterize(apart, 48)
    assert np.array_equal(rasterize(joined, 48), expected)


def test_classes_are_balanced_some_images_are_empty_some_shapes_are_clipped():
    imgsz, count = 64, 200
    classes = np.zeros(len(SHAPES_CLASSES), dtype=int)
    backgrounds = at_border = 0
    for index in range(count):
        _, instances = synthetic._render_image(np.random.default_rng([0, 0, index]), imgsz)
        backgrounds += not instances
        assert len(instances) <= 8
        for inst in instances:
            classes[inst.class_id] += 1
            mask = inst.visible_mask
            at_border += bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert classes.min() > 0.5 * classes.mean()  # every class, roughly balanced
    assert 1 <= backgrounds <= 0.12 * count
    assert at_border > 0.05 * classes.sum()
    assert classes.sum() > 3 * count  # 1-8 shapes per image


def test_second_call_returns_without_rewriting(tmp_path, monkeypatch):
    root = generate_shapes_seg(tmp_path / "shapes-seg", train=6, val=2, imgsz=96)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    rendered = []
    monkeypatch.setattr(synthetic, "_render_image", lambda *args: rendered.append(args) or 1 / 0)
    time.sleep(0.01)
    assert generate_shapes_seg(root, train=6, val=2, imgsz=96) == root
    assert rendered == []  # not one image rendered again
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files


def test_leftovers_of_an_interrupted_run_are_replaced(tmp_path):
    root = tmp_path / "shapes-seg"
    # A half dataset without the marker at root, and an abandoned temporary folder beside it.
    (root / "images" / "train").mkdir(parents=True)
    (root / "images" / "train" / "000000.jpg").write_bytes(b"truncated")
    stale = tmp_path / ".shapes-seg.partial-abc123"
    (stale / "images" / "train").mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * synthetic._STALE_PARTIAL_S,) * 2)
    generate_shapes_seg(root, train=6, val=2, imgsz=96)
    assert cv2.imread(str(root / "images" / "train" / "000000.jpg")) is not None
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 6
    assert len(list((root / "labels" / "val").glob("*.txt"))) == 2
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-seg"]


def test_other_parameters_regenerate_and_foreign_folders_are_refused(tmp_path):
    root = generate_shapes_seg(tmp_path / "shapes-seg", train=2, val=1, imgsz=96)
    generate_shapes_seg(root, train=4, val=1, imgsz=96)
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 4
    assert json.loads((root / synthetic.MARKER).read_text())["train"] == 4
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a shapes-seg dataset"):
        generate_shapes_seg(foreign, train=2, val=1, imgsz=96)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="imgsz"):
        generate_shapes_seg(tmp_path / "x", imgsz=8)
    with pytest.raises(ValueError, match="train"):
        generate_shapes_seg(tmp_path / "x", train=-1)


def test_yaml_describes_the_generated_dataset():
    data = yaml.safe_load(YAML_PATH.read_text())
    assert data["path"] == "shapes-seg" and data["generate"] == "shapes-seg"
    assert (data["train"], data["val"]) == ("images/train", "images/val")
    assert tuple(data["names"][i] for i in sorted(data["names"])) == SHAPES_CLASSES
    assert sorted(data["names"]) == list(range(len(SHAPES_CLASSES)))


@pytest.mark.slow
@pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built (the pure-torch fallback is slow)")
def test_default_generation_writes_128_train_and_32_val_images(tmp_path):
    root = generate_shapes_seg(tmp_path / "shapes-seg")
    for split, count in (("train", 128), ("val", 32)):
        images = sorted(p.stem for p in (root / "images" / split).glob("*.jpg"))
        assert images == sorted(p.stem for p in (root / "labels" / split).glob("*.txt")) and len(images) == count
    assert cv2.imread(str(root / "images" / "val" / "000031.jpg")).shape == (320, 320, 3)
    assert json.loads((root / synthetic.MARKER).read_text())["imgsz"] == 320
