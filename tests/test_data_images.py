"""Image reading (pyseg.data.images): every format and mode through verification, the dataset and predict."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pyseg.config import TrainConfig
from pyseg.data.dataset import SegDataset
from pyseg.data.images import ImageReadError, read_image
from pyseg.data.labels import load_split

LEFT_RGB, RIGHT_RGB = (200, 40, 90), (30, 160, 230)  # the two halves of every test image
ALPHA = 77
H, W = 16, 32  # non-square, so a swapped height and width shows; halves on 8x8 JPEG block borders
LABEL = "0 0.1 0.2 0.4 0.2 0.4 0.8 0.1 0.8\n"  # one polygon inside the left half


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))


def halves(channels: int = 3, dtype=np.uint8, height: int = H, width: int = W) -> np.ndarray:
    """RGB(A) or gray [height, width(, channels)]: LEFT_RGB on the left half, RIGHT_RGB on the right."""
    rgb = np.empty((height, width, 3), np.float64)
    half = (width + 1) // 2  # a 1x1 image is all left
    rgb[:, :half], rgb[:, half:] = LEFT_RGB, RIGHT_RGB
    if channels == 1:
        rgb = rgb.mean(2)
    elif channels == 4:
        rgb = np.concatenate([rgb, np.full((height, width, 1), ALPHA)], 2)
    if dtype == np.uint16:
        return (rgb * 257).astype(np.uint16)
    return rgb.astype(np.uint8)


def gray_of(rgb) -> int:
    return int(np.mean(rgb))


def _write_pil(array: np.ndarray, mode: str | None = None, **options):
    def write(path: Path) -> None:
        image = Image.fromarray(array)
        image = image.convert(mode) if mode else image
        image.save(path, **options)

    return write


def _write_cv2(array_bgr: np.ndarray):
    def write(path: Path) -> None:
        assert cv2.imwrite(str(path), array_bgr)

    return write


def _bgr(rgb_or_rgba: np.ndarray) -> np.ndarray:
    """RGB -> BGR, RGBA -> BGRA (as cv2.imwrite takes them)."""
    return np.ascontiguousarray(rgb_or_rgba[..., [2, 1, 0, 3][: rgb_or_rgba.shape[2]]])


GRAY = (gray_of(LEFT_RGB),) * 3, (gray_of(RIGHT_RGB),) * 3
COLOUR = LEFT_RGB, RIGHT_RGB
JPEG = {"quality": 100, "subsampling": 0}
# name -> (suffix, how the file is written, expected (left RGB, right RGB) after reading, tolerance in levels)
CASES = {
    "jpg-rgb": (".jpg", _write_pil(halves(), **JPEG), COLOUR, 4),
    "jpeg-rgb": (".jpeg", _write_pil(halves(), **JPEG), COLOUR, 4),
    "jpg-gray": (".jpg", _write_pil(halves(1), **JPEG), GRAY, 4),
    "jpg-cmyk": (".jpg", _write_pil(halves(), "CMYK", **JPEG), COLOUR, 8),
    "jpg-1x1": (".jpg", _write_pil(halves(height=1, width=1), **JPEG), (LEFT_RGB, LEFT_RGB), 4),
    "png-rgb": (".png", _write_pil(halves()), COLOUR, 0),
    "png-rgba": (".png", _write_pil(halves(4)), COLOUR, 0),
    "png-gray": (".png", _write_pil(halves(1)), GRAY, 0),
    "png-gray-alpha": (".png", _write_pil(halves(1), "LA"), GRAY, 0),
    "png-palette": (".png", lambda path: Image.fromarray(halves()).quantize(4).save(path), COLOUR, 0),
    "png-16bit-gray": (".png", _write_cv2(halves(1, np.uint16)), GRAY, 1),
    "png-16bit-colour": (".png", _write_cv2(_bgr(halves(3, np.uint16))), COLOUR, 1),
    "png-16bit-rgba": (".png", _write_cv2(_bgr(halves(4, np.uint16))), COLOUR, 1),
    "png-1x1": (".png", _write_pil(halves(height=1, width=1)), (LEFT_RGB, LEFT_RGB), 0),
    "bmp-rgb": (".bmp", _write_pil(halves()), COLOUR, 0),
    "bmp-gray": (".bmp", _write_pil(halves(1)), GRAY, 0),
    "bmp-rgba": (".bmp", _write_cv2(_bgr(halves(4))), COLOUR, 0),
    "bmp-1x1": (".bmp", _write_pil(halves(height=1, width=1)), (LEFT_RGB, LEFT_RGB), 0),
    "tif-rgb": (".tif", _write_pil(halves()), COLOUR, 0),
    "tiff-rgba": (".tiff", _write_pil(halves(4)), COLOUR, 0),
    "tif-gray": (".tif", _write_pil(halves(1)), GRAY, 0),
    "tif-16bit-gray": (".tif", _write_cv2(halves(1, np.uint16)), GRAY, 1),
    "tif-16bit-rgba": (".tif", _write_cv2(_bgr(halves(4, np.uint16))), COLOUR, 1),
    "tif-gray-alpha": (".tif", _write_pil(halves(1), "LA"), GRAY, 0),
    "tiff-16bit-colour": (".tiff", _write_cv2(_bgr(halves(3, np.uint16))), COLOUR, 1),
    "tif-1x1": (".tif", _write_pil(halves(height=1, width=1)), (LEFT_RGB, LEFT_RGB), 0),
    "webp-rgb": (".webp", _write_pil(halves(), lossless=True), COLOUR, 0),
    "webp-rgba": (".webp", _write_pil(halves(4), lossless=True), COLOUR, 0),
    "webp-gray": (".webp", _write_pil(halves(1), lossless=True), GRAY, 0),
    "webp-1x1": (".webp", _write_pil(halves(height=1, width=1), lossless=True), (LEFT_RGB, LEFT_RGB), 0),
}


def dataset_with(root: Path, files: dict, label: str | None = LABEL) -> list[Path]:
    """root/images/<name> written by each writer, with root/labels/<stem>.txt holding `label`."""
    paths = []
    for name, write in files.items():
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        if label is not None:
            (root / "labels").mkdir(exist_ok=True)
            (root / "labels" / f"{path.stem}.txt").write_text(label)
        paths.append(path)
    return paths


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_and_mode_reads_as_8_bit_bgr_through_verification_and_the_dataset(tmp_path, case):
    suffix, write, (left, right), tolerance = CASES[case]
    (path,) = dataset_with(tmp_path / "d", {f"img{suffix}": write})
    with Image.open(path) as written:
        width, height = written.size
    split = load_split([tmp_path / "d" / "images"], 1, "train")
    assert split.skipped_images == 0 and [p for p in split.problems] == []
    (item,) = split.images
    assert (item.height, item.width) == (height, width)
    assert item.classes.tolist() == [0]

    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    assert np.abs(image[height // 2, width // 4].astype(int) - left[::-1]).max() <= tolerance  # BGR
    assert np.abs(image[height // 2, 3 * width // 4].astype(int) - right[::-1]).max() <= tolerance

    size = 64
    sample = SegDataset(split.images, size, None)[0]  # validation: letterbox only
    assert sample["image"].shape == (3, size, size) and sample["orig_size"] == (height, width)
    r, pad_x, pad_y = sample["ratio_pad"]
    centre_y = int(pad_y + height * r / 2)
    # (a 1x1 image at its centre: the exact letterbox blends the outer r/2 output pixels with the grey border)
    for x_source, rgb in ((width / 4, left), (3 * width / 4, right)) if width > 1 else ((0.5, left),):
        pixel = sample["image"][:, centre_y, int(pad_x + x_source * r)].numpy().astype(int)
        assert np.abs(pixel - rgb).max() <= tolerance + 2, (pixel, rgb)  # RGB, bilinear at most 2 off
    assert sample["classes"].tolist() == [0]
    x0, y0, x1, y1 = sample["boxes"][0].tolist()
    assert (x0, x1) == pytest.approx((pad_x + 0.1 * width * r, pad_x + 0.4 * width * r), abs=1e-3)
    assert (y0, y1) == pytest.approx((pad_y + 0.2 * height * r, pad_y + 0.8 * height * r), abs=1e-3)

    training = SegDataset(split.images, size, TrainConfig(), epochs=3)
    for epoch in range(3):
        assert training[(0, epoch)]["image"].shape == (3, size, size)


def exif_image(path: Path, orientation: int) -> None:
    """halves() stored unrotated with EXIF orientation `orientation`, lossless where the format allows."""
    image = Image.fromarray(halves())
    exif = image.getexif()
    exif[0x0112] = orientation
    options = {"jpg": JPEG, "webp": {"lossless": True}}.get(path.suffix[1:], {})
    image.save(path, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_exif_orientation_gives_the_same_size_at_verification_and_decoding(tmp_path, suffix):
    files = {f"o{o}{suffix}": (lambda path, o=o: exif_image(path, o)) for o in range(1, 9)}
    paths = dataset_with(tmp_path / "d", files)
    split = load_split([tmp_path / "d" / "images"], 1, "train")
    assert split.problems == [] and len(split.images) == 8
    by_name = {Path(item.image).name: item for item in split.images}
    for orientation, path in enumerate(paths, start=1):
        with Image.open(path) as stored:
            expected = np.asarray(ImageOps.exif_transpose(stored.convert("RGB")))[:, :, ::-1]  # as displayed, BGR
        item = by_name[path.name]
        assert (item.height, item.width) == expected.shape[:2] == ((W, H) if orientation >= 5 else (H, W))
        decoded = read_image(path)
        assert decoded.shape == expected.shape, orientation
        assert np.abs(decoded.astype(int) - expected).max() <= 4, orientation
        sample = SegDataset([item], 64, None)[0]
        assert sample["orig_size"] == expected.shape[:2]


def test_large_jpeg_is_decoded_at_a_reduced_size_still_oriented(tmp_path):
    path = tmp_path / "big.jpg"
    image = Image.fromarray(np.repeat(np.repeat(halves(), 25, 0), 25, 1))  # 400 high, 800 wide
    exif = image.getexif()
    exif[0x0112] = 6  # displayed 800 high, 400 wide
    image.save(path, exif=exif.tobytes(), quality=95)
    assert read_image(path).shape == (800, 400, 3)
    assert read_image(path, fit_px=100).shape == (100, 50, 3)  # 1/8: longest side 800 / 100
    assert read_image(path, fit_px=300).shape == (400, 200, 3)  # 1/2
    assert read_image(path, fit_px=500).shape == (800, 400, 3)  # less than 2x: full size
    split = load_split([path], 1, "train")
    sample = SegDataset(split.images, 64, None)[0]
    assert sample["orig_size"] == (800, 400) and sample["ratio_pad"] == pytest.approx((0.08, 16.0, 0.0))
    assert sample["image"][:, 10, 32].tolist() == pytest.approx(LEFT_RGB, abs=6)  # the left half is now on top


def test_broken_files_are_skipped_or_read_as_far_as_they_go_each_named(tmp_path):
    images = tmp_path / "d" / "images"
    top_and_noise = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    top_and_noise[:16] = LEFT_RGB  # the noise below makes most of the file, so the cut falls in it
    dataset_with(tmp_path / "d", {"good.png": _write_pil(halves()), "cut.jpg": _write_pil(top_and_noise, **JPEG)})
    cut = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(cut[: len(cut) * 2 // 3])
    (images / "broken.jpg").write_text("this is a text file, not a JPEG\n" * 20)
    (images / "empty.png").write_bytes(b"")
    png = (images / "good.png").read_bytes()
    (images / "cut.png").write_bytes(png[: len(png) // 2])
    (images / "header-only.jpg").write_bytes(cut[:200])
    huge = Image.new("RGB", (64, 64))  # a PNG that claims 100000 x 100000 pixels
    huge.save(images / "huge.png")
    header = bytearray((images / "huge.png").read_bytes())
    header[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width and height (its CRC now fails too)
    (images / "huge.png").write_bytes(bytes(header))
    before = {p.name: p.read_bytes() for p in images.iterdir()}

    split = load_split([images], 1, "train")
    problems = {Path(p.file).name: p for p in split.problems if Path(p.file).parent == images}
    for name in ("broken.jpg", "empty.png", "cut.png", "header-only.jpg", "huge.png"):
        assert problems[name].action == "image skipped" and problems[name].line is None, problems[name]
        assert str(problems[name]).startswith(f"{images / name}: unreadable image")
    assert "truncated JPEG" in problems["cut.jpg"].message and "read as far as it goes" in problems["cut.jpg"].action
    assert "empty" in problems["empty.png"].message
    assert split.skipped_images == 5
    assert sorted(Path(item.image).name for item in split.images) == ["cut.jpg", "good.png"]
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # nothing rewritten
    dataset = SegDataset(split.images, 64, None)
    for index in range(2):
        assert dataset[index]["image"].shape == (3, 64, 64)
    cut_item = next(i for i, item in enumerate(split.images) if item.image.endswith("cut.jpg"))
    top_left = read_image(images / "cut.jpg")[:4, :4]
    assert np.abs(top_left.astype(int) - LEFT_RGB[::-1]).max() <= 4  # the part before the cut is the image
    assert dataset.load(cut_item)[0].shape == (32, 64, 3)  # read at 1/2 size (128 wide for 64), as far as it goes


def test_a_fifo_among_the_images_is_named_and_skipped_not_waited_on(tmp_path):
    """A FIFO named f.jpg: reading it would block forever (no writer). Only regular files are read."""
    import os
    import threading

    dataset_with(tmp_path / "d", {"good.png": _write_pil(halves())})
    images = tmp_path / "d" / "images"
    os.mkfifo(images / "f.jpg")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(split=load_split([images], 1, "train")), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the reader so that the test process can end
        with open(images / "f.jpg", "wb"):
            pass
        pytest.fail("load_split waited on the FIFO")
    split = result["split"]
    problems = {Path(p.file).name: p for p in split.problems}
    assert "not a regular file" in problems["f.jpg"].message and problems["f.jpg"].action == "image skipped"
    assert [Path(item.image).name for item in split.images] == ["good.png"]
    with pytest.raises(ImageReadError, match="f.jpg: not a regular file"):
        read_image(images / "f.jpg")


def test_a_dangling_symlink_is_named_by_itself_and_keeps_its_label(tmp_path):
    """A link to a missing file was named by its target, and its label file then reported as "without image"."""
    dataset_with(tmp_path / "d", {"good.png": _write_pil(halves())})
    images = tmp_path / "d" / "images"
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    labels = images.parent / "labels"
    labels.mkdir(exist_ok=True)
    (labels / "gone.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    split = load_split([images], 1, "train")
    problems = {Path(p.file).name: p for p in split.problems}
    assert "nowhere.jpg" not in problems and "gone.txt" not in problems, problems
    assert (
        "a symbolic link to" in problems["gone.jpg"].message
        and str(tmp_path / "nowhere.jpg") in problems["gone.jpg"].message
    )
    assert problems["gone.jpg"].action == "image skipped"


def test_read_image_names_the_file_it_cannot_read(tmp_path):
    (tmp_path / "broken.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    reasons = {"broken.jpg": "not an image OpenCV decodes", "empty.png": "empty file", "gone.png": "No such file"}
    for name, words in reasons.items():
        with pytest.raises(ImageReadError, match=words) as error:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and isinstance(error.value, OSError)
        copy = pickle.loads(pickle.dumps(error.value))  # travels from a loader worker intact
        assert (copy.path, copy.reason, str(copy)) == (error.value.path, error.value.reason, str(error.value))


def test_predict_reads_images_as_training_does(tmp_path):
    from pyseg.predict import sources

    folder = tmp_path / "in"
    folder.mkdir()
    CASES["png-16bit-colour"][1](folder / "a16.png")
    exif_image(folder / "rotated.jpg", 8)
    CASES["tif-gray"][1](folder / "gray.tif")
    (folder / "broken.jpg").write_text("not an image")
    frames = dict(sources(folder))
    assert frames["broken.jpg"] is None
    for name in ("a16.png", "rotated.jpg", "gray.tif"):
        assert frames[name].dtype == np.uint8 and np.array_equal(frames[name], read_image(folder / name)), name
    assert frames["rotated.jpg"].shape == (W, H, 3) and frames["a16.png"].shape == (H, W, 3)
    ((name, frame),) = sources(folder / "gray.tif")
    assert name == "gray.tif" and np.array_equal(frame, read_image(folder / "gray.tif"))
