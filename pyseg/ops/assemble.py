"""Fused mask assembly: prototypes x coefficients -> sigmoid -> crop -> (resize) -> (threshold)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyseg import _extension
from pyseg.ops import _checks, device_errors, reference


def assemble_masks(
    protos: Tensor,
    coeffs: Tensor,
    image_index: Tensor,
    boxes: Tensor,
    out_size: Sequence[int] | None = None,
    threshold: float | None = None,
) -> Tensor:
    """Instance masks from prototypes and coefficients, computed only inside each box.

    Args:
        protos (Tensor[B, K, h, w], float32/float16/bfloat16): mask prototypes of each image.
        coeffs (Tensor[N, K], dtype of protos): mask coefficients of each instance.
        image_index (Tensor[N], int64): the image of each instance, in [0, B).
        boxes (Tensor[N, 4], float32, xyxy in proto pixels): the crop of each instance.
        out_size ((H, W) or None): resample the logits bilinearly to this size
            (as F.interpolate(mode="bilinear", align_corners=False)); boxes are scaled alike.
        threshold (float in [0, 1) or None): return probability > threshold as bool.

    Returns:
        Tensor[N, H, W]: sigmoid(coeffs_n . protos_b) inside box n (pixel centres in [x1, x2) x [y1, y2)),
        0 outside; dtype of protos (accumulated in float32), or bool with threshold.
    """
    if out_size is not None:
        out_size = [int(s) for s in out_size]
        if len(out_size) != 2 or min(out_size) < 0:
            raise ValueError(f"out_size must be (H, W) with H, W >= 0, got {out_size}")
    if threshold is not None and not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"threshold must lie in [0, 1) (a probability), got {threshold}")
    if boxes.dtype != torch.float32:
        boxes = boxes.float()
    if _extension.has_ops():
        masks = torch.ops.pyseg.assemble_masks(protos, coeffs, image_index, boxes, out_size, threshold)
        device_errors.after_op(protos.device)
        return masks
    _extension.warn_fallback()
    _checks.check_mask_head(protos, coeffs, image_index, boxes)
    return reference.assemble_masks(protos, coeffs, image_index, boxes, out_size, threshold)


def _register_fakes() -> None:
    @torch.library.register_fake("pyseg::assemble_masks")
    def _(protos, coeffs, image_index, boxes, out_size=None, threshold=None):
        _checks.check_one_device(protos=protos, coeffs=coeffs, image_index=image_index, boxes=boxes)
        height, width = (protos.shape[2], protos.shape[3]) if out_size is None else out_size
        dtype = torch.bool if threshold is not None else protos.dtype
        return protos.new_empty((coeffs.shape[0], height, width), dtype=dtype)


if _extension.has_ops():
    _register_fakes()
