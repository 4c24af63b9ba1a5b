"""TaskAlignedAssigner on hand-built cases, DFL, target padding."""

from __future__ import annotations

import torch

from pyseg.engine.loss import TaskAlignedAssigner, dfl_loss, pad_targets, pairwise_iou


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
