"""shapes-seg: pyseg's built-in synthetic instance-segmentation dataset, generated on first use.

Each image is a textured background with 0-8 filled shapes (circle, ellipse, triangle, rectangle, star, hexagon)
of random size, rotation, position and colour, some overlapping, some clipped by the image border. Shapes are
polygons in pixels (pixel (x, y) covers [x, x+1) x [y, y+1), as in pyseg.ops) and are drawn with
pyseg.ops.rasterize_polygons, so pixels and labels come from the same geometry. Each label row is what is still
visible of its shape, traced at 8x resolution (accurate to about 1/8 pixel); a visible region in several
pieces, or with a hole where a later shape sits on top, is one polygon joined by zero-width bridges (exact under
the even-odd rule, as Ultralytics' multi-segment labels).

The files are ordinary YOLO segmentation data (images/<split>/*.jpg, labels/<split>/*.txt with rows
`class x1 y1 ... xn yn`, normalized to 0..1), so any YOLO loader reads them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pyseg.data.augment import polygon_areas
from pyseg.ops import rasterize_polygons

SHAPES_CLASSES: tuple[str, ...] = ("circle", "ellipse", "triangle", "rectangle", "star", "hexagon")

MARKER = ".complete"  # written last into a finished dataset: the generation parameters as JSON
_VERSION = 1  # bump when the generator's output changes, so existing datasets are regenerated
_SPLITS = {"train": 0, "val": 1}  # split name -> id in the per-image seed
_STALE_PARTIAL_S = 3600  # a partial folder untouched this long is a leftover of an interrupted run

_MAX_SHAPES = 8
_BACKGROUND_FRACTION = 0.05  # images without shapes
_SIZE_RANGE = (0.04, 0.45)  # shape diameter, fraction of the image side (log-uniform)
_MIN_SIZE_PX = 6.0  # smallest diameter, so tiny images still get recognizable shapes
_MIN_INSIDE = 0.4  # a shape keeps at least this fraction of its area inside the image
_MIN_KEPT_VISIBLE = 0.5  # a later shape may hide at most half of an earlier one
_PLACEMENT_TRIES = 12
_LABEL_SCALE = 8  # labels are traced at this multiple of the image resolution
_LABEL_EPSILON = 1.0  # polygon simplification tolerance, label-scale pixels (1/8 image pixel)


@dataclass
class _Instance:
    """One drawn shape: class id, its visible outline (float32 [n, 2], image pixels), visible mask (bool [H, W])."""

    class_id: int
    polygon_px: np.ndarray
    visible_mask: np.ndarray


def generate_shapes_seg(root: Path | str, *, train: int = 128, val: int = 32, imgsz: int = 320, seed: int = 0) -> Path:
    """Writes root/images/{train,val}/*.jpg and root/labels/{train,val}/*.txt (YOLO polygons); returns root.

    Deterministic for a given (train, val, imgsz, seed): image i of a split depends only on (seed, split, i).
    Skips the work when root already holds a complete dataset (root/.complete, written last, holds the parameters
    as JSON). Generates into a temporary folder beside root and renames it into place, so an interrupted run
    never leaves a half dataset; a root without the marker (or made with other parameters) is replaced.

    Args:
        root: the dataset folder, e.g. <datasets>/shapes-seg.
        train, val: number of images per split.
        imgsz: image side, pixels (square images).
        seed: base seed.

    Raises:
        ValueError: negative counts or seed, or imgsz < 32.
        FileExistsError: root exists but holds something other than a shapes-seg dataset.
    """
    if train < 0 or val < 0:
        raise ValueError(f"train and val must be >= 0 images, got train={train}, val={val}")
    if imgsz < 32:
        raise ValueError(f"imgsz must be >= 32 pixels, got {imgsz}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    params = {"generator": "pyseg.data.synthetic", "version": _VERSION, "train": train, "val": val}
    params |= {"imgsz": imgsz, "seed": seed}
    if _is_complete(root, params):
        return root
    if root.exists() and not _is_replaceable(root):
        raise FileExistsError(
            f"{root} exists but is not a shapes-seg dataset (it holds files other than images/, labels/ and "
            f"{MARKER}); move it away or pass another folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        for split, count in (("train", train), ("val", val)):
            _write_split(partial, split, count, imgsz, seed)
        (partial / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        _move_into_place(partial, root, params)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when the rename succeeded
    return root


def _is_complete(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def _is_replaceable(root: Path) -> bool:
    """True when root is a folder holding at most what this module writes (an old or partial dataset)."""
    return root.is_dir() and all(entry.name in ("images", "labels", MARKER) for entry in root.iterdir())


def _remove_stale_partials(root: Path) -> None:
    now = time.time()
    for partial in root.parent.glob(f".{root.name}.partial-*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile


def _move_into_place(partial: Path, root: Path, params: dict) -> None:
    """Renames the finished partial folder to root, replacing an incomplete or outdated root."""
    old = None
    if root.exists():
        old = partial.with_name(partial.name + "-old")
        os.rename(root, old)
    try:
        os.rename(partial, root)
    except OSError:
        if not _is_complete(root, params):  # a concurrent run that finished first is fine
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_split(folder: Path, split: str, count: int, imgsz: int, seed: int) -> None:
    image_dir, label_dir = folder / "images" / split, folder / "labels" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLITS[split], index])
        image, instances = _render_image(rng, imgsz)
        name = f"{index:06d}"
        if not cv2.imwrite(str(image_dir / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"could not write {image_dir / name}.jpg; check the folder is writable and has space")
        (label_dir / f"{name}.txt").write_text("".join(_label_row(inst, imgsz) + "\n" for inst in instances))


def _label_row(instance: _Instance, imgsz: int) -> str:
    """`class x1 y1 ... xn yn`, coordinates normalized to 0..1 with 6 decimals."""
    coords = np.clip(instance.polygon_px / imgsz, 0.0, 1.0).reshape(-1)
    return f"{instance.class_id} " + " ".join(f"{v:.6f}" for v in coords)


def _render_image(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[_Instance]]:
    """One image and its instances, all from rng.

    Returns:
        image (uint8 [imgsz, imgsz, 3], BGR) and the labelled instances in drawing order (later ones on top).
    """
    background = _background(rng, imgsz)
    canvas = background.copy()
    num_shapes = 0 if rng.random() < _BACKGROUND_FRACTION else int(rng.integers(1, _MAX_SHAPES + 1))
    polygons: list[np.ndarray] = []
    classes: list[int] = []
    full_masks: list[np.ndarray] = []  # bool [H, W], each shape's pixels in the image
    visible: list[np.ndarray] = []  # bool [H, W], what later shapes left of each
    colours: list[np.ndarray] = []
    for _ in range(num_shapes):
        class_id = int(rng.integers(len(SHAPES_CLASSES)))
        low, high = max(_SIZE_RANGE[0] * imgsz, _MIN_SIZE_PX), _SIZE_RANGE[1] * imgsz
        diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        placed = _place_shape(rng, class_id, diameter, imgsz, visible, full_masks)
        if placed is None:
            continue  # no room for it
        polygon, mask = placed
        colour = _contrasting_colour(
            rng, background[mask].mean(0), [c for c, v in zip(colours, visible, strict=True) if v[mask].any()]
        )
        _paint(canvas, mask, colour, rng)
        for vis in visible:
            vis &= ~mask
        polygons.append(polygon)
        classes.append(class_id)
        full_masks.append(mask)
        visible.append(mask.copy())
        colours.append(colour)
    canvas += rng.normal(0.0, rng.uniform(1.5, 5.0), canvas.shape).astype(np.float32)  # sensor noise
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    instances = []
    for i, class_id in enumerate(classes):
        if visible[i].sum() < max(0.01 * full_masks[i].sum(), 1):
            continue
        outline = _visible_outline(polygons[i], polygons[i + 1 :], imgsz)
        if outline is not None:
            instances.append(_Instance(class_id, outline, visible[i]))
    return image, instances


def _place_shape(
    rng: np.random.Generator,
    class_id: int,
    diameter: float,
    imgsz: int,
    visible: list[np.ndarray],
    full_masks: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray] | None:
    """A position and rotation where the shape is mostly inside the image and hides at most half of each earlier
    shape: (polygon float64 [n, 2] pixels, mask bool [imgsz, imgsz]), or None after _PLACEMENT_TRIES tries."""
    for _ in range(_PLACEMENT_TRIES):
        centre = rng.uniform(0.0, imgsz, 2)
        polygon = _shape_polygon(class_id, centre, diameter, rng.uniform(0.0, 2 * math.pi), rng)
        mask = _rasterize([polygon], imgsz, imgsz)[0]
        if mask.sum() < max(_MIN_INSIDE * polygon_areas(polygon, [len(polygon)])[0], 4):
            continue
        if all(
            (vis & ~mask).sum() >= _MIN_KEPT_VISIBLE * full.sum() for vis, full in zip(visible, full_masks, strict=True)
        ):
            return polygon, mask
    return None


def _shape_polygon(
    class_id: int, centre: np.ndarray, diameter: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """The outline of a shape of class SHAPES_CLASSES[class_id], float64 [n, 2], image pixels."""
    name = SHAPES_CLASSES[class_id]
    radius = diameter / 2
    if name in ("circle", "ellipse"):
        t = np.linspace(0.0, 2 * math.pi, 64, endpoint=False)
        minor = 1.0 if name == "circle" else rng.uniform(0.35, 0.65)  # clearly not round
        points = np.stack([np.cos(t), minor * np.sin(t)], 1) * radius
    elif name == "triangle":
        t = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-15.0, 15.0, 3))
        points = np.stack([np.cos(t), np.sin(t)], 1) * radius * rng.uniform(0.85, 1.0, (3, 1))
    elif name == "rectangle":
        aspect = rng.uniform(0.35, 1.0)  # half-diagonal = radius
        half_w = radius / math.sqrt(1 + aspect**2)
        half_h = half_w * aspect
        points = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    elif name == "star":
        t = np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.5))
        points = np.stack([np.cos(t), np.sin(t)], 1) * radii[:, None]
    else:  # hexagon
        t = np.arange(6) * math.pi / 3
        points = np.stack([np.cos(t), np.sin(t)], 1) * radius
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rotation.T + centre


def _rasterize(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """One bool [height, width] mask per polygon (float [n, 2] pixels), by pyseg.ops.rasterize_polygons."""
    vertices = torch.from_numpy(np.concatenate(polygons).astype(np.float32))
    offsets = torch.from_numpy(np.cumsum([0] + [len(p) for p in polygons]).astype(np.int64))
    owners = torch.arange(len(polygons), dtype=torch.int64)
    return rasterize_polygons(vertices, offsets, owners, len(polygons), height, width).numpy().astype(bool)


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """A textured background, float32 [imgsz, imgsz, 3], BGR 0..255: gradient, blotches and a pattern."""
    coords = (np.arange(imgsz, dtype=np.float32) + 0.5) / imgsz - 0.5
    x, y = np.meshgrid(coords, coords)
    angle = rng.uniform(0.0, 2 * math.pi)
    along = (x * math.cos(angle) + y * math.sin(angle))[..., None]  # -0.7..0.7
    base = rng.uniform(40.0, 215.0, 3)
    image = base + along * rng.normal(0.0, 45.0, 3)
    cells = int(rng.integers(3, 9))  # smooth blotches
    blotches = rng.normal(0.0, rng.uniform(5.0, 18.0), (cells, cells, 3)).astype(np.float32)
    image = image + cv2.resize(blotches, (imgsz, imgsz), interpolation=cv2.INTER_CUBIC)
    kind = rng.choice(["plain", "stripes", "checker", "grain"])
    amplitude = rng.uniform(5.0, 14.0)
    tint = rng.uniform(0.5, 1.0, 3)
    if kind == "stripes":
        period = rng.uniform(0.02, 0.12)  # image sides
        phase = rng.uniform(0.0, 2 * math.pi)
        theta = rng.uniform(0.0, math.pi)
        wave = np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period + phase)
        image = image + amplitude * wave[..., None] * tint
    elif kind == "checker":
        cell = rng.uniform(0.02, 0.1)
        theta = rng.uniform(0.0, math.pi)
        u, v = x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)
        board = (np.floor(u / cell) + np.floor(v / cell)) % 2 * 2 - 1
        image = image + amplitude * board[..., None] * tint
    elif kind == "grain":
        grain = rng.normal(0.0, 1.0, (imgsz, imgsz)).astype(np.float32)
        grain = cv2.GaussianBlur(grain, (0, 0), rng.uniform(0.8, 2.0))
        image = image + amplitude * 2.5 * grain[..., None] * tint
    return image.astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, local_mean: np.ndarray, neighbours: list[np.ndarray]) -> np.ndarray:
    """Of 32 random colours, the one farthest (Euclidean, BGR) from the local background and overlapped shapes."""
    candidates = rng.uniform(0.0, 255.0, (32, 3))
    references = np.stack([local_mean, *neighbours])
    distances = np.linalg.norm(candidates[:, None] - references[None], axis=2).min(1)
    return candidates[int(distances.argmax())].astype(np.float32)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    """Fills mask with colour plus a gentle linear shading (at most +-12 levels across the image)."""
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0.0, 2 * math.pi)
    shade = (xs * math.cos(angle) + ys * math.sin(angle)) / canvas.shape[0]
    shade = (shade - shade.mean()) * rng.uniform(0.0, 24.0)
    canvas[ys, xs] = colour + shade[:, None].astype(np.float32)


def _visible_outline(polygon: np.ndarray, covering: list[np.ndarray], imgsz: int) -> np.ndarray | None:
    """What the later polygons (covering) leave visible of polygon, inside the image: float32 [n, 2] pixels.

    Traced at _LABEL_SCALE x the image resolution on the polygon's bounding box. Several pieces, or holes, are
    joined into one ring by zero-width bridges. None when nothing of at least 3 points remains.
    """
    scale = _LABEL_SCALE
    x0, y0 = np.clip(np.floor(polygon.min(0)), 0, imgsz).astype(int)
    x1, y1 = np.clip(np.ceil(polygon.max(0)), 0, imgsz).astype(int)
    if x1 <= x0 or y1 <= y0:
        return None
    origin = np.array([x0, y0], dtype=np.float64)
    boxed = [(p - origin) * scale for p in [polygon, *covering]]
    masks = _rasterize(boxed, (y1 - y0) * scale, (x1 - x0) * scale)
    visible = masks[0] & ~masks[1:].any(0)
    contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    rings = [cv2.approxPolyDP(c, _LABEL_EPSILON, True).reshape(-1, 2).astype(np.float64) for c in contours]
    rings = sorted((r for r in rings if len(r) >= 3), key=lambda r: -polygon_areas(r, [len(r)])[0])
    if not rings:
        return None
    outline = rings[0]
    for ring in rings[1:]:
        outline = _bridge(outline, ring)
    # Contour points are label-scale pixel indices; their centres are at index + 0.5.
    return np.clip((outline + 0.5) / scale + origin, 0, imgsz).astype(np.float32)


def _bridge(outline: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """One ring through outline and ring, joined at their closest vertices by a segment walked both ways.

    The bridge encloses no area, so under the even-odd rule the result covers outline XOR ring: a separate
    piece is added, a hole is cut out.
    """
    distances = np.linalg.norm(outline[:, None] - ring[None], axis=2)
    a, b = np.unravel_index(int(distances.argmin()), distances.shape)
    return np.concatenate([outline[: a + 1], ring[b:], ring[: b + 1], outline[a:]])
