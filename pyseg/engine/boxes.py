"""Box ops of training and prediction: the CIoU box loss and class-aware NMS.

NMS runs torchvision's compiled kernel (torch.ops.torchvision.nms), loaded from torchvision's library without
importing its Python package: `import torchvision` imports its model zoo and, through it, torch._dynamo, 2.4 s of
CPU in every training process, Ray worker and command. Where the library cannot be found that way, the package is
imported as usual.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
from pathlib import Path

import torch
from torch import Tensor

# torchvision's compiled ops library, by the names it has had (0.29: _C_stable; before: _C)
_TORCHVISION_LIBRARIES = ("_C_stable", "_C")

# Above this many box coordinates, one NMS per class beats one NMS over offset boxes (as torchvision decides).
_PER_CLASS_ABOVE = {"cpu": 4_000}
_PER_CLASS_ABOVE_ELSEWHERE = 20_000

_nms_kernel = None


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: the indices (Tensor[K], int64) of the boxes kept, by decreasing score.

    Args:
        boxes (Tensor[N, 4], float, xyxy pixels), scores (Tensor[N], float), iou_threshold: boxes that overlap a
        higher-scoring kept box by more than this IoU are dropped.
    """
    global _nms_kernel
    if _nms_kernel is None:
        _nms_kernel = torchvision_nms_kernel()
    return _nms_kernel(boxes, scores, float(iou_threshold))


def torchvision_nms_kernel():
    """torch.ops.torchvision.nms: already registered, else loaded from torchvision's library file, else (a layout
    this does not know) from `import torchvision`."""
    if _registered_nms() is not None:
        return _registered_nms()
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    candidates = [folder / f"{name}{suffix}" for name in _TORCHVISION_LIBRARIES for suffix in _library_suffixes()]
    for library in (path for path in candidates if folder is not None and path.is_file()):
        try:
            torch.ops.load_library(str(library))
        except OSError:
            break
        if _registered_nms() is not None:
            return _registered_nms()
    import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision.*, or says why it cannot)

    return torch.ops.torchvision.nms


def _library_suffixes() -> list[str]:
    return [suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES if suffix.endswith((".so", ".pyd"))]


def _registered_nms():
    try:
        return torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        return None


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class: the indices (Tensor[K], int64) kept, by decreasing score.

    Args:
        boxes (Tensor[N, 4], float, xyxy pixels), scores (Tensor[N], float), classes (Tensor[N], int): boxes of
        different classes never suppress each other.
    """
    tracing = torch.jit.is_tracing()  # an export: one graph for any box count, the offset form
    if boxes.numel() == 0 and not tracing:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if not tracing and boxes.numel() > _PER_CLASS_ABOVE.get(boxes.device.type, _PER_CLASS_ABOVE_ELSEWHERE):
        kept = torch.zeros_like(scores, dtype=torch.bool)
        for label in torch.unique(classes):
            members = torch.where(classes == label)[0]
            kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        indices = torch.where(kept)[0]
        return indices[scores[indices].sort(descending=True)[1]]
    # one NMS: each class's boxes moved to a region of their own, past every other class's
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max() if tracing else boxes.max()
    offsets = classes.to(boxes) * (largest + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def complete_box_iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """CIoU loss of box pairs (Zheng et al., "Distance-IoU Loss", AAAI 2020): 1 - IoU, plus the squared distance of
    the centres over the squared diagonal of the enclosing box, plus alpha * v for the aspect ratios.

    Args:
        pred, target (Tensor[N, 4], float, xyxy): the boxes, paired row by row; pred is differentiable.
    Returns:
        Tensor[N] (float32, or float64 for float64 boxes): the loss of each pair, 0 for identical boxes.
    """
    if pred.dtype not in (torch.float32, torch.float64):
        pred, target = pred.float(), target.float()
    x1, y1, x2, y2 = pred.unbind(-1)
    gx1, gy1, gx2, gy2 = target.unbind(-1)
    overlap_w = (torch.min(x2, gx2) - torch.max(x1, gx1)).clamp(min=0)
    overlap_h = (torch.min(y2, gy2) - torch.max(y1, gy1)).clamp(min=0)
    overlap = overlap_w * overlap_h
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - overlap
    iou = overlap / (union + eps)
    enclosing_diagonal_sq = (torch.max(x2, gx2) - torch.min(x1, gx1)) ** 2
    enclosing_diagonal_sq = enclosing_diagonal_sq + (torch.max(y2, gy2) - torch.min(y1, gy1)) ** 2 + eps
    centre_distance_sq = ((x1 + x2 - gx1 - gx2) / 2) ** 2 + ((y1 + y2 - gy1 - gy2) / 2) ** 2
    aspect = (4 / math.pi**2) * (torch.atan((gx2 - gx1) / (gy2 - gy1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = aspect / (1 - iou + aspect + eps)
    return 1 - iou + centre_distance_sq / enclosing_diagonal_sq + alpha * aspect
