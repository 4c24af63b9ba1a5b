"""assemble_masks: CPU kernel vs reference, dtypes, crop rule, opcheck, edge cases."""

from __future__ import annotations

import pytest
import torch
from conftest import use_reference_fallback

import pyseg.ops as ops
from pyseg.ops import reference

pytestmark = pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built")


def head_outputs(num=12, batch=3, channels=8, h=20, w=24, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((batch, channels, h, w), generator=g).to(dtype)
    coeffs = torch.randn((num, channels), generator=g).to(dtype)
    image_index = torch.randint(0, batch, (num,), generator=g)
    xy = torch.rand((num, 2), generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    wh = torch.rand((num, 2), generator=g) * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([-5.0, -5.0, w + 5.0, h + 5.0])  # covers everything
    boxes[1] = torch.tensor([3.0, 3.0, 3.0, 9.0])  # zero width
    boxes[2] = torch.tensor([2.5, 1.5, 7.5, 4.5])  # edges on pixel centres
    return [t.to(device) for t in (protos, coeffs, image_index, boxes)]


@pytest.mark.parametrize("out_size", [None, (20, 24), (80, 96), (33, 50), (10, 12)])
def test_cpu_kernel_matches_reference(out_size):
    protos, coeffs, image_index, boxes = head_outputs()
    got = ops.assemble_masks(protos, coeffs, image_index, boxes, out_size)
    want = reference.assemble_masks(protos, coeffs, image_index, boxes, out_size)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # The crop is exact: the same pixels are zero in both.
    assert torch.equal(got == 0, want == 0)


def test_pixels_outside_the_box_are_zero_and_inside_are_sigmoid():
    protos, coeffs, image_index, boxes = head_outputs()
    out = ops.assemble_masks(protos, coeffs, image_index, boxes)
    assert int(out[1].count_nonzero()) == 0  # empty box
    inside = out[2]  # box (2.5, 1.5, 7.5, 4.5): centres x in {2.5..6.5}, y in {1.5..3.5}
    assert bool((inside[1:4, 2:7] > 0).all())
    assert int(inside.count_nonzero()) == 15
    logits = coeffs[0] @ protos[image_index[0]].flatten(1)
    torch.testing.assert_close(out[0].flatten(), logits.sigmoid())


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_threshold_returns_bool(threshold):
    protos, coeffs, image_index, boxes = head_outputs(seed=1)
    got = ops.assemble_masks(protos, coeffs, image_index, boxes, (40, 48), threshold)
    probs = reference.assemble_masks(protos, coeffs, image_index, boxes, (40, 48))
    assert got.dtype == torch.bool
    decided = (probs - threshold).abs() > 1e-5  # ignore pixels within rounding of the threshold
    assert torch.equal(got[decided], (probs > threshold)[decided])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision_inputs(dtype):
    protos, coeffs, image_index, boxes = head_outputs(dtype=dtype, seed=2)
    got = ops.assemble_masks(protos, coeffs, image_index, boxes, (40, 48))
    want = reference.assemble_masks(protos, coeffs, image_index, boxes, (40, 48))
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


def test_empty_and_non_contiguous_inputs():
    protos, coeffs, image_index, boxes = head_outputs()
    empty = ops.assemble_masks(protos, coeffs[:0], image_index[:0], boxes[:0], (40, 48))
    assert empty.shape == (0, 40, 48)
    protos_nc = protos.transpose(2, 3).contiguous().transpose(2, 3)
    coeffs_nc = torch.cat([coeffs, coeffs], 1)[:, ::2]
    boxes_nc = torch.cat([boxes, boxes], 1)[:, :4]
    assert not (protos_nc.is_contiguous() or coeffs_nc.is_contiguous() or boxes_nc.is_contiguous())
    torch.testing.assert_close(
        ops.assemble_masks(protos_nc, coeffs, image_index, boxes_nc, (30, 30)),
        ops.assemble_masks(protos, coeffs, image_index, boxes, (30, 30)),
    )
    torch.testing.assert_close(
        ops.assemble_masks(protos, coeffs_nc, image_index, boxes),
        ops.assemble_masks(protos, torch.cat([coeffs, coeffs], 1)[:, ::2].contiguous(), image_index, boxes),
    )


BAD = [
    ("protos rank", lambda p, c, i, b: (p[0], c, i, b), "protos must have shape"),
    ("coeffs K", lambda p, c, i, b: (p, c[:, :3], i, b), "coeffs must have shape"),
    ("coeffs dtype", lambda p, c, i, b: (p, c.double(), i, b), "dtype of protos"),
    ("image index range", lambda p, c, i, b: (p, c, i + 7, b), "image_index"),
    ("boxes shape", lambda p, c, i, b: (p, c, i, b[:, :3]), "boxes must have shape"),
]


@pytest.mark.parametrize("backend", ["native", "fallback"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_value_error(case, backend, monkeypatch):
    if backend == "fallback":
        use_reference_fallback(monkeypatch)
    args = case[1](*head_outputs())
    with pytest.raises(ValueError, match=case[2]):
        ops.assemble_masks(*args)


def test_bad_threshold_and_out_size():
    args = head_outputs()
    with pytest.raises(ValueError, match="threshold"):
        ops.assemble_masks(*args, threshold=1.5)
    with pytest.raises(ValueError, match="out_size"):
        ops.assemble_masks(*args, out_size=(3,))


def test_opcheck():
    protos, coeffs, image_index, boxes = head_outputs(num=5)
    for out_size, threshold in [(None, None), ((40, 30), None), ((40, 48), 0.5)]:
        torch.library.opcheck(torch.ops.pyseg.assemble_masks, (protos, coeffs, image_index, boxes, out_size, threshold))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_size", [None, (80, 96), (10, 12), (640, 640)])
def test_cuda_kernel_matches_cpu(dtype, out_size):
    args = head_outputs(num=40, dtype=dtype, seed=3)
    cpu = ops.assemble_masks(*args, out_size)
    gpu = ops.assemble_masks(*[t.cuda() for t in args], out_size)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=tol, rtol=tol)
    gpu_bool = ops.assemble_masks(*[t.cuda() for t in args], out_size, 0.5).cpu()
    decided = (cpu.float() - 0.5).abs() > 1e-2
    assert torch.equal(gpu_bool[decided], (cpu.float() > 0.5)[decided])
    torch.library.opcheck(torch.ops.pyseg.assemble_masks, (*[t.cuda() for t in args], out_size, None))
