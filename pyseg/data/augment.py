"""Geometric and colour augmentation applied to images and polygon vertices (never to masks).

Transforms are 3x3 matrices from source pixels to output pixels; a mosaic tile or a single image is warped
once, straight into the output, with the placement, letterbox and random affine/perspective composed.
Polygons are transformed and clipped to the visible region exactly (Sutherland-Hodgman), never resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114  # grey of the letterbox border and of uncovered mosaic areas


@dataclass
class Instances:
    """Instances of one image, in pixels of that image."""

    classes: np.ndarray  # int64 [n]
    polygons: list[np.ndarray]  # n arrays float32 [k, 2]; a box-only instance carries its 4 box corners
    has_mask: np.ndarray  # bool [n]; False for box-only instances

    @staticmethod
    def empty() -> Instances:
        return Instances(np.zeros(0, np.int64), [], np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.classes)

    def boxes(self) -> np.ndarray:
        """float32 [n, 4] xyxy bounds of the polygons."""
        if not self.polygons:
            return np.zeros((0, 4), np.float32)
        return np.stack([np.concatenate([p.min(0), p.max(0)]) for p in self.polygons]).astype(np.float32)

    def select(self, keep: np.ndarray) -> Instances:
        keep = np.asarray(keep, bool)
        return Instances(
            self.classes[keep], [p for p, k in zip(self.polygons, keep, strict=True) if k], self.has_mask[keep]
        )

    @staticmethod
    def concat(parts: list[Instances]) -> Instances:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Instances.empty()
        return Instances(
            np.concatenate([p.classes for p in parts]),
            [poly for p in parts for poly in p.polygons],
            np.concatenate([p.has_mask for p in parts]),
        )


def polygon_area(points: np.ndarray) -> float:
    """Area (pixels^2) of a closed polygon [k, 2] by the shoelace formula (absolute value)."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _next_vertex(lengths: np.ndarray) -> np.ndarray:
    """Index of each vertex's successor within its own polygon (polygons stored back to back)."""
    nxt = np.arange(int(lengths.sum())) + 1
    nonempty = lengths > 0
    nxt[(_starts(lengths) + lengths - 1)[nonempty]] = _starts(lengths)[nonempty]
    return nxt


