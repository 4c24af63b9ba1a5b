"""YOLO segmentation labels: find images, parse and verify label files once, cache the result as JSON.

One label file per image (`/images/` -> `/labels/`, suffix `.txt`); rows `class x1 y1 ... xn yn` (a polygon,
normalized to 0..1) or `class cx cy w h` (a box-only instance). Every problem is recorded with its file and line
and what was done about it, and handled without losing the rest (report_problems shows and writes them); pyseg
never modifies the user's files, and its cache lives in pyseg's own cache folder ($PYSEG_CACHE_DIR, default
~/.cache/pyseg), never inside the dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyseg.data.images import IMAGE_SUFFIXES, ImageReadError, check_regular_file, image_header, read_image
from pyseg.errors import UserError
from pyseg.files import atomic_write_text

CACHE_VERSION = 2  # 2: problems carry what was done about them
CLIP_TOLERANCE = 0.02  # normalized coordinates within this of [0, 1] are clipped; farther ones drop the row
JPEG_END_MARKER = b"\xff\xd9"


class DatasetError(UserError, ValueError):
    """A split that cannot be used at all (no images, none readable, a source that is not there)."""


@dataclass
class Problem:
    """One thing wrong with a dataset file, and what pyseg did about it."""

    file: str
    line: int | None  # 1-based line of a label file, None for a whole file
    message: str  # what is wrong, e.g. "NaN or inf coordinate"
    action: str  # what pyseg did, e.g. "row dropped", "image skipped", "image read as background"

    def __str__(self) -> str:
        """`file:line: message (action)`, the line left out for a whole file."""
        return f"{self.file}{f':{self.line}' if self.line else ''}: {self.message} ({self.action})"


@dataclass
class ImageLabels:
    """The verified labels of one image (coordinates normalized to 0..1 of the oriented image)."""

    image: str  # absolute path
    height: int  # pixels, after EXIF orientation
    width: int
    classes: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float32 [n, 4] xyxy normalized
    polygons: list[np.ndarray]  # n arrays float32 [k, 2] normalized; k = 0 for a box-only instance

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "height": self.height,
            "width": self.width,
            "classes": self.classes.tolist(),
            "boxes": self.boxes.round(6).tolist(),
            "polygons": [p.reshape(-1).round(6).tolist() for p in self.polygons],
        }

    @classmethod
    def from_json(cls, item: dict) -> ImageLabels:
        return cls(
            item["image"],
            item["height"],
            item["width"],
            np.asarray(item["classes"], dtype=np.int64),
            np.asarray(item["boxes"], dtype=np.float32).reshape(-1, 4),
            [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in item["polygons"]],
        )


@dataclass
class SplitLabels:
    """Everything verification found for one split."""

    name: str
    images: list[ImageLabels]
    problems: list[Problem] = field(default_factory=list)
    skipped_images: int = 0
    dropped_rows: int = 0
    orphan_labels: list[str] = field(default_factory=list)  # label files whose image does not exist
    from_cache: bool = False

    @property
    def num_instances(self) -> int:
        return sum(len(item.classes) for item in self.images)

    @property
    def num_backgrounds(self) -> int:
        return sum(len(item.classes) == 0 for item in self.images)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.images)} images ({self.num_backgrounds} backgrounds), {self.num_instances} "
            f"instances, {self.dropped_rows} rows dropped, {self.skipped_images} images skipped, "
            f"{len(self.orphan_labels)} label files without image{' (cached)' if self.from_cache else ''}"
        )


def label_path(image: Path) -> Path:
    """The label file of an image: the last `images` folder becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def image_files(sources: list[Path], split: str = "split") -> list[Path]:
    """Images of a split; sources are folders (searched recursively), .txt lists of paths, or image files."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.suffix == ".txt" and source.is_file():
            for line in source.read_text().splitlines():
                if line.strip():
                    path = Path(line.strip())
                    files.append(path if path.is_absolute() else (source.parent / path))
        elif source.suffix.lower() in IMAGE_SUFFIXES and source.is_file():
            files.append(source)
        else:
            raise DatasetError(
                f"{split} source {source} is not a folder, a .txt list of images or an image file; check the "
                "dataset YAML's path: and split entries"
            )
    return [_absolute(p) for p in files]


def _absolute(path: Path) -> Path:
    """path resolved; a looping or dangling symlink stays as it is (absolute), to be reported by its own name as an
    unreadable image (its label file is the one beside the link)."""
    if path.is_symlink() and not path.exists():
        return Path(os.path.abspath(path))
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # "Symlink loop" (RuntimeError before Python 3.13, OSError since)
        return Path(os.path.abspath(path))


def _orphan_labels(sources: list[Path], images: list[Path]) -> list[str]:
    wanted = {label_path(p) for p in images}
    orphans: set[Path] = set()
    for source in sources:
        if source.is_dir():
            folder = label_path(source / "x.jpg").parent
            if folder.is_dir():
                orphans |= {p.resolve() for p in folder.rglob("*.txt")} - wanted
    return sorted(str(p) for p in orphans)


def verify_image(path: Path) -> tuple[int, int, list[Problem]]:
    """(height, width, problems) of an image as read_image decodes it (after EXIF orientation).

    A JPEG is checked from its header (size, EXIF orientation) and its end marker: one without the marker is
    decoded once to see how much of it reads. Other formats are decoded once. Raises ImageReadError when the
    image cannot be read (the caller skips it).
    """
    check_regular_file(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageReadError(path, error.strerror or str(error)) from error
    header = image_header(data)
    if header is None or header[0] != "JPEG":
        height, width = read_image(path).shape[:2]
        return height, width, []
    _, height, width = header
    if data.endswith(JPEG_END_MARKER):
        return height, width, []
    try:
        read_image(path)
    except ImageReadError as error:
        raise ImageReadError(path, "truncated JPEG (no end marker) that cannot be decoded") from error
    truncated = Problem(str(path), None, "truncated JPEG (no end marker)", "read as far as it goes; file left as is")
    return height, width, [truncated]


def parse_label_file(path: Path, nc: int) -> tuple[ImageLabels | None, list[Problem], int]:
    """Parses one label file -> (labels without image fields, problems, rows dropped)."""
    problems: list[Problem] = []
    classes, boxes, polygons = [], [], []
    seen: set[tuple] = set()
    dropped = 0
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first row
    except (OSError, UnicodeDecodeError) as error:
        return None, [Problem(str(path), None, f"unreadable label file ({error})", "image read as background")], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue

        def drop(message: str, number=number) -> None:
            nonlocal dropped
            dropped += 1
            problems.append(Problem(str(path), number, message, "row dropped"))

        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            drop("not a row of numbers")
            continue
        cls, coords = values[0], values[1:]
        if not cls.is_integer():
            drop(f"class {line.split()[0]} is not a whole number")
            continue
        if not 0 <= cls < nc:
            drop(f"class {line.split()[0]} outside 0..{nc - 1}")
            continue
        if not all(math.isfinite(v) for v in coords):
            drop("NaN or inf coordinate")
            continue
        if len(coords) != 4 and len(coords) % 2:
            drop(f"odd number of coordinates ({len(coords)})")
            continue
        if len(coords) != 4 and len(coords) < 6:
            drop(f"polygon with fewer than 3 points ({len(coords) // 2})")
            continue
        array = np.asarray(coords, dtype=np.float64)
        if len(coords) == 4:  # box row: cx cy w h
            cx, cy, w, h = array
            if w <= 0 or h <= 0:
                drop(f"box with non-positive size {w}x{h}")
                continue
            array = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if array.min() < -CLIP_TOLERANCE or array.max() > 1 + CLIP_TOLERANCE:
            drop(f"coordinates far outside 0..1 (from {array.min():.3g} to {array.max():.3g})")
            continue
        outside = f"coordinates slightly outside 0..1 (from {array.min():.3g} to {array.max():.3g})"
        clipped = array.min() < 0.0 or array.max() > 1.0
        array = array.clip(0.0, 1.0)
        key = (int(cls), tuple(np.round(array, 6)))
        if key in seen:
            drop("duplicate of an earlier row")
            continue
        seen.add(key)
        if len(coords) == 4:
            box, polygon = array, np.zeros((0, 2), dtype=np.float32)
        else:
            polygon = array.reshape(-1, 2).astype(np.float32)
            box = np.concatenate([polygon.min(0), polygon.max(0)])
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                drop("polygon of zero area")
                continue
        if clipped:
            problems.append(Problem(str(path), number, outside, "clipped to 0..1"))
        classes.append(int(cls))
        boxes.append(box)
        polygons.append(polygon)
    labels = ImageLabels(
        "",
        0,
        0,
        np.asarray(classes, dtype=np.int64),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        polygons,
    )
    return labels, problems, dropped


def cache_dir() -> Path:
    """pyseg's own cache folder for label caches: $PYSEG_CACHE_DIR/labels or ~/.cache/pyseg/labels."""
    return Path(os.environ.get("PYSEG_CACHE_DIR", Path.home() / ".cache" / "pyseg")).expanduser() / "labels"


