"""From model outputs to detections: scores, NMS, and masks assembled by pyseg.ops.assemble_masks."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from pyseg.engine.boxes import batched_nms
from pyseg.ops import assemble_masks


@dataclass
class Detections:
    """Detections of one image in input pixels: boxes (n, 4) xyxy, scores (n,), classes (n,), coeffs (n, K)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    coeffs: Tensor


@torch.no_grad()
def detect(
    outputs,
    strides: tuple[int, ...],
    reg_max: int,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> list[Detections]:
    """Best class per anchor, score > conf, class-aware NMS at iou, at most max_det per image."""
    boxes = decoded_boxes(outputs, strides, reg_max, torch.float32)
    scores = outputs.class_logits.float().sigmoid()
    return select_detections(boxes, scores, outputs.mask_coeffs, conf, iou, max_det, max_candidates)


def decoded_boxes(outputs, strides: tuple[int, ...], reg_max: int, dtype: torch.dtype | None = None) -> Tensor:
    """(B, A, 4) xyxy input pixels from the outputs' box distributions, computed in dtype (default: theirs)."""
    from pyseg.models.seg_model import decode_boxes, make_anchors

    distribution = outputs.box_distribution if dtype is None else outputs.box_distribution.to(dtype)
    anchors, stride = make_anchors(outputs.feature_shapes, strides, distribution.device, distribution.dtype)
    return decode_boxes(distribution, anchors, reg_max) * stride


@torch.no_grad()
def select_detections(
    boxes: Tensor,
    class_scores: Tensor,
    coeffs: Tensor,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> list[Detections]:
    """Detections from decoded outputs (a model's, or an exported file's raw outputs): boxes (B, A, 4) xyxy input
    pixels, class_scores (B, A, nc) in [0, 1], coeffs (B, A, K). Best class per anchor, score > conf, class-aware
    NMS at iou, at most max_det per image."""
    scores, classes = class_scores.float().max(-1)  # (B, A)
    results = []
    for b in range(scores.shape[0]):
        keep = scores[b] > conf
        box_b, score_b, class_b = boxes[b].float()[keep], scores[b][keep], classes[b][keep]
        coeff_b = coeffs[b][keep]
        if score_b.numel() > max_candidates:
            top = score_b.topk(max_candidates).indices
            box_b, score_b, class_b, coeff_b = box_b[top], score_b[top], class_b[top], coeff_b[top]
        kept = batched_nms(box_b, score_b, class_b, iou)[:max_det]
        results.append(Detections(box_b[kept], score_b[kept], class_b[kept], coeff_b[kept]))
    return results


# Detections crop their masks as Ultralytics does: pixel i (covering [i, i + 1) in input pixels) is kept when
# x1 <= i < x2, which is assemble_masks' pixel-centre rule (x1 <= i + 0.5 < x2) on the box shifted by half a pixel.
# An imported YOLO model thus gives the masks it gives in Ultralytics (tests/test_ultralytics_import.py).
CROP_SHIFT_PX = 0.5


def masks_in_input(protos: Tensor, detections: list[Detections], input_size: tuple[int, int]) -> list[Tensor]:
    """Binary masks (n, H, W) bool at the input size for each image's detections (one assemble_masks call), each
    cropped to its box by Ultralytics' rule (CROP_SHIFT_PX)."""
    _, _, proto_h, proto_w = protos.shape
    height, width = input_size
    counts = [d.boxes.shape[0] for d in detections]
    if sum(counts) == 0:
        return [torch.zeros((0, height, width), dtype=torch.bool, device=protos.device) for _ in detections]
    coeffs = torch.cat([d.coeffs for d in detections]).to(protos.dtype)
    image_index = torch.repeat_interleave(
        torch.arange(len(detections), device=protos.device), torch.tensor(counts, device=protos.device)
    )
    scale = torch.tensor([proto_w / width, proto_h / height] * 2, device=protos.device)
    boxes = (torch.cat([d.boxes for d in detections]).float() + CROP_SHIFT_PX) * scale
    masks = assemble_masks(protos, coeffs, image_index, boxes, (height, width), 0.5)
    return list(masks.split(counts))


def to_original(boxes: Tensor, masks: Tensor | None, ratio_pad, orig_size: tuple[int, int]):
    """Boxes (n, 4) and masks (n, S, S) from letterboxed input pixels to the original image (numpy)."""
    r, pad_x, pad_y = ratio_pad
    height, width = orig_size
    out_boxes = boxes.detach().float().cpu().numpy().copy()
    out_boxes[:, [0, 2]] = ((out_boxes[:, [0, 2]] - pad_x) / r).clip(0, width)
    out_boxes[:, [1, 3]] = ((out_boxes[:, [1, 3]] - pad_y) / r).clip(0, height)
    if masks is None:
        return out_boxes, None
    if masks.shape[0] == 0:
        return out_boxes, np.zeros((0, height, width), bool)
    x0, y0 = int(round(pad_x)), int(round(pad_y))
    x1, y1 = int(round(pad_x + width * r)), int(round(pad_y + height * r))
    crop = masks[:, y0:y1, x0:x1].to(torch.uint8).cpu().numpy()
    resized = [cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in crop]
    return out_boxes, np.stack(resized).astype(bool)