def _clip_half_plane(
    points: np.ndarray, lengths: np.ndarray, axis: int, bound: float, keep_greater: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One Sutherland-Hodgman pass over all polygons at once: keeps the side of `axis = bound` asked for."""
    if len(points) == 0:
        return points, lengths
    nxt = _next_vertex(lengths)
    v = points[:, axis]
    inside = v >= bound if keep_greater else v <= bound
    crossing = inside != inside[nxt]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crossing, (bound - v) / np.where(crossing, v[nxt] - v, 1.0), 0.0)
    hit = points + t[:, None] * (points[nxt] - points)
    hit[:, axis] = bound
    take = np.stack([inside, crossing], 1)  # per vertex: keep it, then the crossing after it
    counts = take.sum(1)
    new_lengths = np.zeros_like(lengths)
    nonempty = lengths > 0
    new_lengths[nonempty] = np.add.reduceat(counts, _starts(lengths)[nonempty])
    return np.stack([points, hit], 1)[take].astype(np.float32), new_lengths


def clip_polygons(
    points: np.ndarray, lengths: np.ndarray, rect: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """The parts of polygons (stored back to back, vertex counts `lengths`) inside rect = (x0, y0, x1, y1).

    Sutherland-Hodgman on all polygons at once; sides that no vertex crosses are skipped.
    """
    x0, y0, x1, y1 = rect
    for axis, bound, keep_greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(points) and (points[:, axis].min() < bound if keep_greater else points[:, axis].max() > bound):
            points, lengths = _clip_half_plane(points, lengths, axis, bound, keep_greater)
    return points, lengths


def clip_polygon(points: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The part of one polygon [k, 2] inside the rectangle [x0, x1] x [y0, y1]."""
    return clip_polygons(points.astype(np.float32), np.array([len(points)]), (x0, y0, x1, y1))[0]


def polygon_areas(points: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Areas (pixels^2) of polygons stored back to back in points [V, 2] with the given vertex counts."""
    lengths = np.asarray(lengths, np.int64)
    areas = np.zeros(len(lengths))
    if len(points) == 0 or len(lengths) == 0:
        return areas
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nxt = np.arange(len(points)) + 1
    nonempty = lengths > 0
    nxt[(starts + lengths - 1)[nonempty]] = starts[nonempty]
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    cross = x * y[nxt] - y * x[nxt]
    areas[nonempty] = 0.5 * np.abs(np.add.reduceat(cross, starts[nonempty]))
    return areas


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """points [k, 2] through a 3x3 matrix (affine or perspective)."""
    if len(points) == 0:
        return points.astype(np.float32)
    homogeneous = np.concatenate([points, np.ones((len(points), 1), points.dtype)], 1) @ matrix.T
    if matrix[2, 0] == 0 and matrix[2, 1] == 0:
        return (homogeneous[:, :2] / matrix[2, 2]).astype(np.float32)
    return (homogeneous[:, :2] / np.maximum(homogeneous[:, 2:3], 1e-9)).astype(np.float32)


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def random_affine(
    rng: np.random.Generator,
    out_size: int,
    degrees: float,
    translate: float,
    scale: float,
    shear: float,
    perspective: float,
) -> np.ndarray:
    """A random 3x3 transform about the output centre: perspective, rotation + scale, shear, translation.

    Maps a square canvas centred at the origin to an out_size x out_size output.
    """
    p = np.eye(3)
    p[2, 0], p[2, 1] = rng.uniform(-perspective, perspective, 2)
    angle = rng.uniform(-degrees, degrees)
    factor = rng.uniform(1 - scale, 1 + scale)
    rotation = np.eye(3)
    rotation[:2] = cv2.getRotationMatrix2D((0, 0), angle, factor)
    s = np.eye(3)
    s[0, 1], s[1, 0] = np.tan(np.radians(rng.uniform(-shear, shear, 2)))
    t = translation(*(rng.uniform(0.5 - translate, 0.5 + translate, 2) * out_size))
    return t @ s @ rotation @ p


def warp_into(out: np.ndarray, image: np.ndarray, matrix: np.ndarray) -> None:
    """Warps image (source pixels) through matrix into out, writing only the pixels the image covers.

    Only the output rectangle the image can reach is computed (a ROI), so four mosaic tiles cost about
    one full warp.
    """
    h, w = image.shape[:2]
    corners = transform_points(np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32), matrix)
    out_h, out_w = out.shape[:2]
    x0, y0 = (max(0, int(math.floor(v))) for v in corners.min(0))
    x1, y1 = min(out_w, int(math.ceil(corners[:, 0].max()))), min(out_h, int(math.ceil(corners[:, 1].max())))
    if x0 >= x1 or y0 >= y1:
        return
    roi = out[y0:y1, x0:x1]
    local = translation(-x0, -y0) @ matrix
    # cv2 maps destination pixel centres at integer coordinates; our pixels have centres at +0.5.
    local = translation(-0.5, -0.5) @ local @ translation(0.5, 0.5)
    flags = cv2.INTER_LINEAR
    if local[2, 0] == 0 and local[2, 1] == 0:
        cv2.warpAffine(image, local[:2], (x1 - x0, y1 - y0), dst=roi, flags=flags, borderMode=cv2.BORDER_TRANSPARENT)
    else:
        cv2.warpPerspective(image, local, (x1 - x0, y1 - y0), dst=roi, flags=flags, borderMode=cv2.BORDER_TRANSPARENT)


def transform_instances(
    instances: Instances,
    matrix: np.ndarray,
    visible: tuple[float, float, float, float],
    out_size: tuple[int, int],
    min_area_fraction: float = 0.1,
    min_side_px: float = 2.0,
) -> Instances:
    """Clips instances to the visible source rectangle, transforms them, clips them to the output, filters.

    An instance is kept when its clipped area is at least min_area_fraction of its transformed unclipped area
    and its box is at least min_side_px on both sides. All polygons are processed together.
    """
    if not len(instances):
        return instances
    out_h, out_w = out_size
    lengths = np.array([len(p) for p in instances.polygons])
    points = np.concatenate(instances.polygons).astype(np.float32)
    full_area = polygon_areas(transform_points(points, matrix), lengths)
    points, lengths = clip_polygons(points, lengths, visible)
    points, lengths = clip_polygons(transform_points(points, matrix), lengths, (0, 0, out_w, out_h))
    keep = (lengths >= 3) & (full_area > 0)
    pieces = np.split(points, np.cumsum(lengths)[:-1])
    if keep.any():
        areas = polygon_areas(points, lengths)
        starts = _starts(lengths)[lengths > 0]
        lo = np.full((len(lengths), 2), np.inf)
        hi = np.full((len(lengths), 2), -np.inf)
        lo[lengths > 0] = np.minimum.reduceat(points, starts, axis=0)
        hi[lengths > 0] = np.maximum.reduceat(points, starts, axis=0)
        keep &= (areas >= min_area_fraction * full_area) & ((hi - lo) >= min_side_px).all(1)
    return Instances(
        instances.classes[keep], [p for p, k in zip(pieces, keep, strict=True) if k], instances.has_mask[keep]
    )


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, hgain: float, sgain: float, vgain: float) -> None:
    """Random hue/saturation/value gains on a BGR uint8 image, in place (lookup tables, uint8 throughout)."""
    if not (hgain or sgain or vgain):
        return
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(merged, cv2.COLOR_HSV2BGR, dst=image)


def flip_instances(instances: Instances, size: float, axis: int) -> Instances:
    """Mirrors polygons across the image: axis 0 flips x (left-right), axis 1 flips y (up-down)."""
    polygons = []
    for poly in instances.polygons:
        mirrored = poly.copy()
        mirrored[:, axis] = size - mirrored[:, axis]
        polygons.append(mirrored)
    return Instances(instances.classes, polygons, instances.has_mask)


def box_ioa(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """[n, m] intersection over the area of `others` for xyxy boxes."""
    if len(boxes) == 0 or len(others) == 0:
        return np.zeros((len(boxes), len(others)), np.float32)
    lo = np.maximum(boxes[:, None, :2], others[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(2)
    area = np.clip(others[:, 2:] - others[:, :2], 0, None).prod(1)
    return inter / np.maximum(area[None], 1e-9)
