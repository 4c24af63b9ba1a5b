"""pyseg.engine.boxes: equal to torchvision's box ops (imported here only), without torchvision imported by pyseg."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pyseg.engine import boxes


def random_boxes(count: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * 200
    size = torch.rand(count, 2, generator=generator) * 60 + 1
    scores = torch.rand(count, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return torch.cat([corner, corner + size], 1), scores, labels


@pytest.mark.parametrize("count", [0, 1, 300, 2_000])  # 2,000 boxes: the one-NMS-per-class path
def test_batched_nms_keeps_what_torchvision_keeps_in_its_order(count):
    import torchvision.ops

    box, score, label = random_boxes(count, classes=5, seed=count)
    for iou in (0.3, 0.7):
        expected = torchvision.ops.batched_nms(box, score, label, iou)
        kept = boxes.batched_nms(box, score, label, iou)
        assert kept.dtype == torch.int64 and torch.equal(kept, expected), (count, iou)
    if count > 1:  # classes really are kept apart: one class for all suppresses more
        assert len(boxes.batched_nms(box, score, torch.zeros_like(label), 0.3)) < len(kept)


def test_ciou_loss_and_its_gradient_equal_torchvision():
    import torchvision.ops

    pred, _, _ = random_boxes(64, 1, seed=1)
    target, _, _ = random_boxes(64, 1, seed=2)
    target[:8] = pred[:8]  # identical pairs: loss 0
    loss = boxes.complete_box_iou_loss(pred.double(), target.double())
    expected = torchvision.ops.complete_box_iou_loss(pred.double(), target.double(), reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss[:8].abs().max() < 1e-6 and loss[8:].min() > 1e-3  # (eps / area from 0)
    torch.testing.assert_close(
        _grad(boxes.complete_box_iou_loss, pred, target),
        _grad(lambda p, t: torchvision.ops.complete_box_iou_loss(p, t, reduction="none"), pred, target),
    )
    half = boxes.complete_box_iou_loss(pred.half(), target.half())
    assert half.dtype == torch.float32  # upcast, as torchvision does


def _grad(loss_fn, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    leaf = pred.detach().double().requires_grad_()
    (gradient,) = torch.autograd.grad(loss_fn(leaf, target.double()).sum(), leaf)
    return gradient


def test_nms_falls_back_to_importing_torchvision_when_its_library_is_not_where_expected(monkeypatch):
    import torchvision.ops

    monkeypatch.setattr(boxes, "_TORCHVISION_LIBRARIES", ("no_such_library",))
    monkeypatch.setattr(boxes, "_registered_nms", lambda: None)
    kernel = boxes.torchvision_nms_kernel()
    box, score, _ = random_boxes(100, 1, seed=3)
    assert torch.equal(kernel(box, score, 0.5), torchvision.ops.nms(box, score, 0.5))


def test_training_and_prediction_do_not_import_torchvision():
    """`import torchvision` costs 2.4 s of CPU (its models import torch._dynamo) in every process that trains."""
    code = (
        "import sys, torch\n"
        "import pyseg.engine.trainer, pyseg.engine.predict\n"
        "from pyseg.engine.boxes import batched_nms\n"
        "b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])\n"
        "kept = batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), 0.5).tolist()\n"
        "print(kept, 'torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[0,", "2]", "False"], done.stdout
