"""Fused mask loss: cropped, area-normalized BCE of assembled mask logits, forward and backward."""

from __future__ import annotations

import torch
from torch import Tensor

from pyseg import _extension
from pyseg.ops import _checks, device_errors, reference


def mask_loss(
    protos: Tensor,
    coeffs: Tensor,
    image_index: Tensor,
    gt_masks: Tensor,
    gt_index: Tensor,
    boxes: Tensor,
    *,
    overlap: bool | None = None,
) -> Tensor:
    """Per-instance mask loss, fused: never builds an [N, h, w] float tensor (forward or backward).

    Args:
        protos (Tensor[B, K, h, w], float): mask prototypes; differentiable.
        coeffs (Tensor[N, K], dtype of protos): coefficients of the positive predictions; differentiable.
        image_index (Tensor[N], int64): the image of each prediction, in [0, B).
        gt_masks: either an overlap index map (Tensor[B, h, w], signed integer: int8 to int64) whose pixels hold
            the 1-based instance id of their image, or per-instance masks (Tensor[G, h, w], bool/uint8
            for binary, float for soft targets), always at proto resolution.
        gt_index (Tensor[N], int64): the matched instance: its id in the map (overlap) or its row of gt_masks.
        boxes (Tensor[N, 4], float32, xyxy in proto pixels): the region each loss is averaged over.
        overlap (bool or None): how to read gt_masks; None infers it from the dtype (int8/int16/int32/int64
            -> index map; bool/uint8/float -> per-instance masks).

    Returns:
        Tensor[N], float32 (float64 for float64 inputs): mean over the pixels whose centres lie in box i
        of BCEWithLogits(coeffs_i . protos_image_index[i], target_i); 0 for a box covering no pixel.
    """
    if overlap is None:
        overlap = gt_masks.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    if boxes.dtype != torch.float32:
        boxes = boxes.float()
    if _extension.has_ops():
        loss = torch.ops.pyseg.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap)
        device_errors.after_op(protos.device)
        return loss
    _extension.warn_fallback()
    _checks.check_mask_head(protos, coeffs, image_index, boxes)
    _checks.check_targets(protos, coeffs, gt_masks, gt_index, overlap)
    return reference.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap)


def _accumulation_dtype(protos: Tensor) -> torch.dtype:
    return torch.float64 if protos.dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output) -> None:
    protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap = inputs
    ctx.save_for_backward(protos, coeffs, image_index, gt_masks, gt_index, boxes)
    ctx.overlap = overlap


def _backward(ctx, grad_loss):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = ctx.saved_tensors
    grad_protos, grad_coeffs = torch.ops.pyseg.mask_loss_backward(
        grad_loss.contiguous(), protos, coeffs, image_index, gt_masks, gt_index, boxes, ctx.overlap
    )
    device_errors.after_op(protos.device)
    return grad_protos, grad_coeffs, None, None, None, None, None


def _register() -> None:
    @torch.library.register_fake("pyseg::mask_loss")
    def _(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap):
        _checks.check_one_device(
            protos=protos, coeffs=coeffs, image_index=image_index, gt_masks=gt_masks, gt_index=gt_index, boxes=boxes
        )
        return protos.new_empty((coeffs.shape[0],), dtype=_accumulation_dtype(protos))

    @torch.library.register_fake("pyseg::mask_loss_backward")
    def _(grad_loss, protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap):
        _checks.check_one_device(
            protos=protos,
            grad_loss=grad_loss,
            coeffs=coeffs,
            image_index=image_index,
            gt_masks=gt_masks,
            gt_index=gt_index,
            boxes=boxes,
        )
        # The kernels return contiguous gradients whatever the strides of protos (e.g. channels_last).
        return protos.new_empty(protos.shape), coeffs.new_empty(coeffs.shape)

    torch.library.register_autograd("pyseg::mask_loss", _backward, setup_context=_setup_context)


if _extension.has_ops():
    _register()
