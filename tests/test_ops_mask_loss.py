"""mask_loss: forward and fused backward vs the autograd reference, gradcheck, opcheck, edge cases."""

from __future__ import annotations

import pytest
import torch
from conftest import use_reference_fallback

import pyseg.ops as ops
from pyseg.ops import reference

pytestmark = pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built")


def loss_inputs(kind: str, num=10, batch=3, channels=6, h=14, w=16, dtype=torch.float32, seed=0, device="cpu"):
    """(protos, coeffs, image_index, gt_masks, gt_index, boxes) with gt_masks of the given kind."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((batch, channels, h, w), generator=g).to(dtype)
    coeffs = torch.randn((num, channels), generator=g).to(dtype)
    image_index = torch.randint(0, batch, (num,), generator=g)
    xy = torch.rand((num, 2), generator=g) * torch.tensor([w, h]) - 2
    boxes = torch.cat([xy, xy + torch.rand((num, 2), generator=g) * torch.tensor([w / 2, h / 2]) + 0.6], 1)
    boxes[0] = torch.tensor([4.0, 4.0, 4.0, 9.0])  # covers no pixel centre: loss 0
    if kind == "overlap":
        gt_masks = torch.randint(0, 4, (batch, h, w), generator=g, dtype=torch.int32)
        gt_index = torch.randint(1, 4, (num,), generator=g)
    else:
        count = 5
        gt_index = torch.randint(0, count, (num,), generator=g)
        gt_masks = torch.rand((count, h, w), generator=g)
        gt_masks = {"bool": gt_masks > 0.5, "uint8": (gt_masks > 0.5).to(torch.uint8), "float": gt_masks}[kind]
    return [t.to(device) for t in (protos, coeffs, image_index, gt_masks, gt_index, boxes)]


KINDS = ["overlap", "bool", "uint8", "float"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_reference(kind):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs(kind)
    got = ops.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes)
    want = reference.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes, kind == "overlap")
    assert got.shape == (10,) and got.dtype == torch.float32
    assert float(got[0]) == 0.0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_reference_autograd(kind):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs(kind, seed=1)
    weights = torch.rand(10)
    grads = []
    for fn in (ops.mask_loss, lambda *a: reference.mask_loss(*a, kind == "overlap")):
        p, c = protos.clone().requires_grad_(), coeffs.clone().requires_grad_()
        (fn(p, c, image_index, gt_masks, gt_index, boxes) * weights).sum().backward()
        grads.append((p.grad, c.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)
    assert float(grads[0][1][0].abs().sum()) == 0.0  # empty box: no gradient


@pytest.mark.parametrize("kind", ["overlap", "float"])
def test_gradcheck_float64(kind):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs(
        kind, num=4, batch=2, channels=3, h=6, w=7, dtype=torch.float64, seed=2
    )
    protos.requires_grad_()
    coeffs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, c: ops.mask_loss(p, c, image_index, gt_masks, gt_index, boxes), (protos, coeffs)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    args = loss_inputs("overlap", dtype=dtype, seed=3)
    got = ops.mask_loss(*args)
    want = reference.mask_loss(*args, True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_overlap_is_inferred_from_the_dtype():
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs("overlap", seed=4)
    as_int64 = ops.mask_loss(protos, coeffs, image_index, gt_masks.long(), gt_index, boxes)
    explicit = ops.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap=True)
    torch.testing.assert_close(as_int64, explicit)
    # The same map read as per-instance soft masks is a different loss.
    as_masks = ops.mask_loss(protos, coeffs, image_index, gt_masks.float(), gt_index.clamp(max=2), boxes)
    assert not torch.allclose(as_masks, explicit)


def test_empty_and_non_contiguous_inputs():
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs("uint8")
    empty = ops.mask_loss(protos, coeffs[:0], image_index[:0], gt_masks, gt_index[:0], boxes[:0])
    assert empty.shape == (0,)
    c = coeffs[:0].clone().requires_grad_()
    ops.mask_loss(protos, c, image_index[:0], gt_masks, gt_index[:0], boxes[:0]).sum().backward()
    assert c.grad.shape == (0, coeffs.shape[1])
    protos_nc = protos.transpose(2, 3).contiguous().transpose(2, 3)
    gt_nc = gt_masks.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (protos_nc.is_contiguous() or gt_nc.is_contiguous())
    torch.testing.assert_close(
        ops.mask_loss(protos_nc, coeffs, image_index, gt_nc, gt_index, boxes),
        ops.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes),
    )


BAD = [
    ("gt grid", lambda a: a[:3] + [a[3][:, :-1]] + a[4:], "gt_masks must have shape"),
    ("gt index range", lambda a: a[:4] + [a[4] + 50] + a[5:], "gt_index"),
    ("gt index shape", lambda a: a[:4] + [a[4][:-1]] + a[5:], "gt_index must"),
    ("coeffs dtype", lambda a: [a[0], a[1].double()] + a[2:], "dtype of protos"),
]


@pytest.mark.parametrize("backend", ["native", "fallback"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_value_error(case, backend, monkeypatch):
    if backend == "fallback":
        use_reference_fallback(monkeypatch)
    args = case[1](loss_inputs("uint8"))
    with pytest.raises(ValueError, match=case[2]):
        ops.mask_loss(*args)


def test_overlap_map_must_be_integer_with_one_map_per_image():
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs("overlap")
    with pytest.raises(ValueError, match="one map per image"):
        ops.mask_loss(protos, coeffs, image_index, gt_masks[:2], gt_index, boxes)
    with pytest.raises(ValueError, match="integer"):
        ops.mask_loss(protos, coeffs, image_index, gt_masks.float(), gt_index, boxes, overlap=True)


@pytest.mark.parametrize("kind", ["overlap", "uint8", "float"])
def test_opcheck(kind):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = loss_inputs(kind, num=5)
    protos.requires_grad_()
    coeffs.requires_grad_()
    args = (protos, coeffs, image_index, gt_masks, gt_index, boxes, kind == "overlap")
    torch.library.opcheck(torch.ops.pyseg.mask_loss, args)
    grad = torch.rand(5)
    torch.library.opcheck(
        torch.ops.pyseg.mask_loss_backward, (grad, *[a.detach() if torch.is_tensor(a) else a for a in args])
    )


def test_runs_under_torch_compile():
    args = loss_inputs("overlap", seed=5)

    def fn(protos, coeffs):
        return ops.mask_loss(protos * 1.0, coeffs, *args[2:]).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(args[0], args[1]), fn(args[0], args[1]))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_kernel_matches_cpu(kind, dtype):
    args = loss_inputs(kind, num=64, batch=4, channels=32, h=40, w=40, dtype=dtype, seed=6)
    results = []
    for device in ("cpu", "cuda"):
        p, c = args[0].to(device).requires_grad_(), args[1].to(device).requires_grad_()
        rest = [a.to(device) for a in args[2:]]
        loss = ops.mask_loss(p, c, *rest)
        (loss * torch.linspace(0.5, 1.5, 64, device=device)).sum().backward()
        results.append([t.detach().cpu().double() for t in (loss, p.grad, c.grad)])
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    for cpu, gpu in zip(*results, strict=True):
        torch.testing.assert_close(gpu, cpu, atol=tol, rtol=tol)
    cuda_args = [a.cuda() for a in args] + [kind == "overlap"]
    torch.library.opcheck(torch.ops.pyseg.mask_loss, tuple(cuda_args))
