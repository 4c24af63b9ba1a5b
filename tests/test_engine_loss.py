"""TaskAlignedAssigner on hand-built cases, DFL, target padding, SegLoss with both forms of mask targets."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from pyseg.data.dataset import SegDataset
from pyseg.data.labels import ImageLabels
from pyseg.data.loader import SegCollate
from pyseg.engine.loss import SegLoss, TaskAlignedAssigner, dfl_loss, pad_targets, pairwise_iou
from pyseg.models import build_model


def grid_anchors(size: int, stride: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride + stride / 2


def test_assigner_picks_the_best_aligned_anchors_inside_the_box():
    anchors = grid_anchors(8, 8)  # 64 anchors, centres 4, 12, ..., 60 px
    gt_box = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]])  # covers anchor centres 12..36 -> 4 x 4 = 16 candidates
    pred_boxes = torch.zeros((1, 64, 4))
    pred_boxes[0] = torch.cat([anchors - 16, anchors + 16], -1)  # 32 px boxes centred on each anchor
    scores = torch.full((1, 64, 3), 0.1)
    best = int(((anchors - 24).abs().sum(-1)).argmin())  # an anchor near the box centre
    scores[0, best, 2] = 0.9
    assignment = TaskAlignedAssigner(num_classes=3, topk=5)(
        scores, pred_boxes, anchors, torch.tensor([[2]]), gt_box, torch.tensor([[True]])
    )
    fg = assignment.foreground[0]
    assert int(fg.sum()) == 5  # top-k of the candidates
    centres = anchors[fg]
    assert bool(((centres > 8) & (centres < 40)).all())  # all inside the gt box
    assert bool(fg[best])
    assert bool((assignment.labels[0][fg] == 2).all())
    ious = pairwise_iou(gt_box, pred_boxes)[0, 0]
    target = assignment.scores[0, :, 2]
    assert torch.isclose(target.max(), ious[fg].max(), atol=1e-5)  # best anchor scores the best IoU
    assert float(assignment.scores[0, ~fg].abs().sum()) == 0.0
    assert float(assignment.scores[0, :, :2].abs().sum()) == 0.0


def test_an_anchor_claimed_by_two_boxes_goes_to_the_one_it_overlaps_most():
    anchors = torch.tensor([[20.0, 20.0]])
    pred = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]])
    gts = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [12.0, 12.0, 28.0, 28.0]]])  # IoU 0.25 and 0.64
    assignment = TaskAlignedAssigner(num_classes=2, topk=3)(
        torch.full((1, 1, 2), 0.5), pred, anchors, torch.tensor([[0, 1]]), gts, torch.tensor([[True, True]])
    )
    assert bool(assignment.foreground[0, 0]) and int(assignment.gt_index[0, 0]) == 1
    assert int(assignment.labels[0, 0]) == 1


def test_no_ground_truth_means_no_foreground():
    assignment = TaskAlignedAssigner(num_classes=2)(
        torch.rand(2, 10, 2),
        torch.rand(2, 10, 4),
        torch.rand(10, 2),
        torch.zeros((2, 0), dtype=torch.int64),
        torch.zeros((2, 0, 4)),
        torch.zeros((2, 0), dtype=torch.bool),
    )
    assert not bool(assignment.foreground.any()) and float(assignment.scores.sum()) == 0.0


def test_dfl_is_smallest_at_the_target_bins():
    target = torch.tensor([[2.25, 0.0, 5.5, 14.0]])
    exact = torch.full((1, 4, 16), -20.0)
    exact[0, 0, 2], exact[0, 0, 3] = 0.75 * 20, 0.25 * 20
    uniform = torch.zeros((1, 4, 16))
    assert float(dfl_loss(uniform, target, 16)) > float(dfl_loss(exact, target, 16)) >= 0


def test_pad_targets_keeps_batch_order_within_images():
    batch = {
        "image_index": torch.tensor([0, 0, 2, 0]),
        "classes": torch.tensor([1, 2, 3, 4]),
        "boxes": torch.arange(16.0).reshape(4, 4),
        "has_mask": torch.tensor([True, False, True, True]),
    }
    labels, boxes, valid, has_mask = pad_targets(batch, 3)
    assert labels.tolist() == [[1, 2, 4], [0, 0, 0], [3, 0, 0]]
    assert valid.sum().item() == 4 and has_mask.tolist()[0] == [True, False, True]
    assert boxes[2, 0].tolist() == [8.0, 9.0, 10.0, 11.0]


# ------------------------------------------------------------------ mask loss: overlap map vs per-instance masks


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def polygon_batches(tmp_path, images: list[list[np.ndarray]], size: int = 64) -> tuple[dict, dict]:
    """(overlap batch, per-instance batch) of the same samples: one grey image per entry of `images`, each with the
    given polygons (normalized xy, class 0), through SegDataset (letterbox only) and SegCollate."""
    labels = []
    for i, polygons in enumerate(images):
        path = tmp_path / f"image{i}.png"
        cv2.imwrite(str(path), np.full((size, size, 3), 40 + 50 * i, np.uint8))
        boxes = np.array([np.concatenate([p.min(0), p.max(0)]) for p in polygons], np.float32).reshape(-1, 4)
        labels.append(ImageLabels(str(path), size, size, np.zeros(len(polygons), np.int64), boxes, polygons))
    dataset = SegDataset(labels, size, None)
    samples = [dataset[i] for i in range(len(dataset))]
    return SegCollate(4, overlap_mask=True)(samples), SegCollate(4, overlap_mask=False)(samples)


def mask_losses(batch_overlap: dict, batch_per_instance: dict) -> tuple[float, float, dict]:
    """Mask loss of the same pyseg-n outputs (seeded weights) against both batches, and the overlap parts."""
    torch.manual_seed(0)
    model = build_model("pyseg-n", 1)
    with torch.no_grad():
        outputs = model(batch_overlap["images"].float() / 255.0)
        gains = {"box": 1.0, "cls": 1.0, "dfl": 1.0, "mask": 1.0}
        _, overlap_parts = SegLoss(1, model.reg_max, model.strides, gains, overlap_mask=True)(outputs, batch_overlap)
        _, per_instance_parts = SegLoss(1, model.reg_max, model.strides, gains, overlap_mask=False)(
            outputs, batch_per_instance
        )
    overlap_parts = {k: float(v) for k, v in overlap_parts.items()}  # parts are 0-d tensors (no sync in the loss)
    per_instance_parts = {k: float(v) for k, v in per_instance_parts.items()}
    for key in ("box", "cls", "dfl"):  # the same assignment either way: only the mask targets' form differs
        assert per_instance_parts[key] == overlap_parts[key], key
    return overlap_parts["mask"], per_instance_parts["mask"], overlap_parts


def test_per_instance_masks_give_the_overlap_map_loss_when_instances_do_not_overlap(tmp_path):
    # Image 1 has no instance: the per-instance rows of image 2 start right after image 0's (rank + first row).
    triangle = np.array([[0.1, 0.1], [0.45, 0.15], [0.2, 0.5]], np.float32)
    images = [[triangle, square(0.55, 0.5, 0.9, 0.9)], [], [square(0.2, 0.3, 0.7, 0.8)]]
    batch_overlap, batch_per_instance = polygon_batches(tmp_path, images)
    assert batch_per_instance["masks"].shape == (3, 16, 16) and batch_overlap["masks"].shape == (3, 16, 16)
    for row, (image, rank) in enumerate([(0, 1), (0, 2), (2, 1)]):  # disjoint: the two forms hold the same pixels
        assert torch.equal(batch_per_instance["masks"][row].bool(), batch_overlap["masks"][image] == rank)
    overlap, per_instance, _ = mask_losses(batch_overlap, batch_per_instance)
    assert overlap > 0.1  # a seeded model's masks are far from the targets: the loss is not a trivial 0
    assert per_instance == pytest.approx(overlap, rel=1e-6)


def test_overlapping_instances_lose_the_covered_pixels_only_in_the_overlap_map(tmp_path):
    # A small square inside a big one. The overlap map draws the smaller instance on top, so the big instance's
    # target is the big square minus the small one; per-instance masks keep the whole big square. Same predictions,
    # other targets inside the big box: a different, finite loss. Per-instance masks cut out of the overlap map
    # (target k = map == k + 1) must give exactly the overlap loss again.
    images = [[square(0.1, 0.1, 0.9, 0.9), square(0.35, 0.35, 0.65, 0.65)], [square(0.2, 0.2, 0.6, 0.7)]]
    batch_overlap, batch_per_instance = polygon_batches(tmp_path, images)
    big, small = batch_per_instance["masks"][0].bool(), batch_per_instance["masks"][1].bool()
    assert bool((small & big).any()) and torch.equal(small, batch_overlap["masks"][0] == 2)
    assert torch.equal(batch_overlap["masks"][0] == 1, big & ~small)
    overlap, per_instance, _ = mask_losses(batch_overlap, batch_per_instance)
    assert math.isfinite(overlap) and math.isfinite(per_instance) and overlap > 0 and per_instance > 0
    assert abs(overlap - per_instance) > 1e-4 * overlap

    cut = dict(batch_per_instance)
    index_map = batch_overlap["masks"]
    cut["masks"] = torch.stack([index_map[0] == 1, index_map[0] == 2, index_map[1] == 1]).to(torch.uint8)
    _, from_map, _ = mask_losses(batch_overlap, cut)
    assert from_map == pytest.approx(overlap, rel=1e-6)
