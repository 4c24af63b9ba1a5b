"""Data pipeline: YAML resolution, label verification and cache, augmentation geometry, batches, sharding."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import COCO128_SEG

from pyseg.config import TrainConfig
from pyseg.data import augment
from pyseg.data.dataset import SegDataset
from pyseg.data.dataset_config import DatasetConfigError, resolve_dataset
from pyseg.data.download import DownloadError
from pyseg.data.labels import ImageLabels, load_split, report_problems
from pyseg.data.loader import EpochSampler, SegCollate, build_dataloader
from pyseg.ops import rasterize_polygons

COCO_YAML = COCO128_SEG.parent / "coco128-seg.yaml"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYSEG_DATASETS_DIR", str(tmp_path / "datasets"))


def write_image(path: Path, size=(48, 64), value=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8) if value is None else np.full((*size, 3), value, np.uint8)
    cv2.imwrite(str(path), image)


def make_dataset(root: Path, labels: dict[str, str], extra_files: dict[str, bytes] | None = None) -> Path:
    """A YOLO dataset under root with images/train/<name>.jpg and the given label texts; returns its YAML."""
    for name, text in labels.items():
        write_image(root / "images" / "train" / f"{name}.jpg")
        if text is not None:
            label = root / "labels" / "train" / f"{name}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    for relative, content in (extra_files or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    config = root / "data.yaml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train", "names": ["a", "b"]})
    )
    return config


# ------------------------------------------------------------------ resolution and verification


@pytest.mark.skipif(not COCO_YAML.is_file(), reason="COCO128-Seg not found")
def test_coco128_counts_match_the_files():
    config = resolve_dataset(COCO_YAML)
    assert config.root == COCO128_SEG.resolve() and config.nc == 80
    split = load_split(config.splits["train"], config.nc, "train")
    assert len(split.images) == 128
    assert split.num_backgrounds == 2
    assert split.num_instances == 929
    assert len(split.orphan_labels) == 2
    assert {Path(p).stem for p in split.orphan_labels} == {"000000000656", "000000000659"}
    assert "128 images (2 backgrounds), 929 instances" in split.summary()
    again = load_split(config.splits["train"], config.nc, "train")
    assert again.from_cache and again.num_instances == 929
    assert all(np.array_equal(a.classes, b.classes) for a, b in zip(split.images, again.images, strict=True))


def test_bad_rows_are_dropped_with_file_and_line_and_the_rest_loads(tmp_path):
    good = "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    rows = [
        good,
        "1 nan 0.1 0.5 0.1 0.5 0.5\n",  # 2: NaN
        "0 0.1 0.1 0.5 0.1 0.5\n",  # 3: odd count
        "0 0.1 0.1\n",  # 4: fewer than 3 points (4 values would be a box row)
        "7 0.1 0.1 0.5 0.1 0.5 0.5\n",  # 5: class out of range
        "0 0.1 0.1 3.5 0.1 0.5 0.5\n",  # 6: far outside
        "1 -0.01 0.2 0.6 0.2 0.6 1.01\n",  # 7: slightly outside: clipped, kept
        good,  # 8: duplicate
        "1 0.5 0.5 0.2 0.2\n",  # 9: box row: box-only instance
        "x y z\n",  # 10: not numbers
    ]
    yaml_path = make_dataset(tmp_path / "d", {"one": "".join(rows), "two": good, "three": None})
    config = resolve_dataset(yaml_path)
    split = load_split(config.splits["train"], config.nc, "train")
    messages = {(Path(p.file).name, p.line): p.message for p in split.problems}
    for line, words in [
        (2, "NaN"),
        (3, "odd"),
        (4, "fewer than 3"),
        (5, "class 7"),
        (6, "far outside"),
        (8, "duplicate"),
        (10, "numbers"),
    ]:
        assert words in messages[("one.txt", line)], (line, messages)
    assert split.dropped_rows == 7
    one = next(item for item in split.images if item.image.endswith("one.jpg"))
    assert one.classes.tolist() == [0, 1, 1]
    assert one.polygons[1].min() >= 0.0 and one.polygons[1].max() <= 1.0  # clipped
    assert len(one.polygons[2]) == 0 and one.boxes[2].tolist() == pytest.approx([0.4, 0.4, 0.6, 0.6])
    assert split.num_backgrounds == 1  # "three" has no label file
    assert len(split.images) == 3 and split.skipped_images == 0


def test_corrupt_empty_and_truncated_images(tmp_path):
    good = "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    yaml_path = make_dataset(tmp_path / "d", {"good": good})
    images = tmp_path / "d" / "images" / "train"
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    (images / "empty.jpg").write_bytes(b"")
    write_image(images / "cut.jpg", size=(64, 64))
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    before = (images / "cut.jpg").read_bytes()
    config = resolve_dataset(yaml_path)
    split = load_split(config.splits["train"], config.nc, "train")
    by_file = {(Path(p.file).name, p.action): p.message for p in split.problems}
    assert ("corrupt.jpg", "image skipped") in by_file and ("empty.jpg", "image skipped") in by_file
    assert "truncated" in by_file[("cut.jpg", "read as far as it goes; file left as is")]
    assert split.skipped_images == 2
    assert sorted(Path(i.image).name for i in split.images) == ["cut.jpg", "good.jpg"]
    assert (images / "cut.jpg").read_bytes() == before  # never rewritten
    sample = SegDataset(split.images, 64, None)[0]
    assert sample["image"].shape == (3, 64, 64)


def test_every_problem_is_reported_with_its_file_line_and_what_was_done(tmp_path):
    good = "0 0.1 0.1 0.5 0.1 0.5 0.5\n"
    yaml_path = make_dataset(
        tmp_path / "d",
        {
            "nan": "0 nan 0.1 0.5 0.1 0.5 0.5\n",
            "class": good + "5 0.1 0.1 0.5 0.1 0.5 0.5\n",
            "huge": "0 0.1 0.1 1e30 0.1 0.5 0.5\n",
            "odd": "\n0 0.1 0.1 0.5 0.1 0.5\n",
            "clip": "1 -0.01 0.2 0.6 0.2 0.6 1.01\n",
            "background": None,
            "cut": good,
        },
    )
    images, labels = (tmp_path / "d" / kind / "train" for kind in ("images", "labels"))
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (images / "broken.jpg").write_text("just text\n")
    config = resolve_dataset(yaml_path)
    split = load_split(config.splits["train"], config.nc, "train")
    out = tmp_path / "run" / "data_problems.txt"
    text = report_problems([split], out, shown=3)

    lines = out.read_text().splitlines()
    assert sorted(lines) == sorted(
        [
            f"{labels / 'nan.txt'}:1: NaN or inf coordinate (row dropped)",
            f"{labels / 'class.txt'}:2: class 5 outside 0..1 (row dropped)",
            f"{labels / 'huge.txt'}:1: coordinates far outside 0..1 (from 0.1 to 1e+30) (row dropped)",
            f"{labels / 'odd.txt'}:2: odd number of coordinates (5) (row dropped)",
            f"{labels / 'clip.txt'}:1: coordinates slightly outside 0..1 (from -0.01 to 1.01) (clipped to 0..1)",
            f"{images / 'broken.jpg'}: unreadable image: not an image OpenCV decodes (10 bytes) (image skipped)",
            f"{images / 'cut.jpg'}: truncated JPEG (no end marker) (read as far as it goes; file left as is)",
            f"{images / 'background.jpg'}: no label file {labels / 'background.txt'} (image read as background)",
        ]
    )
    assert text.splitlines() == lines[:3] + [f"... and 5 more (all in {out})"]
    assert report_problems([split], None, shown=8) == "\n".join(lines)  # all shown: no "more" line

    again = load_split(config.splits["train"], config.nc, "val")  # the same files: from the label cache
    assert again.from_cache and again.problems == split.problems
    both = tmp_path / "run" / "both.txt"
    assert report_problems([split, again], both, shown=0) == f"... and 8 more (all in {both})"  # shared: once
    assert both.read_text() == out.read_text()

    clean = make_dataset(tmp_path / "clean", {"a": good})
    clean_split = load_split(resolve_dataset(clean).splits["train"], 2, "train")
    assert clean_split.problems == []
    assert report_problems([clean_split], tmp_path / "run" / "clean.txt") == ""
    assert not (tmp_path / "run" / "clean.txt").exists()


def test_missing_labels_folder_makes_backgrounds(tmp_path):
    yaml_path = make_dataset(tmp_path / "d", {"a": None, "b": None})
    split = load_split(resolve_dataset(yaml_path).splits["train"], 2, "train")
    assert split.num_backgrounds == 2 and split.num_instances == 0


def folder_dataset(root: Path, labels: dict[str, bytes]) -> Path:
    """A bare dataset folder (no YAML): images/train/<name>.jpg with label files of the given bytes."""
    make_dataset(root, {name: None for name in labels})
    (root / "data.yaml").unlink()
    for name, content in labels.items():
        label = root / "labels" / "train" / f"{name}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_bytes(content)
    return root


def test_a_label_file_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    rows = "1 0.1 0.1 0.5 0.1 0.5 0.5\n0 0.6 0.6 0.9 0.6 0.9 0.9\n"
    root = folder_dataset(tmp_path / "d", {"a": b"\xef\xbb\xbf" + rows.encode()})
    config = resolve_dataset(root)
    assert config.nc == 2  # the class of the first row counts
    split = load_split(config.splits["train"], config.nc, "train")
    assert split.num_instances == 2 and not split.problems


def test_a_folder_datasets_class_ids_are_ascii_digits_and_sparse_ids_are_named(tmp_path, capsys):
    """A row starting with '²' ('²'.isdigit() is True, int('²') fails) is a bad row, not a traceback; ids 0 and 99
    imply 100 classes of which 2 are used: said, with the file and line."""
    row = " 0.1 0.1 0.5 0.1 0.5 0.5\n"
    labels = {"a": ("²" + row + "0" + row).encode(), "b": ("0" + row + "99" + row).encode()}
    root = folder_dataset(tmp_path / "d", labels)
    config = resolve_dataset(root)
    assert config.nc == 100
    warning = capsys.readouterr().err
    assert "uses 2 of the 100 class ids" in warning or "use 2 of the 100 class ids" in warning
    assert f"{root / 'labels' / 'train' / 'b.txt'}:2" in warning and "names:" in warning
    split = load_split(config.splits["train"], config.nc, "train")
    assert split.dropped_rows == 1 and any("a.txt" in p.file and p.line == 1 for p in split.problems)


def test_split_without_usable_images_says_why(tmp_path):
    yaml_path = make_dataset(tmp_path / "d", {})
    (tmp_path / "d" / "images" / "train").mkdir(parents=True)
    (tmp_path / "d" / "images" / "train" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of its 1 images could be read"):
        load_split(resolve_dataset(yaml_path).splits["train"], 2, "train")


def test_wrong_yaml_keys_unknown_builtin_and_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("path: x\ntrian: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(DatasetConfigError, match="did you mean 'train'"):
        resolve_dataset(bad)
    with pytest.raises(DatasetConfigError, match="not a built-in dataset"):
        resolve_dataset("coco-nope.yaml")
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DatasetConfigError, match="not valid YAML"):
        resolve_dataset(bad)
    bad.write_text("path: [a, b]\ntrain: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(DatasetConfigError, match=r"`path` must be one folder .* got \['a', 'b'\]; list several"):
        resolve_dataset(bad)
    bad.write_text("train: a\nval: a\nnames: [a]\ndownload: |\n  import os\n  os.system('echo hi')\n")
    with pytest.raises(DatasetConfigError, match="never runs code"):
        resolve_dataset(bad)


def test_download_to_an_unreachable_url_names_the_url_and_folder(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    config = tmp_path / "remote.yaml"
    config.write_text(
        yaml.safe_dump({"path": "remote", "train": "images", "val": "images", "names": ["a"], "download": url})
    )
    with pytest.raises(DownloadError, match=str(port)) as error:
        resolve_dataset(config)
    assert "remote" in str(error.value) and url in str(error.value)


def test_relative_path_resolves_against_the_yaml_then_the_datasets_folder(tmp_path, monkeypatch):
    yaml_path = make_dataset(tmp_path / "d", {"a": "0 0.1 0.1 0.5 0.1 0.5 0.5\n"})
    assert resolve_dataset(yaml_path).root == (tmp_path / "d").resolve()
    elsewhere = tmp_path / "yamls" / "x.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("path: d\ntrain: images/train\nval: images/train\nnames: [a, b]\n")
    monkeypatch.setenv("PYSEG_DATASETS_DIR", str(tmp_path))
    assert resolve_dataset(elsewhere).root == (tmp_path / "d").resolve()
    assert resolve_dataset(tmp_path / "d").root == (tmp_path / "d").resolve()  # a dataset folder


# ------------------------------------------------------------------ augmentation geometry


def square_dataset(size=200, square=(60, 50, 140, 130)) -> SegDataset:
    """One synthetic image: a white square on black, labelled exactly."""
    x0, y0, x1, y1 = square
    item = ImageLabels(
        "<memory>",
        size,
        size,
        np.array([0]),
        np.array([[x0, y0, x1, y1]], np.float32) / size,
        [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32) / size],
    )
    dataset = SegDataset(
        [item],
        160,
        TrainConfig(
            degrees=30,
            translate=0.1,
            scale=0.3,
            shear=10,
            perspective=0.0005,
            mosaic=0.0,
            fliplr=0.5,
            flipud=0.5,
            hsv_h=0,
            hsv_s=0,
            hsv_v=0,
        ),
    )
    image = np.zeros((size, size, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    dataset._cache = {0: image}
    return dataset


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
@pytest.mark.parametrize("geometry", ["rotate_shear_perspective", "scale_translate"])
def test_transformed_polygons_stay_inside_and_match_the_pixels(mosaic, geometry):
    dataset = square_dataset()
    dataset.hyp.mosaic = mosaic
    if geometry == "scale_translate":  # the snapped cv2.resize path
        dataset.hyp.degrees = dataset.hyp.shear = dataset.hyp.perspective = 0.0
    dataset.epochs = 100
    for epoch in range(12):
        sample = dataset[(0, epoch)]
        s = dataset.imgsz
        v = sample["vertices"]
        assert bool(((v >= 0) & (v <= s)).all())
        if sample["classes"].numel() == 0:
            continue
        masks = rasterize_polygons(
            v, sample["poly_offsets"], torch.zeros(len(sample["classes"]), dtype=torch.int64), 1, s, s
        )[0].bool()
        white = sample["image"].float().mean(0) > 127
        inter = (masks & white).sum().item()
        assert inter / masks.sum().item() > 0.95, epoch  # labelled pixels are the square's pixels
        if mosaic:  # tiles whose visible part is under 10% of the square are dropped: compare labelled tiles only
            count, components = cv2.connectedComponents(white.numpy().astype(np.uint8))
            labelled = torch.from_numpy(np.isin(components, np.unique(components[masks.numpy()]))) & white
            assert inter / labelled.sum().item() > 0.93, epoch
        else:
            assert inter / (masks | white).sum().item() > 0.93, epoch


def test_close_mosaic_turns_mosaic_off_for_the_last_epochs():
    dataset = square_dataset()
    dataset.hyp.mosaic, dataset.hyp.close_mosaic, dataset.epochs = 1.0, 3, 10
    assert [dataset.mosaic_active(e) for e in range(10)] == [True] * 7 + [False] * 3


def test_clip_polygon_keeps_the_inside_part():
    square = np.array([[-5, -5], [5, -5], [5, 5], [-5, 5]], np.float32)
    clipped, lengths = augment.clip_polygons(square, np.array([4]), (0, 0, 10, 10))
    assert clipped.min() >= 0 and lengths.tolist() == [len(clipped)]
    assert augment.polygon_areas(np.concatenate([square, clipped]), [4, len(clipped)]).tolist() == [100.0, 25.0]


def test_polygon_areas_of_degenerate_polygons_are_exactly_zero():
    rng = np.random.default_rng(0)
    segment = rng.uniform(0, 1e4, (2, 2))
    triangle = np.array([[0.1, 0.2], [4.1, 0.2], [0.1, 3.2]])
    areas = augment.polygon_areas(np.concatenate([segment, triangle, segment[:1]]), [2, 3, 1])
    assert areas.tolist() == [0.0, pytest.approx(6.0), 0.0]
    assert augment.polygon_areas(np.zeros((0, 2)), []).tolist() == []


def test_letterbox_centres_the_scaled_image_and_its_ratio_pad_inverts_it():
    for height, width, size in [(48, 64, 160), (300, 100, 64), (1, 1, 32), (100, 100, 640)]:
        matrix, (r, pad_x, pad_y) = augment.letterbox(height, width, size)
        corners = augment.transform_points(np.array([[0, 0], [width, height]], np.float64), matrix)
        assert np.allclose(corners, [[pad_x, pad_y], [size - pad_x, size - pad_y]], atol=1e-4)
        assert max(corners[1] - corners[0]) == pytest.approx(size)  # the longer side fills the square
        assert min(pad_x, pad_y) == 0 and r == size / max(height, width)
        back = (corners - np.array([pad_x, pad_y])) / r  # image pixel = (square pixel - pad) / r
        assert np.allclose(back, [[0, 0], [width, height]], atol=1e-3)


def test_snapped_warp_draws_exactly_the_transform_it_returns():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), (0, 0), 2)
    for scale, tx, ty in [(0.7, 13.3, -5.2), (1.6, -40.5, 20.25), (0.5, 0.0, 0.0), (1.0, 60.4, 70.6)]:
        requested = augment.translation(tx, ty) @ augment.scaling(scale)
        snapped = np.full((100, 100, 3), 114, np.uint8)
        drawn, visible = augment.warp_into(snapped, image, requested, snap=True)
        corners = np.array([visible[:2], visible[2:]], np.float32)
        edges = augment.transform_points(corners, drawn)
        assert np.allclose(edges, np.round(edges), atol=1e-3)  # whole output pixels
        assert np.abs(edges - augment.transform_points(corners, requested)).max() <= 1.0  # within a pixel
        general = np.full_like(snapped, 114)
        assert augment.warp_into(general, image, drawn, visible) is not None
        (x0, y0), (x1, y1) = np.round(edges).astype(int)
        inner = (slice(y0 + 1, y1 - 1), slice(x0 + 1, x1 - 1))
        assert (snapped != 114).any(2).sum() > 0
        difference = np.abs(snapped[inner].astype(int) - general[inner].astype(int))
        assert difference.max() <= 2, (scale, tx, ty)  # same pixels as a general warp by the returned transform
    assert augment.warp_into(snapped, image, augment.translation(500, 0), snap=True) is None


def test_colour_matrix_keeps_grey_turns_hue_and_scales():
    assert np.allclose(augment.colour_matrix(0.0, 1.0, 1.0), np.eye(3), atol=1e-6)
    grey = np.array([80.0, 80.0, 80.0])
    for hue in (0.1, 1 / 3, -0.2):
        assert np.allclose(augment.colour_matrix(hue, 1.0, 1.0) @ grey, grey, atol=1e-3)
    blue = np.array([255.0, 0.0, 0.0])
    turned = augment.colour_matrix(1 / 3, 1.0, 1.0) @ blue  # a third of a turn carries a primary to another
    assert np.allclose(sorted(turned), [0, 0, 255], atol=1e-3) and not np.allclose(turned, blue)
    pixel = np.array([30.0, 120.0, 200.0])  # B, G, R
    luma = 0.114 * 30 + 0.587 * 120 + 0.299 * 200
    assert np.allclose(augment.colour_matrix(0.0, 0.0, 1.0) @ pixel, luma, atol=1e-3)  # no saturation: grey
    assert np.allclose(augment.colour_matrix(0.0, 1.0, 0.5) @ pixel, pixel / 2, atol=1e-3)
    image = np.full((4, 4, 3), 90, np.uint8)
    augment.hsv_jitter(image, np.random.default_rng(1), 0.5, 0.0, 0.0)  # in place; grey stays grey
    assert np.abs(image.astype(int) - 90).max() <= 1


def test_instances_store_polygons_back_to_back():
    a = np.array([[0, 0], [4, 0], [4, 2]], np.float32)
    b = np.array([[1, 1], [3, 1], [3, 5], [1, 5]], np.float32)
    instances = augment.Instances.from_polygons([0, 1], [a, b], [True, False])
    assert instances.offsets().tolist() == [0, 3, 7]
    assert instances.boxes().tolist() == [[0, 0, 4, 2], [1, 1, 3, 5]]
    second = instances.select([False, True])
    assert np.array_equal(second.points, b) and second.has_mask.tolist() == [False] and second.classes.tolist() == [1]
    both = augment.Instances.concat([second, augment.Instances.empty(), instances])
    assert [len(p) for p in both.polygons] == [4, 3, 4] and both.classes.tolist() == [1, 0, 1]
    flipped = augment.flip_instances(instances, 10, 0)
    assert np.array_equal(flipped.points[:, 0], 10 - instances.points[:, 0])
    assert np.array_equal(flipped.points[:, 1], instances.points[:, 1])
    assert augment.Instances.empty().boxes().shape == (0, 4) and augment.Instances.empty().polygons == []


def test_buffer_keeps_recent_images_decoded_within_its_budget(tmp_path, monkeypatch):
    yaml_path = make_dataset(tmp_path / "d", {f"im{i}": "0 0.1 0.1 0.5 0.1 0.5 0.5\n" for i in range(4)})
    images = load_split(resolve_dataset(yaml_path).splits["train"], 2, "train").images
    one_image = 48 * 64 * 3
    dataset = SegDataset(images, 64, TrainConfig(), epochs=5, buffer_mb=2.5 * one_image / 2**20)
    reads = []
    original_read = SegDataset._read
    monkeypatch.setattr(SegDataset, "_read", lambda self, i: reads.append(i) or original_read(self, i))
    for index in (0, 1, 2, 1, 0):
        dataset.image(index)
    assert reads == [0, 1, 2, 0]  # 1 was still buffered; 0 had made room for 2 (least recently used first)
    assert list(dataset._buffer) == [1, 0] and dataset._buffered_bytes == 2 * one_image
    with pytest.raises(ValueError):
        dataset.image(1)[0, 0, 0] = 7  # buffered images are read-only: augmentation never changes them
    unbuffered = SegDataset(images, 64, TrainConfig(copy_paste=0.5, mixup=0.5), epochs=5)
    buffered = SegDataset(images, 64, TrainConfig(copy_paste=0.5, mixup=0.5), epochs=5, buffer_mb=1.0)
    for key in [(i, e) for e in range(3) for i in range(4)]:  # same samples with or without the buffer
        a, b = unbuffered[key], buffered[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["vertices"], b["vertices"])
    assert len(buffered._buffer) == 4 and len(pickle.loads(pickle.dumps(buffered))._buffer) == 0


def test_mosaic_skips_only_tiles_that_miss_the_output(monkeypatch):
    dataset = square_dataset()
    dataset.hyp.mosaic, dataset.hyp.scale, dataset.epochs = 1.0, 0.5, 100
    loads = []
    original_load = SegDataset.load
    monkeypatch.setattr(SegDataset, "load", lambda self, i: loads.append(i) or original_load(self, i))
    skipping = [dataset[(0, epoch)] for epoch in range(30)]
    skipped_loads = len(loads)
    monkeypatch.setattr(SegDataset, "_lands_in_output", lambda self, *args: True)
    every_tile = [dataset[(0, epoch)] for epoch in range(30)]
    assert skipped_loads < len(loads) - len(skipping)  # some tiles were never decoded...
    for a, b in zip(skipping, every_tile, strict=True):  # ...and none of them would have shown
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["vertices"], b["vertices"])


# ------------------------------------------------------------------ batches and sharding


def test_collate_offsets_image_index_and_masks():
    dataset = square_dataset()
    samples = [dataset[(0, e)] for e in range(4)]
    batch = SegCollate(mask_ratio=4, overlap_mask=True)(samples)
    counts = [s["classes"].numel() for s in samples]
    assert batch["image_index"].tolist() == sum(([i] * c for i, c in enumerate(counts)), [])
    assert batch["poly_offsets"][-1] == batch["vertices"].shape[0]
    assert batch["masks"].shape == (4, 40, 40) and batch["masks"].dtype == torch.int32
    for i, count in enumerate(counts):
        assert int(batch["masks"][i].max()) == count
    per_instance = SegCollate(mask_ratio=4, overlap_mask=False)(samples)["masks"]
    assert per_instance.shape == (sum(counts), 40, 40) and per_instance.dtype == torch.uint8


def test_two_rank_shards_are_disjoint_and_cover_the_dataset():
    for size in (10, 11):
        shards = [[i for i, _ in EpochSampler(size, seed=3, rank=r, world_size=2)] for r in range(2)]
        assert len(shards[0]) == len(shards[1])
        assert set(shards[0]) | set(shards[1]) == set(range(size))
        if size % 2 == 0:
            assert not set(shards[0]) & set(shards[1])
    sampler = EpochSampler(10, seed=3)
    first = [i for i, _ in sampler]
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != first and all(e == 1 for _, e in sampler)


def test_training_loader_streams_across_epochs_and_restarts_when_asked_out_of_order():
    single = square_dataset()
    dataset = SegDataset(single.images * 10, single.imgsz, single.hyp, epochs=10)
    dataset._cache = dict.fromkeys(range(10), single._cache[0])
    streaming = build_dataloader(dataset, 4, workers=2, seed=1)
    reference = build_dataloader(dataset, 4, workers=0, seed=1)
    assert type(streaming).__name__ == "SegLoader" and len(streaming) == len(reference) == 3

    def epoch_batches(loader, epoch, stop=None):
        loader.sampler.set_epoch(epoch)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == stop:
                break
        return out

    # in order, then a jump back, then an epoch left half read and asked again from its start
    for epoch, stop in [(0, None), (1, None), (2, None), (0, None), (4, 1), (4, None), (5, None)]:
        got, want = epoch_batches(streaming, epoch, stop), epoch_batches(reference, epoch, stop)
        assert len(got) == len(want) == (stop or 3)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["vertices"], b["vertices"]), epoch


@pytest.mark.skipif(not COCO_YAML.is_file(), reason="COCO128-Seg not found")
def test_loader_batches_do_not_depend_on_workers():
    config = resolve_dataset(COCO_YAML)
    images = load_split(config.splits["train"], config.nc, "train").images[:12]
    dataset = SegDataset(images, 128, TrainConfig(mixup=0.5, copy_paste=0.5), epochs=5)
    batches = []
    for workers in (0, 2):
        loader = build_dataloader(dataset, 4, workers=workers, seed=1)
        loader.sampler.set_epoch(2)
        batches.append(list(loader))
    assert len(batches[0]) == 3
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["vertices"], b["vertices"])
        assert torch.equal(a["masks"], b["masks"])


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    root = tmp_path / "d"
    yaml_path = make_dataset(root, {"plain": "0 0.1 0.1 0.5 0.1 0.5 0.5\n"})
    pixels = np.zeros((40, 100, 3), np.uint8)  # stored 100 wide, 40 high
    pixels[:, :50] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(root / "images" / "train" / "rotated.jpg", exif=exif.tobytes(), quality=95)
    split = load_split(resolve_dataset(yaml_path).splits["train"], 2, "train")
    rotated = next(item for item in split.images if item.image.endswith("rotated.jpg"))
    assert (rotated.height, rotated.width) == (100, 40)
    decoded, _ = SegDataset([rotated], 100, None).load(0)
    assert decoded.shape[:2] == (100, 40)
    assert decoded[:45].mean() > 200 and decoded[55:].mean() < 50  # the white half is now on top


@pytest.mark.skipif(not COCO_YAML.is_file(), reason="COCO128-Seg not found")
def test_workers_start_after_opencv_ran_threads_in_this_process():
    import subprocess
    import sys

    script = f"""
