"""Polygon rasterization: rasterize_polygons and rasterize_polygons_overlap."""

from __future__ import annotations

import torch
from torch import Tensor

from pyseg import _extension
from pyseg.ops import _checks, device_errors, reference


def rasterize_polygons(
    vertices: Tensor, poly_offsets: Tensor, poly_to_mask: Tensor, num_masks: int, height: int, width: int
) -> Tensor:
    """Rasterizes polygons into binary masks, straight at the output resolution.

    Args:
        vertices (Tensor[V, 2], float32, pixels of the output grid): x, y of all polygons, concatenated.
            To rasterize at mask ratio r, pass image-pixel vertices divided by r.
        poly_offsets (Tensor[P + 1], int64): polygon p is vertices[poly_offsets[p] : poly_offsets[p + 1]].
        poly_to_mask (Tensor[P], int64): the mask each polygon is drawn into; polygons of one mask are united.
        num_masks, height, width (int): output shape.

    Returns:
        Tensor[num_masks, height, width], uint8 in {0, 1}: pixel (x, y) is 1 when its centre
        (x + 0.5, y + 0.5) is inside a polygon of the mask under the even-odd rule. Polygons may be
        concave, self-intersecting or partly outside the grid; fewer than 3 vertices draw nothing.

    Raises:
        ValueError: bad shapes or dtypes, NaN/inf vertices, offsets or mask indices out of range (on CUDA,
            values are checked by the kernel: see pyseg.ops.device_errors).
    """
    if _extension.has_ops():
        masks = torch.ops.pyseg.rasterize_polygons(vertices, poly_offsets, poly_to_mask, num_masks, height, width)
        device_errors.after_op(vertices.device)
        return masks
    _extension.warn_fallback()
    _checks.check_polygons(vertices, poly_offsets, poly_to_mask, num_masks, height, width)
    return reference.rasterize_polygons(vertices, poly_offsets, poly_to_mask, num_masks, height, width)


def rasterize_polygons_overlap(
    vertices: Tensor,
    poly_offsets: Tensor,
    poly_to_mask: Tensor,
    image_index: Tensor,
    num_images: int,
    height: int,
    width: int,
) -> tuple[Tensor, Tensor]:
    """Rasterizes the instances of a batch into one index map per image (YOLO's "overlap" masks).

    Args:
        vertices, poly_offsets, poly_to_mask: as in rasterize_polygons; M = image_index.shape[0] masks.
        image_index (Tensor[M], int64): the image of each mask, in [0, num_images).
        num_images, height, width (int): output shape.

    Returns:
        index_map (Tensor[num_images, height, width], int32): 0 = background, k = the k-th mask of that
            image (1-based, in the given order). Masks are drawn largest first, so where instances overlap
            the smaller one stays visible (equal areas: the later one).
        areas (Tensor[M], int64): pixel count of each mask before overlap.
    """
    if _extension.has_ops():
        index_map, areas = torch.ops.pyseg.rasterize_polygons_overlap(
            vertices, poly_offsets, poly_to_mask, image_index, num_images, height, width
        )
        device_errors.after_op(vertices.device)
        return index_map, areas
    _extension.warn_fallback()
    _checks.check_image_index(image_index, num_images)
    _checks.check_polygons(vertices, poly_offsets, poly_to_mask, image_index.shape[0], height, width)
    return reference.rasterize_polygons_overlap(
        vertices, poly_offsets, poly_to_mask, image_index, num_images, height, width
    )


def _register_fakes() -> None:
    @torch.library.register_fake("pyseg::rasterize_polygons")
    def _(vertices, poly_offsets, poly_to_mask, num_masks, height, width):
        _checks.check_one_device(vertices=vertices, poly_offsets=poly_offsets, poly_to_mask=poly_to_mask)
        return vertices.new_empty((num_masks, height, width), dtype=torch.uint8)

    @torch.library.register_fake("pyseg::rasterize_polygons_overlap")
    def _(vertices, poly_offsets, poly_to_mask, image_index, num_images, height, width):
        _checks.check_one_device(
            vertices=vertices, poly_offsets=poly_offsets, poly_to_mask=poly_to_mask, image_index=image_index
        )
        return (
            vertices.new_empty((num_images, height, width), dtype=torch.int32),
            vertices.new_empty((image_index.shape[0],), dtype=torch.int64),
        )


if _extension.has_ops():
    _register_fakes()
