"""assemble_masks on each device against the oracle (the reference on the CPU, the CPU kernel on CUDA): dtypes, output
sizes, the crop rule, thresholds, the cached and uncached paths of the CUDA kernel, opcheck, edge cases, bad values.

Tolerances (probabilities in [0, 1]): float32 atol 2e-6, rtol 1e-5 (float32 sums of K products in another order and
another exp: a few ulp of the logit); float64 1e-12; float16 / bfloat16 1e-2 (one rounding of the output: bfloat16
has 8 bits of mantissa, 4e-3 relative). The crop is exact on every device: the same pixels are 0.
"""

from __future__ import annotations

import pytest
import torch
from conftest import deterministic_algorithms, got_and_want, oracle_ops, to_device, use_reference_fallback

import pyseg.ops as ops

pytestmark = pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built")

TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # atol


def assert_close_masks(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    atol = TOLERANCE[got.dtype]
    rtol = 1e-5 if got.dtype == torch.float32 else atol
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert torch.equal(got == 0, want == 0)  # the crop is exact


def head_outputs(num=12, batch=3, channels=8, h=20, w=24, dtype=torch.float32, seed=0):
    """(protos, coeffs, image_index, boxes): random boxes, many partly outside the frame, and these fixed ones:
    0 beyond the whole frame, 1 zero width, 2 edges on pixel centres, 3 exactly the frame, 4 inverted (empty)."""
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
    if num > 4:
        boxes[3] = torch.tensor([0.0, 0.0, float(w), float(h)])  # exactly the frame
        boxes[4] = torch.tensor([9.0, 8.0, 4.0, 12.0])  # x2 < x1: empty
    return protos, coeffs, image_index, boxes


def assemble(out_size=None, threshold=None):
    """compute(ops, protos, coeffs, image_index, boxes) for got_and_want."""
    return lambda impl, *head: impl.assemble_masks(*head, out_size, threshold)


@pytest.mark.parametrize("out_size", [None, (20, 24), (80, 96), (33, 50), (10, 12), (30, 37), (48, 160)])
def test_kernel_matches_oracle(device, out_size):
    # Widths 37 and 50 take the CUDA kernel's scalar stores, the others its 4- and 16-byte vector stores.
    got, want = got_and_want(device, assemble(out_size), *head_outputs())
    assert got.dtype == torch.float32 and got.shape == (12, *(out_size or (20, 24)))
    assert_close_masks(got, want)


def test_pixels_outside_the_box_are_zero_and_inside_are_sigmoid(device):
    protos, coeffs, image_index, boxes = head_outputs()
    out = ops.assemble_masks(*to_device((protos, coeffs, image_index, boxes), device)).cpu()
    assert int(out[1].count_nonzero()) == 0 and int(out[4].count_nonzero()) == 0  # empty boxes
    inside = out[2]  # box (2.5, 1.5, 7.5, 4.5): centres x in {2.5..6.5}, y in {1.5..3.5}
    assert bool((inside[1:4, 2:7] > 0).all())
    assert int(inside.count_nonzero()) == 15
    for n in (0, 3):  # beyond the frame, exactly the frame: every pixel
        logits = coeffs[n] @ protos[image_index[n]].flatten(1)
        torch.testing.assert_close(out[n].flatten(), logits.sigmoid(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("out_size", [(40, 48), (30, 37), (48, 160)])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_threshold_returns_bool(device, threshold, out_size):
    head = head_outputs(seed=1)
    got = ops.assemble_masks(*to_device(head, device), out_size, threshold).cpu()
    probs = oracle_ops(device).assemble_masks(*head, out_size)
    assert got.dtype == torch.bool and got.shape == (12, *out_size)
    decided = (probs - threshold).abs() > 1e-5  # ignore pixels within rounding of the threshold
    assert torch.equal(got[decided], (probs > threshold)[decided])
    assert not bool(got[probs == 0].any())  # outside the boxes (undecided for threshold 0)
    assert int(decided.sum()) > 0.2 * probs.numel() and bool(got.any())


@pytest.mark.parametrize("out_size", [None, (40, 48), (10, 12), (30, 37)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision_inputs(device, dtype, out_size):
    head = head_outputs(dtype=dtype, seed=2)
    got, want = got_and_want(device, assemble(out_size), *head)
    assert got.dtype == dtype
    assert_close_masks(got, want)
    decisions = ops.assemble_masks(*to_device(head, device), out_size, 0.5).cpu()
    decided = (want.double() - 0.5).abs() > 1e-2  # beyond the rounding of the output dtype
    assert decisions.dtype == torch.bool and torch.equal(decisions[decided], (want > 0.5)[decided])


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("out_size", [(40, 40), (640, 640)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_160px_protos_of_32_channels_to_40px_and_640px(device, dtype, out_size, threshold):
    head = head_outputs(num=16, batch=2, channels=32, h=160, w=160, dtype=dtype, seed=4)
    got, want = got_and_want(device, assemble(out_size, threshold), *head)
    if threshold is None:
        assert_close_masks(got, want)
    else:  # the oracle's own decision, where the probability is not within rounding of the threshold
        probs = oracle_ops(device).assemble_masks(*head, out_size)
        decided = (probs - threshold).abs() > 1e-5
        assert got.dtype == torch.bool and torch.equal(got[decided], want[decided])
        assert int(got.sum()) > 0


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_strong_downscale_takes_the_uncached_path(device, threshold):
    """512 -> 64 px: a 32 x 32 output tile samples (8 * 32 + 2)^2 proto cells, more than the CUDA kernel caches
    (4608), so it reads protos directly; small boxes in the same call still take the cached path."""
    protos, coeffs, image_index, boxes = head_outputs(num=8, batch=2, channels=8, h=512, w=512, seed=5)
    boxes[5] = torch.tensor([100.0, 90.0, 140.0, 150.0])  # 5 x 7.5 output pixels: cached
    boxes[6] = torch.tensor([-100.0, 30.0, 300.0, 700.0])  # partly outside
    boxes[7] = torch.tensor([0.0, 0.0, 512.0, 256.0])  # the top half of the frame
    got, want = got_and_want(device, assemble((64, 64), threshold), protos, coeffs, image_index, boxes)
    if threshold is None:
        assert_close_masks(got, want)
        assert int((got[7] > 0).sum()) == 64 * 32
    else:
        probs = oracle_ops(device).assemble_masks(protos, coeffs, image_index, boxes, (64, 64))
        decided = (probs - threshold).abs() > 1e-5
        assert got.dtype == torch.bool and torch.equal(got[decided], want[decided])


def test_every_output_element_is_written(device):
    """Under deterministic algorithms new memory is filled with NaN (bool: True): an element that the kernel leaves
    unwritten differs from the oracle (computed outside that mode)."""
    head = head_outputs(seed=6)
    for out_size, threshold in [(None, None), ((30, 37), None), ((48, 160), None), ((30, 37), 0.5), ((48, 160), 0.5)]:
        with deterministic_algorithms():
            got = ops.assemble_masks(*to_device(head, device), out_size, threshold).cpu()
        want = oracle_ops(device).assemble_masks(*head, out_size, threshold)
        if threshold is None:
            assert_close_masks(got, want)
        else:
            probs = oracle_ops(device).assemble_masks(*head, out_size)
            decided = (probs - threshold).abs() > 1e-5
            assert torch.equal(got[decided], want[decided])


def test_empty_and_non_contiguous_inputs(device):
    protos, coeffs, image_index, boxes = to_device(head_outputs(), device)
    empty = ops.assemble_masks(protos, coeffs[:0], image_index[:0], boxes[:0], (40, 48))
    assert empty.shape == (0, 40, 48)
    assert ops.assemble_masks(protos, coeffs, image_index, boxes, (0, 48)).shape == (12, 0, 48)
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
    ("image index range", lambda p, c, i, b: (p, c, i + 7, b), r"image_index values must lie in \[0, "),
    ("image index negative", lambda p, c, i, b: (p, c, i - 3, b), r"image_index values must lie in \[0, "),
    ("boxes shape", lambda p, c, i, b: (p, c, i, b[:, :3]), "boxes must have shape"),
]


@pytest.mark.parametrize("backend", ["native", "fallback"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_value_error(device, case, backend, monkeypatch):
    if backend == "fallback":
        use_reference_fallback(monkeypatch)
    args = case[1](*to_device(head_outputs(), device))
    with pytest.raises(ValueError, match=case[2]):
        ops.assemble_masks(*args)
    # The error is not left behind (on CUDA: the device error flag was read and cleared).
    assert ops.assemble_masks(*to_device(head_outputs(), device)).shape == (12, 20, 24)


def test_bad_threshold_and_out_size():
    args = head_outputs()
    with pytest.raises(ValueError, match="threshold"):
        ops.assemble_masks(*args, threshold=1.5)
    with pytest.raises(ValueError, match="out_size"):
        ops.assemble_masks(*args, out_size=(3,))


def test_opcheck(device):
    protos, coeffs, image_index, boxes = to_device(head_outputs(num=5), device)
    for out_size, threshold in [(None, None), ((40, 30), None), ((40, 48), 0.5), ((15, 37), None)]:
        torch.library.opcheck(torch.ops.pyseg.assemble_masks, (protos, coeffs, image_index, boxes, out_size, threshold))
