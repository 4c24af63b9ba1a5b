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
    """Instances of one image, in pixels of that image, with their polygons stored back to back."""

    classes: np.ndarray  # int64 [n]
    points: np.ndarray  # float32 [V, 2]; a box-only instance carries its 4 box corners
    lengths: np.ndarray  # int64 [n] vertex count of each polygon
    has_mask: np.ndarray  # bool [n]; False for box-only instances

    @staticmethod
    def empty() -> Instances:
        return Instances(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))

    @staticmethod
    def from_polygons(classes, polygons: list[np.ndarray], has_mask) -> Instances:
        """From one [k, 2] array per instance."""
        if not len(polygons):
            return Instances.empty()
        return Instances(
            np.asarray(classes, np.int64),
            np.concatenate(polygons).astype(np.float32).reshape(-1, 2),
            np.array([len(p) for p in polygons], np.int64),
            np.asarray(has_mask, bool),
        )

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def polygons(self) -> list[np.ndarray]:
        """One [k, 2] view per instance."""
        return np.split(self.points, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []

    def offsets(self) -> np.ndarray:
        """int64 [n + 1]: polygon i is points[offsets[i]:offsets[i + 1]]."""
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def boxes(self) -> np.ndarray:
        """float32 [n, 4] xyxy bounds of the polygons (every polygon has at least one vertex)."""
        if not len(self):
            return np.zeros((0, 4), np.float32)
        starts = _starts(self.lengths)
        lo, hi = np.minimum.reduceat(self.points, starts), np.maximum.reduceat(self.points, starts)
        return np.concatenate([lo, hi], 1).astype(np.float32)

    def select(self, keep: np.ndarray) -> Instances:
        keep = np.asarray(keep, bool)
        return Instances(
            self.classes[keep], self.points[np.repeat(keep, self.lengths)], self.lengths[keep], self.has_mask[keep]
        )

    @staticmethod
    def concat(parts: list[Instances]) -> Instances:
        parts = [p for p in parts if len(p)]
        if len(parts) < 2:
            return parts[0] if parts else Instances.empty()
        return Instances(
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.points for p in parts]),
            np.concatenate([p.lengths for p in parts]),
            np.concatenate([p.has_mask for p in parts]),
        )


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