import cv2, numpy as np
from pyseg.data.dataset_config import resolve_dataset
from pyseg.data.labels import load_split
from pyseg.config import TrainConfig
from pyseg.data.dataset import SegDataset
from pyseg.data.loader import build_dataloader
cv2.setNumThreads(2)
cv2.warpAffine(np.zeros((2000, 2000, 3), np.uint8), np.eye(2, 3), (2000, 2000))  # starts cv2's pool
config = resolve_dataset({str(COCO_YAML)!r})
images = load_split(config.splits["train"], config.nc, "train").images[:8]
batches = list(build_dataloader(SegDataset(images, 96, TrainConfig(), epochs=3), 4, workers=2))
print("batches", len(batches))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "batches 2" in result.stdout, result.stderr[-2000:]


# ------------------------------------------------------------------ box-only instances


def box_only_split(tmp_path):
    """A split of two 64 x 48 images: 'mixed' (polygon, box, polygon rows) and 'boxes' (two box rows), class 0 for
    polygons and 1 for boxes; returns its images in the order [mixed, boxes]."""
    mixed = (
        "0 0.125 0.25 0.375 0.25 0.375 0.75 0.125 0.75\n"  # square: x 8..24, y 12..36 px
        "1 0.625 0.375 0.25 0.25\n"  # box cx cy w h: x 32..48, y 12..24 px
        "0 0.8 0.1 0.95 0.1 0.95 0.4\n"  # triangle: x 51.2..60.8, y 4.8..19.2 px
    )
    boxes = "1 0.5 0.5 1.0 1.0\n1 0.25 0.25 0.25 0.25\n"  # the whole image; x 8..24, y 6..18 px
    yaml_path = make_dataset(tmp_path / "d", {"mixed": mixed, "boxes": boxes})
    split = load_split(resolve_dataset(yaml_path).splits["train"], 2, "train")
    assert split.problems == [] and split.num_instances == 5
    by_name = {Path(item.image).stem: item for item in split.images}
    return [by_name["mixed"], by_name["boxes"]]


