"""Pure-torch definitions of pyseg's ops.

These functions *define* the ops: the C++ and CUDA kernels are tested against them, and
pyseg.ops falls back to them when pyseg._C is missing. They favour clarity over speed.

Pixel rule used throughout: pixel (x, y) covers [x, x+1) x [y, y+1) and its centre is
(x + 0.5, y + 0.5). A pixel is inside a box (x1, y1, x2, y2) when x1 <= x + 0.5 < x2 and
y1 <= y + 0.5 < y2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the [edges, rows, cols] comparison tensor built per chunk of edges.
_MAX_CHUNK_ELEMENTS = 1 << 24


def _polygon_interior(poly: Tensor, height: int, width: int) -> tuple[int, int, Tensor] | None:
    """Even-odd interior of one closed polygon, on its bounding pixels.

    poly: Tensor[n, 2] float64 (x, y) in pixels, n >= 3.
    Returns (row0, col0, inside Tensor[R, C] bool) or None when it covers no pixel.

    Edge i runs from vertex i to vertex i+1 (the last to the first). It crosses the row whose
    centre is yc when (y0 <= yc) != (y1 <= yc), at x = x0 + ((yc - y0) * (x1 - x0)) / (y1 - y0)
    (float64, in that order). A pixel is inside when an odd number of crossings lie at or left
    of its centre (so, as for boxes, an edge through a centre includes it on the left and top
    sides and excludes it on the right and bottom sides).
    """
    x, y = poly[:, 0], poly[:, 1]
    # One pixel of margin: crossings may round an ulp outside [min, max] but never a pixel.
    row0 = min(max(math.floor(y.min().item()) - 1, 0), height)
    row1 = min(max(math.ceil(y.max().item()) + 1, 0), height)
    col0 = min(max(math.floor(x.min().item()) - 1, 0), width)
    col1 = min(max(math.ceil(x.max().item()) + 2, 0), width)
    if row0 >= row1 or col0 >= col1:
        return None
    x0, y0 = x[:, None], y[:, None]
    x1, y1 = torch.roll(x, -1)[:, None], torch.roll(y, -1)[:, None]
    yc = torch.arange(row0, row1, dtype=torch.float64, device=poly.device)[None, :] + 0.5  # (1, R)
    xc = torch.arange(col0, col1, dtype=torch.float64, device=poly.device) + 0.5  # (C,)
    crosses = (y0 <= yc) != (y1 <= yc)  # (E, R)
    with torch.no_grad():
        x_cross = x0 + ((yc - y0) * (x1 - x0)) / (y1 - y0)  # (E, R); inf/nan only where not crossing
    rows, cols = row1 - row0, col1 - col0
    parity = torch.zeros((rows, cols), dtype=torch.bool, device=poly.device)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (rows * cols))
    for start in range(0, poly.shape[0], chunk):
        left = crosses[start : start + chunk, :, None] & (x_cross[start : start + chunk, :, None] <= xc)  # (e, R, C)
        parity ^= (left.sum(0) % 2).bool()
    return row0, col0, parity


def rasterize_polygons(
    vertices: Tensor, poly_offsets: Tensor, poly_to_mask: Tensor, num_masks: int, height: int, width: int
) -> Tensor:
    """Reference of pyseg.ops.rasterize_polygons: uint8 Tensor[num_masks, height, width].

    Polygon p has vertices[poly_offsets[p] : poly_offsets[p + 1]] (pixels) and is OR-ed into
    mask poly_to_mask[p]; polygons with fewer than 3 vertices draw nothing.
    """
    masks = torch.zeros((num_masks, height, width), dtype=torch.uint8, device=vertices.device)
    offsets = poly_offsets.tolist()
    owners = poly_to_mask.tolist()
    vertices64 = vertices.double()
    for p, owner in enumerate(owners):
        start, end = offsets[p], offsets[p + 1]
        if end - start < 3 or height == 0 or width == 0:
            continue
        found = _polygon_interior(vertices64[start:end], height, width)
        if found is None:
            continue
        row0, col0, inside = found
        view = masks[owner, row0 : row0 + inside.shape[0], col0 : col0 + inside.shape[1]]
        view |= inside.to(torch.uint8)
    return masks


def rasterize_polygons_overlap(
    vertices: Tensor,
    poly_offsets: Tensor,
    poly_to_mask: Tensor,
    image_index: Tensor,
    num_images: int,
    height: int,
    width: int,
) -> tuple[Tensor, Tensor]:
    """Reference of pyseg.ops.rasterize_polygons_overlap.

    Returns (index_map int32 Tensor[num_images, height, width], areas int64 Tensor[M]).
    Mask m belongs to image image_index[m]; within an image, its id is its 1-based rank among
    that image's masks in the given order. Masks are drawn by decreasing area (ties in the given
    order), each over the previous, so a pixel shows the smallest mask covering it.
    """
    num_masks = image_index.shape[0]
    masks = rasterize_polygons(vertices, poly_offsets, poly_to_mask, num_masks, height, width)
    areas = masks.sum((1, 2), dtype=torch.int64)
    index_map = torch.zeros((num_images, height, width), dtype=torch.int32, device=vertices.device)
    for b in range(num_images):
        members = (image_index == b).nonzero().flatten()
        order = torch.sort(areas[members], descending=True, stable=True).indices
        for rank in order.tolist():
            index_map[b][masks[members[rank]].bool()] = rank + 1
    return index_map, areas


def box_crop(boxes: Tensor, height: int, width: int) -> Tensor:
    """bool Tensor[N, height, width]: pixel centres inside each box (x1, y1, x2, y2 float32 pixels)."""
    xc = torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5
    yc = torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    in_x = (x1 <= xc) & (xc < x2)  # (N, W)
    in_y = (y1 <= yc) & (yc < y2)  # (N, H)
    return in_y[:, :, None] & in_x[:, None, :]


def mask_logits(protos: Tensor, coeffs: Tensor, image_index: Tensor) -> Tensor:
    """Tensor[N, h, w] of coeffs_n . protos_image_index[n], in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if protos.dtype == torch.float64 else torch.float32
    num, (_, channels, h, w) = coeffs.shape[0], protos.shape
    logits = protos.new_zeros((num, h, w), dtype=acc)
    for b in image_index.unique().tolist():
        sel = (image_index == b).nonzero().flatten()
        logits[sel] = (coeffs[sel].to(acc) @ protos[b].to(acc).reshape(channels, h * w)).reshape(-1, h, w)
    return logits


