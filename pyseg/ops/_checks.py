"""Input checks of the Python wrappers, mirroring those of the native kernels (ValueError naming the argument).

The native kernels check their inputs themselves; these run before the reference fallback and
for checks that are clearer in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_polygons(
    vertices: Tensor, poly_offsets: Tensor, poly_to_mask: Tensor, num_masks: int, height: int, width: int
) -> None:
    if vertices.dim() != 2 or vertices.shape[1] != 2:
        raise ValueError(f"vertices must have shape [V, 2], got {tuple(vertices.shape)}")
    if vertices.dtype != torch.float32:
        raise ValueError(f"vertices must be float32 (pixels), got {vertices.dtype}")
    if poly_offsets.dim() != 1 or poly_offsets.shape[0] < 1:
        raise ValueError(f"poly_offsets must have shape [P + 1], got {tuple(poly_offsets.shape)}")
    if poly_offsets.dtype != torch.int64 or poly_to_mask.dtype != torch.int64:
        raise ValueError(f"poly_offsets and poly_to_mask must be int64, got {poly_offsets.dtype}, {poly_to_mask.dtype}")
    num_polys = poly_offsets.shape[0] - 1
    if tuple(poly_to_mask.shape) != (num_polys,):
        raise ValueError(f"poly_to_mask must have shape [P] = [{num_polys}], got {tuple(poly_to_mask.shape)}")
    if num_masks < 0 or height < 0 or width < 0:
        raise ValueError(f"num_masks, height and width must be >= 0, got {num_masks}, {height}, {width}")
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("vertices must be finite: found NaN or inf; drop or repair those polygons first")
    offsets = poly_offsets.tolist()
    if offsets[0] != 0:
        raise ValueError(f"poly_offsets[0] must be 0, got {offsets[0]}")
    if offsets[-1] != vertices.shape[0]:
        raise ValueError(f"poly_offsets[-1] must equal the number of vertices {vertices.shape[0]}, got {offsets[-1]}")
    if any(a > b for a, b in zip(offsets[:-1], offsets[1:], strict=True)):
        raise ValueError("poly_offsets must be non-decreasing")
    if num_polys and not (0 <= int(poly_to_mask.min()) and int(poly_to_mask.max()) < num_masks):
        raise ValueError(f"poly_to_mask values must lie in [0, num_masks = {num_masks})")


def check_image_index(image_index: Tensor, num_images: int) -> None:
    if image_index.dim() != 1 or image_index.dtype != torch.int64:
        raise ValueError(f"image_index must be an int64 Tensor[M], got {image_index.dtype} {tuple(image_index.shape)}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if image_index.numel() and not (0 <= int(image_index.min()) and int(image_index.max()) < num_images):
        raise ValueError(f"image_index values must lie in [0, num_images = {num_images})")


def check_mask_head(protos: Tensor, coeffs: Tensor, image_index: Tensor, boxes: Tensor) -> None:
    if protos.dim() != 4:
        raise ValueError(f"protos must have shape [B, K, h, w], got {tuple(protos.shape)}")
    if not protos.is_floating_point():
        raise ValueError(f"protos must be a floating dtype, got {protos.dtype}")
    if coeffs.dim() != 2 or coeffs.shape[1] != protos.shape[1]:
        raise ValueError(
            f"coeffs must have shape [N, K] with K = {protos.shape[1]} (protos.shape[1]), got {tuple(coeffs.shape)}"
        )
    if coeffs.dtype != protos.dtype:
        raise ValueError(f"coeffs must have the dtype of protos ({protos.dtype}), got {coeffs.dtype}")
    num = coeffs.shape[0]
    if tuple(image_index.shape) != (num,) or image_index.dtype != torch.int64:
        raise ValueError(
            f"image_index must be an int64 Tensor[N] = [{num}], got {image_index.dtype} {tuple(image_index.shape)}"
        )
    if tuple(boxes.shape) != (num, 4):
        raise ValueError(
            f"boxes must have shape [N, 4] = [{num}, 4] (x1, y1, x2, y2 in proto pixels), got {tuple(boxes.shape)}"
        )
    for name, t in (("coeffs", coeffs), ("image_index", image_index), ("boxes", boxes)):
        if t.device != protos.device:
            raise ValueError(f"{name} must be on the device of protos ({protos.device}), got {t.device}")
    if num and not (0 <= int(image_index.min()) and int(image_index.max()) < protos.shape[0]):
        raise ValueError(f"image_index values must lie in [0, B = {protos.shape[0]})")


def check_targets(protos: Tensor, coeffs: Tensor, gt_masks: Tensor, gt_index: Tensor, overlap: bool) -> None:
    _, _, h, w = protos.shape
    if gt_masks.dim() != 3 or tuple(gt_masks.shape[1:]) != (h, w):
        raise ValueError(
            f"gt_masks must have shape [*, {h}, {w}] (the proto grid), got {tuple(gt_masks.shape)}; rasterize "
            "the ground truth at mask resolution"
        )
    if tuple(gt_index.shape) != (coeffs.shape[0],) or gt_index.dtype != torch.int64:
        raise ValueError(
            f"gt_index must be an int64 Tensor[N] = [{coeffs.shape[0]}], got {gt_index.dtype} {tuple(gt_index.shape)}"
        )
    if gt_masks.device != protos.device or gt_index.device != protos.device:
        raise ValueError(f"gt_masks and gt_index must be on the device of protos ({protos.device})")
    if overlap:
        if gt_masks.shape[0] != protos.shape[0]:
            raise ValueError(
                f"gt_masks as an overlap index map must have one map per image: shape [{protos.shape[0]}, {h}, {w}],"
                f" got {tuple(gt_masks.shape)}"
            )
        if gt_masks.is_floating_point() or gt_masks.dtype == torch.bool:
            raise ValueError(f"gt_masks as an overlap index map must be an integer dtype, got {gt_masks.dtype}")
    elif gt_index.numel() and not (0 <= int(gt_index.min()) and int(gt_index.max()) < gt_masks.shape[0]):
        raise ValueError(f"gt_index values must lie in [0, G = {gt_masks.shape[0]}) (rows of gt_masks)")


def check_one_device(**tensors: Tensor) -> None:
    """ValueError unless every tensor is on the device of the first (the fakes' check: a meta tensor among CPU or
    CUDA ones makes the dispatcher pick the fake, which must refuse it as the kernels do)."""
    (first, reference), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != reference.device:
            raise ValueError(f"{name} must be on the device of {first} ({reference.device}), got {tensor.device}")