def test_box_rows_become_instances_without_masks_from_labels_to_batch(tmp_path):
    mixed, boxes = box_only_split(tmp_path)
    assert mixed.classes.tolist() == [0, 1, 0] and [len(p) for p in mixed.polygons] == [4, 0, 3]
    assert mixed.boxes[1].tolist() == pytest.approx([0.5, 0.25, 0.75, 0.5])
    assert [len(p) for p in boxes.polygons] == [0, 0]

    dataset = SegDataset([mixed, boxes], 64, None)  # letterbox only: 64 x 48 -> r 1, 8 px of padding above
    samples = [dataset[0], dataset[1]]
    assert samples[0]["has_mask"].tolist() == [True, False, True] and samples[1]["has_mask"].tolist() == [False] * 2
    want = torch.tensor([[8, 20, 24, 44], [32, 20, 48, 32], [51.2, 12.8, 60.8, 27.2]])
    assert torch.allclose(samples[0]["boxes"], want, rtol=0, atol=1e-4)
    assert torch.allclose(samples[1]["boxes"], torch.tensor([[0.0, 8, 64, 56], [8, 14, 24, 26]]), rtol=0, atol=1e-4)

    per_instance = SegCollate(mask_ratio=4, overlap_mask=False)(samples)
    assert per_instance["has_mask"].tolist() == [True, False, True, False, False]
    assert per_instance["classes"].tolist() == [0, 1, 0, 1, 1]
    masks = per_instance["masks"]
    assert masks.shape == (5, 16, 16)
    square = torch.zeros((16, 16), dtype=torch.uint8)
    square[5:11, 2:6] = 1  # x 2..6, y 5..11 at mask resolution: centres 2.5..5.5 and 5.5..10.5
    assert torch.equal(masks[0], square)
    triangle = samples[0]["vertices"][samples[0]["poly_offsets"][2] : samples[0]["poly_offsets"][3]] / 4
    expected_triangle = rasterize_polygons(triangle, torch.tensor([0, 3]), torch.tensor([0]), 1, 16, 16)[0]
    assert int(expected_triangle.sum()) > 0 and torch.equal(masks[2], expected_triangle)
    for row in (1, 3, 4):  # box-only: an empty mask, though their boxes cover pixels
        assert int(masks[row].sum()) == 0, row

    overlap = SegCollate(mask_ratio=4, overlap_mask=True)(samples)
    index_map = overlap["masks"]
    assert index_map.shape == (2, 16, 16)
    assert set(index_map[0].unique().tolist()) == {0, 1, 3}  # id 2 (the box row) never drawn
    assert torch.equal((index_map[0] == 1).to(torch.uint8), square)
    assert torch.equal((index_map[0] == 3).to(torch.uint8), expected_triangle)
    assert int(index_map[1].abs().sum()) == 0  # an image of box rows only: all background
    assert overlap["mask_areas"].tolist() == [24, 0, int(expected_triangle.sum()), 0, 0]
    assert torch.equal(overlap["boxes"], per_instance["boxes"])