def assemble_masks(
    protos: Tensor,
    coeffs: Tensor,
    image_index: Tensor,
    boxes: Tensor,
    out_size: tuple[int, int] | None = None,
    threshold: float | None = None,
) -> Tensor:
    """Reference of pyseg.ops.assemble_masks: Tensor[N, H, W] (dtype of protos, or bool with threshold)."""
    _, _, h, w = protos.shape
    out_h, out_w = (h, w) if out_size is None else (int(out_size[0]), int(out_size[1]))
    out_dtype = torch.bool if threshold is not None else protos.dtype
    if coeffs.shape[0] == 0 or 0 in (h, w, out_h, out_w):
        return protos.new_zeros((coeffs.shape[0], out_h, out_w), dtype=out_dtype)
    logits = mask_logits(protos, coeffs, image_index)
    boxes = boxes.float()
    if (out_h, out_w) != (h, w):
        logits = F.interpolate(logits[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        boxes = boxes * torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h], device=boxes.device)
    probs = logits.sigmoid() * box_crop(boxes, out_h, out_w)
    if threshold is not None:
        return probs > threshold
    return probs.to(protos.dtype)


def mask_targets(gt_masks: Tensor, gt_index: Tensor, image_index: Tensor, overlap: bool, dtype: torch.dtype) -> Tensor:
    """Tensor[N, h, w] targets: (gt_masks[image_index] == gt_index) if overlap else gt_masks[gt_index]."""
    if overlap:
        return (gt_masks[image_index] == gt_index[:, None, None]).to(dtype)
    return gt_masks[gt_index].to(dtype)


def mask_loss(
    protos: Tensor,
    coeffs: Tensor,
    image_index: Tensor,
    gt_masks: Tensor,
    gt_index: Tensor,
    boxes: Tensor,
    overlap: bool,
) -> Tensor:
    """Reference of pyseg.ops.mask_loss: Tensor[N], float32 (float64 for float64 inputs).

    loss_i = mean over the pixels of box i (proto pixels) of BCEWithLogits(logit_i, target_i);
    0 for a box that covers no pixel centre. Differentiable by autograd.
    """
    _, _, h, w = protos.shape
    logits = mask_logits(protos, coeffs, image_index)
    target = mask_targets(gt_masks, gt_index, image_index, overlap, logits.dtype)
    crop = box_crop(boxes.float(), h, w)
    area = crop.sum((1, 2))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    total = (bce * crop).sum((1, 2))
    return torch.where(area > 0, total / area.clamp(min=1), torch.zeros_like(total))