def polygon_areas(points: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Areas (float64 [n], pixels^2) of closed polygons stored back to back in points [V, 2] with the given vertex
    counts, by the shoelace formula (absolute value; 0 for fewer than 3 vertices). One polygon [k, 2]:
    polygon_areas(points, [len(points)])[0]."""
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
    if matrix[2, 0] == 0 and matrix[2, 1] == 0:
        affine = matrix[:2] / matrix[2, 2]
        return (points @ affine[:, :2].T + affine[:, 2]).astype(np.float32)
    homogeneous = np.concatenate([points, np.ones((len(points), 1), points.dtype)], 1) @ matrix.T
    return (homogeneous[:, :2] / np.maximum(homogeneous[:, 2:3], 1e-9)).astype(np.float32)


def letterbox(height: int, width: int, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An height x width image scaled to fit a size x size square, centred: (3x3 matrix from image pixels to square
    pixels, ratio_pad (r, pad_x, pad_y)); image pixel = (square pixel - pad) / r."""
    r = size / max(height, width)
    pad_x, pad_y = (size - width * r) / 2, (size - height * r) / 2
    return translation(pad_x, pad_y) @ scaling(r), (r, pad_x, pad_y)


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


Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def _snapped_span(lo: float, hi: float, scale: float, shift: float, out_len: int) -> tuple[int, int, int, int] | None:
    """Integer source span [s0, s1) and output span [d0, d1) closest to u = scale * p + shift of [lo, hi],
    clipped to the output [0, out_len]; None when nothing lands inside."""
    a, b = max(lo, -shift / scale), min(hi, (out_len - shift) / scale)
    s0, s1 = round(a), round(b)
    d0, d1 = max(0, round(scale * a + shift)), min(out_len, round(scale * b + shift))
    if s1 <= s0 or d1 <= d0:
        return None
    return s0, s1, d0, d1


def warp_into(
    out: np.ndarray, image: np.ndarray, matrix: np.ndarray, visible: Rect | None = None, snap: bool = False
) -> tuple[np.ndarray, Rect] | None:
    """Warps the visible part of image (source pixels, default all) through matrix into out, in place.

    Only the output rectangle the image can reach is computed (a ROI), so four mosaic tiles cost about one full
    warp. With snap=True a scale + translation (no rotation, shear or perspective) is rounded to whole pixels at
    the visible part's edges (under a pixel of difference) and done by cv2.resize into the ROI, about 3x faster
    than a general warp. Returns the transform and visible source rectangle actually drawn (give both to
    transform_instances so polygons match the pixels), or None when nothing lands in out.
    """
    h, w = image.shape[:2]
    out_h, out_w = out.shape[:2]
    x0, y0, x1, y1 = visible if visible is not None else (0.0, 0.0, float(w), float(h))
    axis_aligned = matrix[0, 1] == 0 and matrix[1, 0] == 0 and matrix[2, 0] == 0 and matrix[2, 1] == 0
    if snap and axis_aligned and matrix[0, 0] > 0 and matrix[1, 1] > 0:
        m = matrix / matrix[2, 2]
        xs = _snapped_span(x0, x1, m[0, 0], m[0, 2], out_w)
        ys = _snapped_span(y0, y1, m[1, 1], m[1, 2], out_h)
        if xs is None or ys is None:
            return None
        (sx0, sx1, dx0, dx1), (sy0, sy1, dy0, dy1) = xs, ys
        cv2.resize(
            image[sy0:sy1, sx0:sx1], (dx1 - dx0, dy1 - dy0), dst=out[dy0:dy1, dx0:dx1], interpolation=cv2.INTER_LINEAR
        )
        kx, ky = (dx1 - dx0) / (sx1 - sx0), (dy1 - dy0) / (sy1 - sy0)
        return translation(dx0 - kx * sx0, dy0 - ky * sy0) @ scaling(kx, ky), (sx0, sy0, sx1, sy1)
    cx0, cy0 = int(math.floor(x0)), int(math.floor(y0))
    crop = image[cy0 : int(math.ceil(y1)), cx0 : int(math.ceil(x1))]
    local = matrix @ translation(cx0, cy0)
    ch, cw = crop.shape[:2]
    corners = transform_points(np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], np.float32), local)
    rx0, ry0 = (max(0, int(math.floor(v))) for v in corners.min(0))
    rx1, ry1 = min(out_w, int(math.ceil(corners[:, 0].max()))), min(out_h, int(math.ceil(corners[:, 1].max())))
    if rx0 >= rx1 or ry0 >= ry1 or cw == 0 or ch == 0:
        return None
    roi = out[ry0:ry1, rx0:rx1]
    local = translation(-rx0, -ry0) @ local
    # cv2 maps destination pixel centres at integer coordinates; our pixels have centres at +0.5.
    local = translation(-0.5, -0.5) @ local @ translation(0.5, 0.5)
    flags, size = cv2.INTER_LINEAR, (rx1 - rx0, ry1 - ry0)
    if local[2, 0] == 0 and local[2, 1] == 0:
        cv2.warpAffine(crop, local[:2], size, dst=roi, flags=flags, borderMode=cv2.BORDER_TRANSPARENT)
    else:
        cv2.warpPerspective(crop, local, size, dst=roi, flags=flags, borderMode=cv2.BORDER_TRANSPARENT)
    return matrix, (x0, y0, x1, y1)


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
    points, lengths = instances.points, instances.lengths
    full_area = polygon_areas(transform_points(points, matrix), lengths)
    points, lengths = clip_polygons(points, lengths, visible)
    points, lengths = clip_polygons(transform_points(points, matrix), lengths, (0, 0, out_w, out_h))
    keep = (lengths >= 3) & (full_area > 0)
    if keep.any():
        areas = polygon_areas(points, lengths)
        starts = _starts(lengths)[lengths > 0]
        lo = np.full((len(lengths), 2), np.inf)
        hi = np.full((len(lengths), 2), -np.inf)
        lo[lengths > 0] = np.minimum.reduceat(points, starts, axis=0)
        hi[lengths > 0] = np.maximum.reduceat(points, starts, axis=0)
        keep &= (areas >= min_area_fraction * full_area) & ((hi - lo) >= min_side_px).all(1)
    return Instances(instances.classes[keep], points[np.repeat(keep, lengths)], lengths[keep], instances.has_mask[keep])


_LUMA_BGR = np.array([0.114, 0.587, 0.299])  # Rec. 601 weights in B, G, R order


def colour_matrix(hue: float, saturation: float, value: float) -> np.ndarray:
    """3x3 float32 matrix on BGR pixels: hue rotation about the grey axis by `hue` turns, saturation gain about
    the pixel's luma, value (brightness) gain. Grey stays grey for any hue; gains of 1 and hue 0 give identity."""
    angle = 2 * math.pi * hue
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
    saturate = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _LUMA_BGR)
    return (value * saturate @ rotation).astype(np.float32)


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, hgain: float, sgain: float, vgain: float) -> None:
    """Random hue/saturation/value change of a BGR uint8 image, in place, as one 3x3 colour matrix.

    Hue turns by uniform(-hgain, hgain) of the colour circle; saturation and value scale by 1 + uniform(-g, g).
    One cv2.transform pass (saturating to uint8), several times cheaper than converting to HSV and back.
    """
    if not (hgain or sgain or vgain):
        return
    hue, saturation, value = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain]) + np.array([0, 1, 1])
    cv2.transform(image, colour_matrix(hue, saturation, value), dst=image)


def flip_instances(instances: Instances, size: float, axis: int) -> Instances:
    """Mirrors polygons across the image: axis 0 flips x (left-right), axis 1 flips y (up-down)."""
    points = instances.points.copy()
    points[:, axis] = size - points[:, axis]
    return Instances(instances.classes, points, instances.lengths, instances.has_mask)


def box_ioa(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """[n, m] intersection over the area of `others` for xyxy boxes."""
    if len(boxes) == 0 or len(others) == 0:
        return np.zeros((len(boxes), len(others)), np.float32)
    lo = np.maximum(boxes[:, None, :2], others[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(2)
    area = np.clip(others[:, 2:] - others[:, :2], 0, None).prod(1)
    return inter / np.maximum(area[None], 1e-9)