def _fingerprint(paths: list[Path]) -> list:
    out = []
    for path in paths:
        try:
            stat = path.stat()
            out.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([str(path), None, None])
    return out


def load_split(sources: list[Path], nc: int, split: str = "train", *, use_cache: bool = True) -> SplitLabels:
    """Verifies the images and labels of a split (or reads the cache when nothing changed).

    Raises DatasetError when the split has no usable image, saying why.
    """
    images = image_files(sources, split)
    if not images:
        raise DatasetError(
            f"{split}: no images found in {', '.join(map(str, sources))} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    labels = [label_path(p) for p in images]
    key_material = {
        "version": CACHE_VERSION,
        "nc": nc,
        "images": _fingerprint(images),
        "labels": _fingerprint(labels),
        "sources": sorted(map(str, sources)),
    }
    key = hashlib.sha256(json.dumps(key_material).encode()).hexdigest()
    cache_file = cache_dir() / f"{hashlib.sha256(json.dumps(sorted(map(str, sources))).encode()).hexdigest()[:24]}.json"
    if use_cache and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("version") == CACHE_VERSION and cached.get("key") == key:
                return SplitLabels(
                    split,
                    [ImageLabels.from_json(item) for item in cached["images"]],
                    [Problem(*p) for p in cached["problems"]],
                    cached["skipped_images"],
                    cached["dropped_rows"],
                    cached["orphan_labels"],
                    from_cache=True,
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a stale or damaged cache is rebuilt

    result = SplitLabels(split, [], orphan_labels=_orphan_labels(sources, images))
    for orphan in result.orphan_labels:
        result.problems.append(Problem(orphan, None, "label file without image", "ignored"))
    for image, label in zip(images, labels, strict=True):
        try:
            height, width, image_problems = verify_image(image)
        except ImageReadError as error:
            result.skipped_images += 1
            result.problems.append(Problem(str(image), None, f"unreadable image: {error.reason}", "image skipped"))
            continue
        result.problems += image_problems
        if label.is_file():
            parsed, problems, dropped = parse_label_file(label, nc)
            result.problems += problems
            result.dropped_rows += dropped
        else:
            parsed = None
            result.problems.append(Problem(str(image), None, f"no label file {label}", "image read as background"))
        if parsed is None:
            parsed = ImageLabels("", 0, 0, np.zeros(0, np.int64), np.zeros((0, 4), np.float32), [])
        parsed.image, parsed.height, parsed.width = str(image), height, width
        result.images.append(parsed)
    if not result.images:
        reasons = "; ".join(str(p) for p in result.problems[:3])
        raise DatasetError(f"{split}: none of its {len(images)} images could be read ({reasons})")
    if use_cache:
        _write_cache(cache_file, key, result)
    return result


def _write_cache(cache_file: Path, key: str, result: SplitLabels) -> None:
    """Writes the cache atomically; a cache that cannot be written is only a lost speed-up."""
    payload = {
        "version": CACHE_VERSION,
        "key": key,
        "images": [item.to_json() for item in result.images],
        "problems": [[p.file, p.line, p.message, p.action] for p in result.problems],
        "skipped_images": result.skipped_images,
        "dropped_rows": result.dropped_rows,
        "orphan_labels": result.orphan_labels,
    }
    try:
        atomic_write_text(cache_file, json.dumps(payload), durable=False)
    except OSError:
        pass


def report_problems(splits: list[SplitLabels], out_file: Path | None, shown: int = 10) -> str:
    """The data problems of splits for the console, and all of them in out_file.

    Returns the first `shown` problems, one `file:line: what (what was done)` line each, then
    `... and N more (all in OUT_FILE)` when there are more; "" when there are none. A problem found in several
    splits (splits that share files) is listed once, in the order found. Writes every problem, one line each,
    to out_file (e.g. RUN/data_problems.txt, replacing it) when out_file is given and there are any; writes no
    file when there are none.
    """
    unique: dict[tuple, Problem] = {}
    for split in splits:
        for problem in split.problems:
            unique.setdefault((problem.file, problem.line, problem.message, problem.action), problem)
    lines = [str(problem) for problem in unique.values()]
    if out_file is not None and lines:
        atomic_write_text(out_file, "".join(line + "\n" for line in lines))
    text = lines[:shown]
    if len(lines) > shown:
        where = f" (all in {out_file})" if out_file is not None else ""
        text.append(f"... and {len(lines) - shown} more{where}")
    return "\n".join(text)
