"""Segmentation loss: task-aligned assignment, CIoU + DFL box loss, BCE class loss, fused mask loss.

All boxes here are xyxy in input-image pixels unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyseg.engine.boxes import complete_box_iou_loss
from pyseg.ops import mask_loss


def pairwise_iou(boxes_a: Tensor, boxes_b: Tensor, eps: float = 1e-9) -> Tensor:
    """IoU of every pair: boxes_a (B, M, 4), boxes_b (B, A, 4) xyxy -> (B, M, A)."""
    lo = torch.maximum(boxes_a[:, :, None, :2], boxes_b[:, None, :, :2])
    hi = torch.minimum(boxes_a[:, :, None, 2:], boxes_b[:, None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (boxes_a[..., 2:] - boxes_a[..., :2]).clamp(min=0).prod(-1)
    area_b = (boxes_b[..., 2:] - boxes_b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter + eps)


@dataclass
class Assignment:
    """Targets of every anchor: (B, A) labels and gt indices, (B, A, 4) boxes, (B, A, C) soft scores, (B, A) fg."""

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    foreground: Tensor
    gt_index: Tensor


class TaskAlignedAssigner:
    """Assigns anchors to ground truth by the alignment metric score^alpha * IoU^beta.

    Candidates are anchors whose centres lie inside a gt box; each gt takes its top-k candidates; an anchor
    claimed by several gts goes to the one it overlaps most. Target scores are the alignment metric,
    normalized per gt so that its best anchor scores the gt's best IoU.
    """

    def __init__(self, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
        self.num_classes, self.topk, self.alpha, self.beta, self.eps = num_classes, topk, alpha, beta, eps

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: Tensor,  # (B, A, C) probabilities
        pred_boxes: Tensor,  # (B, A, 4) xyxy px
        anchor_points: Tensor,  # (A, 2) px
        gt_labels: Tensor,  # (B, M) int64
        gt_boxes: Tensor,  # (B, M, 4) xyxy px
        gt_valid: Tensor,  # (B, M) bool
    ) -> Assignment:
        batch, anchors, _ = pred_scores.shape
        num_gt = gt_boxes.shape[1]
        device = pred_scores.device
        if num_gt == 0:
            return Assignment(
                torch.zeros((batch, anchors), dtype=torch.int64, device=device),
                torch.zeros((batch, anchors, 4), device=device),
                torch.zeros_like(pred_scores),
                torch.zeros((batch, anchors), dtype=torch.bool, device=device),
                torch.zeros((batch, anchors), dtype=torch.int64, device=device),
            )
        left_top = anchor_points[None, None] - gt_boxes[:, :, None, :2]
        right_bottom = gt_boxes[:, :, None, 2:] - anchor_points[None, None]
        candidates = (torch.cat([left_top, right_bottom], -1).amin(-1) > self.eps) & gt_valid[:, :, None]  # (B,M,A)

        class_index = gt_labels.clamp(0, self.num_classes - 1)[:, :, None].expand(-1, -1, anchors)
        scores = pred_scores.transpose(1, 2).gather(1, class_index)  # (B, M, A)
        ious = pairwise_iou(gt_boxes, pred_boxes).clamp(min=0) * candidates
        metric = scores.pow(self.alpha) * ious.pow(self.beta) * candidates

        top = metric.topk(min(self.topk, anchors), dim=-1).indices  # (B, M, k)
        positive = torch.zeros_like(candidates).scatter_(-1, top, True) & candidates
        claims = positive.sum(1)  # (B, A)
        # An anchor claimed by several boxes keeps the one it overlaps most (computed always: no host sync).
        best_gt = (ious * positive).argmax(1)  # (B, A)
        best = F.one_hot(best_gt, num_gt).transpose(1, 2).bool()
        positive = torch.where((claims > 1)[:, None, :], best & positive, positive)
        foreground = positive.any(1)
        gt_index = positive.to(torch.uint8).argmax(1)  # (B, A)
        labels = gt_labels.gather(1, gt_index)
        boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))

        metric = metric * positive
        best_metric = metric.amax(-1, keepdim=True)  # (B, M, 1)
        best_iou = (ious * positive).amax(-1, keepdim=True)
        # Early on, IoU^beta is tiny (1e-15 and less): normalize by the best metric itself, never by an epsilon
        # that could swamp it, or the box loss (weighted by these scores) vanishes and boxes never shrink.
        normalized = (metric * best_iou / best_metric.clamp(min=torch.finfo(metric.dtype).tiny)).amax(1)  # (B, A)
        target_scores = F.one_hot(labels.clamp(0, self.num_classes - 1), self.num_classes).to(pred_scores.dtype)
        target_scores = target_scores * (normalized * foreground)[..., None]
        return Assignment(labels, boxes, target_scores, foreground, gt_index)


DFL_EDGE_MARGIN = 0.01  # bins: keeps a target off the last bin so that its right neighbour exists


def dfl_loss(distribution: Tensor, target: Tensor, reg_max: int) -> Tensor:
    """Distribution focal loss: distribution (P, 4, reg_max) logits, target (P, 4) distances in bins -> (P,)."""
    target = target.clamp(0, reg_max - 1 - DFL_EDGE_MARGIN)
    left = target.long()
    weight_right = target - left
    logits = distribution.reshape(-1, reg_max)
    loss = F.cross_entropy(logits, left.reshape(-1), reduction="none") * (1 - weight_right).reshape(-1)
    loss = loss + F.cross_entropy(logits, (left + 1).reshape(-1), reduction="none") * weight_right.reshape(-1)
    return loss.reshape(-1, 4).mean(-1)


def instances_per_image(image_index: Tensor, batch_size: int) -> Tensor:
    """int64 Tensor[batch_size]: instances of each image (torch.bincount, without its host sync on a GPU)."""
    counts = torch.zeros(batch_size, dtype=torch.int64, device=image_index.device)
    return counts.index_add_(0, image_index, torch.ones_like(image_index))


def pad_targets(batch: dict, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image padding of the flat targets: labels (B, M) int64, boxes (B, M, 4), valid (B, M), has_mask (B, M).

    Instance j of image b (in batch order) lands in column j, so column + 1 is its id in the overlap index map.
    """
    image_index = batch["image_index"]
    device = image_index.device
    counts = instances_per_image(image_index, batch_size)
    num_max = batch.get("max_instances")  # from the collate (no host sync); else counted here
    if num_max is None:
        num_max = int(counts.max()) if image_index.numel() else 0
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(image_index, stable=True)
    rank = torch.empty_like(image_index)
    rank[order] = torch.arange(image_index.numel(), device=device) - first[image_index[order]]
    labels = torch.zeros((batch_size, num_max), dtype=torch.int64, device=device)
    boxes = torch.zeros((batch_size, num_max, 4), device=device)
    valid = torch.zeros((batch_size, num_max), dtype=torch.bool, device=device)
    has_mask = torch.zeros((batch_size, num_max), dtype=torch.bool, device=device)
    labels[image_index, rank] = batch["classes"]
    boxes[image_index, rank] = batch["boxes"].float()
    valid[image_index, rank] = True
    has_mask[image_index, rank] = batch["has_mask"]
    return labels, boxes, valid, has_mask