def test_box_only_instances_stay_maskless_through_augmentation(tmp_path):
    # Polygons are class 0 and boxes class 1: whatever mosaic, mixup, copy-paste and flips do, has_mask must
    # stay "class 0", and no box-only instance may get mask pixels (copy-paste copies masked instances only).
    images = box_only_split(tmp_path)
    hyp = TrainConfig(mosaic=1.0, mixup=0.5, copy_paste=0.5, fliplr=0.5, flipud=0.5, degrees=10, scale=0.3)
    dataset = SegDataset(images * 2, 64, hyp, epochs=20)
    box_only_seen = masked_seen = 0
    for epoch in range(6):
        samples = [dataset[(i, epoch)] for i in range(len(dataset))]
        for overlap in (False, True):
            batch = SegCollate(mask_ratio=4, overlap_mask=overlap)(samples)
            has_mask = batch["has_mask"]
            assert torch.equal(has_mask, batch["classes"] == 0), epoch
            if overlap:
                box_only = ~has_mask
                assert bool((batch["mask_areas"][box_only] == 0).all())
                for image in range(len(samples)):  # ids in the map are 1-based ranks within the image
                    ids = set(batch["masks"][image].unique().tolist()) - {0}
                    mine = has_mask[batch["image_index"] == image]
                    assert all(bool(mine[i - 1]) for i in ids), (epoch, image, ids)
            else:
                assert int(batch["masks"][~has_mask].sum()) == 0
                box_only_seen += int((~has_mask).sum())
                masked_seen += int((batch["masks"][has_mask].flatten(1).sum(1) > 0).sum())
    assert box_only_seen > 10 and masked_seen > 10  # both kinds were really there