class SegLoss:
    """The training loss of SegModel outputs against a batch from pyseg.data (on the model's device).

    gains: box (CIoU), cls (BCE), dfl, mask. Returns (loss scaled by the batch size, dict of detached parts).
    """

    def __init__(
        self,
        num_classes: int,
        reg_max: int,
        strides: tuple[int, ...],
        gains: dict[str, float],
        overlap_mask: bool = True,
        topk: int = 10,
    ):
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, strides
        self.gains = gains
        self.overlap_mask = overlap_mask
        self.assigner = TaskAlignedAssigner(num_classes, topk=topk)

    def __call__(self, outputs, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        from pyseg.models.seg_model import decode_boxes, make_anchors

        distribution, class_logits = outputs.box_distribution, outputs.class_logits
        batch_size, anchors, _ = class_logits.shape
        anchor_points, stride = make_anchors(outputs.feature_shapes, self.strides, class_logits.device, torch.float32)
        pred_boxes = decode_boxes(distribution.float(), anchor_points, self.reg_max) * stride  # (B, A, 4) px
        labels, gt_boxes, valid, gt_has_mask = pad_targets(batch, batch_size)
        assignment = self.assigner(
            class_logits.detach().float().sigmoid(),
            pred_boxes.detach(),
            anchor_points * stride,
            labels,
            gt_boxes,
            valid,
        )
        score_sum = assignment.scores.sum().clamp(min=1.0)
        cls = F.binary_cross_entropy_with_logits(class_logits.float(), assignment.scores, reduction="sum") / score_sum

        # The foreground anchors, found once (the one host sync of the loss): flat indices into (B * A).
        fg = torch.nonzero(assignment.foreground.flatten()).squeeze(1)  # (P,)
        weight = assignment.scores.sum(-1).flatten()[fg]  # (P,)
        target_boxes = assignment.boxes.flatten(0, 1)[fg]
        box = (complete_box_iou_loss(pred_boxes.flatten(0, 1)[fg], target_boxes) * weight).sum()
        box = box / score_sum
        anchor_fg, stride_fg = anchor_points[fg % anchors], stride[fg % anchors]  # flat index -> its anchor
        target_ltrb = torch.cat(
            [anchor_fg - target_boxes[:, :2] / stride_fg, target_boxes[:, 2:] / stride_fg - anchor_fg], -1
        )
        pred_dist = distribution.flatten(0, 1)[fg].float().reshape(-1, 4, self.reg_max)
        dfl = (dfl_loss(pred_dist, target_ltrb, self.reg_max) * weight).sum() / score_sum
        mask = self._mask_loss(outputs, batch, assignment, gt_has_mask)
        parts = {
            "box": box * self.gains["box"],
            "cls": cls * self.gains["cls"],
            "dfl": dfl * self.gains["dfl"],
            "mask": mask * self.gains["mask"],
        }
        # Zero-valued terms keep every head in the graph when a batch has no (masked) foreground:
        # DistributedDataParallel requires every parameter to receive a gradient in each step.
        connected = (distribution.sum() + outputs.mask_coeffs.sum() + outputs.protos.sum()).float() * 0.0
        total = (sum(parts.values()) + connected) * batch_size
        return total, {k: v.detach() for k, v in parts.items()}

    def _mask_loss(self, outputs, batch, assignment: Assignment, gt_has_mask: Tensor) -> Tensor:
        protos = outputs.protos
        _, _, proto_h, proto_w = protos.shape
        masks = batch["masks"]
        if tuple(masks.shape[-2:]) != (proto_h, proto_w):
            raise ValueError(
                f"ground-truth masks are {tuple(masks.shape[-2:])} but the prototypes are {(proto_h, proto_w)}: "
                "use mask_ratio 4 (the prototype stride)"
            )
        fg = torch.nonzero(assignment.foreground & gt_has_mask.gather(1, assignment.gt_index))  # (P, 2): image, anchor
        image_index, anchor = fg[:, 0], fg[:, 1]
        gt_index = assignment.gt_index[image_index, anchor]  # padded index within the image
        boxes_px = assignment.boxes[image_index, anchor]
        scale = torch.tensor(
            [proto_w / batch["images"].shape[3], proto_h / batch["images"].shape[2]] * 2, device=boxes_px.device
        )
        if self.overlap_mask:
            targets = gt_index + 1  # ids in the overlap map are 1-based ranks within the image
        else:
            # Row of the per-instance mask: the flat instance whose image and rank match.
            counts = instances_per_image(batch["image_index"], protos.shape[0])
            targets = (torch.cumsum(counts, 0) - counts)[image_index] + gt_index
        coeffs = outputs.mask_coeffs[image_index, anchor]
        losses = mask_loss(
            protos, coeffs.to(protos.dtype), image_index, masks, targets, boxes_px * scale, overlap=self.overlap_mask
        )
        # The mean over positives (0 without any; the count is known on the host: no sync).
        return losses.sum() / max(losses.shape[0], 1)
