"""mask_loss on each device against the oracle (the reference with autograd on the CPU, the CPU kernels on CUDA):
forward, fused backward, gradcheck, opcheck, layouts, precision, determinism, fakes, edge cases, bad values.

Tolerances: float32 loss atol = rtol = 1e-5, float32 gradients atol 1e-5, rtol 1e-4 (float32 sums over a box in
another order); bfloat16 / float16 inputs accumulate in float32: loss within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from conftest import deterministic_algorithms, got_and_want, oracle_ops, to_device, use_reference_fallback
from torch._subclasses.fake_tensor import FakeTensorMode

import pyseg.ops as ops
from pyseg.ops import reference

pytestmark = pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built")


def loss_inputs(kind: str, num=10, batch=3, channels=6, h=14, w=16, dtype=torch.float32, seed=0):
    """[protos, coeffs, image_index, gt_masks, gt_index, boxes] with gt_masks of the given kind. Box 0 covers no
    pixel centre, box 1 is exactly the frame, boxes 2 and 3 overlap it and each other in the same image and are
    matched to the same target; the others are random, some partly outside."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((batch, channels, h, w), generator=g).to(dtype)
    coeffs = torch.randn((num, channels), generator=g).to(dtype)
    image_index = torch.randint(0, batch, (num,), generator=g)
    xy = torch.rand((num, 2), generator=g) * torch.tensor([w, h]) - 2
    boxes = torch.cat([xy, xy + torch.rand((num, 2), generator=g) * torch.tensor([w / 2, h / 2]) + 0.6], 1)
    boxes[0] = torch.tensor([4.0, 4.0, 4.0, 9.0])  # covers no pixel centre: loss 0
    boxes[1] = torch.tensor([0.0, 0.0, float(w), float(h)])  # the full frame
    boxes[2] = torch.tensor([1.0, 1.5, 0.6 * w, 0.7 * h])
    boxes[3] = torch.tensor([0.4 * w, 0.3 * h, w + 3.0, h - 0.5])  # overlaps box 2, partly outside
    image_index[2] = image_index[3] = image_index[1]
    if kind == "overlap":
        gt_masks = torch.randint(0, 4, (batch, h, w), generator=g, dtype=torch.int32)
        gt_index = torch.randint(1, 4, (num,), generator=g)
    else:
        count = 5
        gt_index = torch.randint(0, count, (num,), generator=g)
        gt_masks = torch.rand((count, h, w), generator=g)
        gt_masks = {"bool": gt_masks > 0.5, "uint8": (gt_masks > 0.5).to(torch.uint8), "float": gt_masks}[kind]
    gt_index[3] = gt_index[2]
    return [protos, coeffs, image_index, gt_masks, gt_index, boxes]


KINDS = ["overlap", "bool", "uint8", "float"]


def loss_and_grads(impl, protos, coeffs, image_index, gt_masks, gt_index, boxes, weights, overlap):
    """(loss, dL/dprotos, dL/dcoeffs) for L = (impl.mask_loss(...) * weights).sum(), on fresh leaves."""
    p = protos.detach().clone().requires_grad_()
    c = coeffs.detach().clone().requires_grad_()
    loss = impl.mask_loss(p, c, image_index, gt_masks, gt_index, boxes, overlap=overlap)
    (loss * weights).sum().backward()
    return loss.detach(), p.grad, c.grad


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_oracle(device, kind):
    got, want = got_and_want(device, lambda impl, *a: impl.mask_loss(*a, overlap=kind == "overlap"), *loss_inputs(kind))
    assert got.shape == (10,) and got.dtype == torch.float32
    assert float(got[0]) == 0.0 and float(got[1]) > 0.0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_oracle(device, kind):
    args = loss_inputs(kind, seed=1)
    weights = torch.rand(10, generator=torch.Generator().manual_seed(1))
    (loss, grad_protos, grad_coeffs), (want_loss, want_protos, want_coeffs) = got_and_want(
        device, lambda impl, *a: loss_and_grads(impl, *a, overlap=kind == "overlap"), *args, weights
    )
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_protos, want_protos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_coeffs, want_coeffs, atol=1e-5, rtol=1e-4)
    assert float(grad_coeffs[0].abs().sum()) == 0.0  # empty box: no gradient
    assert float(grad_coeffs[1].abs().sum()) > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_oracle_with_32_channels(device, kind, dtype):
    """A head-sized case: 64 instances over 4 images, 32 channels (the CUDA kernels size their blocks by the shared
    memory the channel sums take). bfloat16 gradients come back rounded to 8 bits of mantissa: 2e-2."""
    args = loss_inputs(kind, num=64, batch=4, channels=32, h=40, w=40, dtype=dtype, seed=6)
    weights = torch.linspace(0.5, 1.5, 64)
    got, want = got_and_want(
        device, lambda impl, *a: loss_and_grads(impl, *a, overlap=kind == "overlap"), *args, weights
    )
    atol, rtol = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
    assert float(got[2].abs().sum()) > 0


@pytest.mark.parametrize("kind", ["overlap", "float"])
def test_gradcheck_float64(device, kind):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = to_device(
        loss_inputs(kind, num=4, batch=2, channels=3, h=6, w=7, dtype=torch.float64, seed=2), device
    )
    protos.requires_grad_()
    coeffs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, c: ops.mask_loss(p, c, image_index, gt_masks, gt_index, boxes), (protos, coeffs)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(device, dtype):
    got, want = got_and_want(
        device, lambda impl, *a: impl.mask_loss(*a, overlap=True), *loss_inputs("overlap", dtype=dtype, seed=3)
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["overlap", "float"])
def test_float16_protos_match_a_float32_computation(device, kind):
    """float16 -> float32 is exact and the kernels accumulate in float32, so the loss of float16 inputs is the
    float32 loss of the same values up to summation order (the float32 tolerance, 1e-5). The gradients come back in
    float16: one rounding of a float32 value, relative error <= 2^-11 = 4.9e-4 (rtol 1e-3), plus float32 noise and
    float16's subnormal spacing 6e-8 for tiny values (atol 1e-5)."""
    args = loss_inputs(kind, seed=8)
    half = [args[0].half(), args[1].half(), *args[2:]]
    same_values = [half[0].float(), half[1].float(), *args[2:]]
    weights = torch.rand(10, generator=torch.Generator().manual_seed(8))
    overlap = kind == "overlap"
    loss, grad_protos, grad_coeffs = to_device(
        loss_and_grads(ops, *to_device(half, device), weights.to(device), overlap), "cpu"
    )
    want_loss, want_protos, want_coeffs = loss_and_grads(oracle_ops(device), *same_values, weights, overlap)
    assert loss.dtype == torch.float32 and grad_protos.dtype == grad_coeffs.dtype == torch.float16
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_protos.float(), want_protos, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(grad_coeffs.float(), want_coeffs, atol=1e-5, rtol=1e-3)
    assert float(grad_protos.float().abs().amax()) > 1e-3


@pytest.mark.parametrize("kind", ["overlap", "uint8"])
def test_channels_last_protos_give_the_values_of_contiguous_protos(device, kind):
    args = to_device(loss_inputs(kind, num=12, channels=8, seed=9), device)
    weights = torch.linspace(0.5, 1.5, 12, device=device)
    channels_last = [args[0].to(memory_format=torch.channels_last), *args[1:]]
    assert not channels_last[0].is_contiguous()
    want = loss_and_grads(ops, *args, weights, overlap=kind == "overlap")
    got = loss_and_grads(ops, *channels_last, weights, overlap=kind == "overlap")
    assert got[1].shape == args[0].shape and got[2].shape == args[1].shape
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # same values in, same arithmetic: bit-identical


def test_backward_is_deterministic_with_overlapping_boxes(device):
    """Two backward passes give bit-identical gradients, also under torch.use_deterministic_algorithms(True), where
    it must run without error (and where new memory is filled with NaN: an element left unwritten shows)."""
    protos, coeffs, image_index, gt_masks, gt_index, boxes = to_device(
        loss_inputs("overlap", num=24, batch=2, channels=16, h=40, w=48, seed=7), device
    )
    crops = reference.box_crop(boxes.cpu(), 40, 48)
    assert int(crops[image_index.cpu() == 0].sum(0).amax()) >= 3  # pixels under three boxes or more
    weights = torch.linspace(0.5, 1.5, 24, device=device)
    first = loss_and_grads(ops, protos, coeffs, image_index, gt_masks, gt_index, boxes, weights, overlap=True)
    second = loss_and_grads(ops, protos, coeffs, image_index, gt_masks, gt_index, boxes, weights, overlap=True)
    with deterministic_algorithms():
        third = loss_and_grads(ops, protos, coeffs, image_index, gt_masks, gt_index, boxes, weights, overlap=True)
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert float(first[1].abs().sum()) > 0


def test_backward_with_grad_loss_on_another_device_raises(device):
    args = to_device(loss_inputs("overlap"), device)
    if device == "cuda":
        with pytest.raises(ValueError, match="grad_loss must be on the device of protos"):
            torch.ops.pyseg.mask_loss_backward(torch.ones(10), *args, True)  # CPU grad_loss, CUDA protos
        cpu_args = to_device(args, "cpu")
        with pytest.raises(ValueError, match="grad_loss must be on the device of protos"):
            torch.ops.pyseg.mask_loss_backward(torch.ones(10, device=device), *cpu_args, True)
    else:
        # Through the dispatcher a meta argument selects the Meta kernel (the fake); call the CPU kernel itself.
        cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        with pytest.raises(ValueError, match="grad_loss must be on the device of protos"):
            torch.ops.pyseg.mask_loss_backward.default.redispatch(
                cpu_kernel, torch.ones(10, device="meta"), *args, True
            )


def test_backward_with_a_meta_grad_loss_raises_through_the_dispatcher():
    # A meta argument selects the fake (torch.compile's view of the op): it checks devices as the kernels do.
    args = loss_inputs("overlap")
    with pytest.raises(ValueError, match="grad_loss"):
        torch.ops.pyseg.mask_loss_backward(torch.ones(10, device="meta"), *args, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_backward_has_the_layout_of_the_kernel_output(device, dtype):
    """The kernels return contiguous gradients whatever the strides of protos (channels_last here); the fake that
    torch.compile traces with must say the same."""
    protos, *rest = to_device(loss_inputs("overlap", dtype=dtype), device)
    args = (torch.rand(10, device=device), protos.to(memory_format=torch.channels_last), *rest)
    real = torch.ops.pyseg.mask_loss_backward(*args, True)
    with FakeTensorMode() as mode:
        fake = torch.ops.pyseg.mask_loss_backward(*[mode.from_tensor(a) for a in args], True)
    assert real[0].is_contiguous() and fake[0].is_contiguous()
    for r, f in zip(real, fake, strict=True):
        assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)


def test_overlap_is_inferred_from_the_dtype(device):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = to_device(loss_inputs("overlap", seed=4), device)
    as_int64 = ops.mask_loss(protos, coeffs, image_index, gt_masks.long(), gt_index, boxes)
    explicit = ops.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap=True)
    torch.testing.assert_close(as_int64, explicit)
    # The same map read as per-instance soft masks is a different loss.
    as_masks = ops.mask_loss(protos, coeffs, image_index, gt_masks.float(), gt_index.clamp(max=2), boxes)
    assert not torch.allclose(as_masks, explicit)


def test_empty_and_non_contiguous_inputs(device):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = to_device(loss_inputs("uint8"), device)
    empty = ops.mask_loss(protos, coeffs[:0], image_index[:0], gt_masks, gt_index[:0], boxes[:0])
    assert empty.shape == (0,)
    c = coeffs[:0].clone().requires_grad_()
    p = protos.clone().requires_grad_()
    ops.mask_loss(p, c, image_index[:0], gt_masks, gt_index[:0], boxes[:0]).sum().backward()
    assert c.grad.shape == (0, coeffs.shape[1]) and p.grad.shape == protos.shape and int(p.grad.count_nonzero()) == 0
    protos_nc = protos.transpose(2, 3).contiguous().transpose(2, 3)
    gt_nc = gt_masks.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (protos_nc.is_contiguous() or gt_nc.is_contiguous())
    torch.testing.assert_close(
        ops.mask_loss(protos_nc, coeffs, image_index, gt_nc, gt_index, boxes),
        ops.mask_loss(protos, coeffs, image_index, gt_masks, gt_index, boxes),
    )


def with_argument(args: list, index: int, value) -> list:
    return [value if i == index else a for i, a in enumerate(args)]


BAD = [
    ("gt grid", "uint8", lambda a: with_argument(a, 3, a[3][:, :-1]), "gt_masks must have shape"),
    ("gt index range", "uint8", lambda a: with_argument(a, 4, a[4] + 50), r"gt_index values must lie in \[0, "),
    ("gt index negative", "float", lambda a: with_argument(a, 4, a[4] - 5), r"gt_index values must lie in \[0, "),
    ("gt index shape", "uint8", lambda a: with_argument(a, 4, a[4][:-1]), "gt_index must"),
    ("coeffs dtype", "uint8", lambda a: with_argument(a, 1, a[1].double()), "dtype of protos"),
    ("image index range", "uint8", lambda a: with_argument(a, 2, a[2] + 7), r"image_index values must lie in \[0, "),
    ("image index, overlap", "overlap", lambda a: with_argument(a, 2, a[2] - 3), r"image_index values must lie in \["),
]


@pytest.mark.parametrize("backend", ["native", "fallback"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_value_error(device, case, backend, monkeypatch):
    if backend == "fallback":
        use_reference_fallback(monkeypatch)
    _, kind, corrupt, message = case
    with pytest.raises(ValueError, match=message):
        ops.mask_loss(*corrupt(to_device(loss_inputs(kind), device)))
    # The error is not left behind (on CUDA: the device error flag was read and cleared).
    assert ops.mask_loss(*to_device(loss_inputs(kind), device)).shape == (10,)


def test_backward_kernel_reports_bad_target_indices(device):
    args = to_device(loss_inputs("uint8"), device)
    args[4] = args[4] + 50
    with pytest.raises(ValueError, match=r"gt_index values must lie in \[0, "):
        torch.ops.pyseg.mask_loss_backward(torch.ones(10, device=device), *args, False)  # CPU: raises here
        ops.check_device_errors(device)  # CUDA: the kernel set the device error flag


def test_overlap_map_must_be_integer_with_one_map_per_image(device):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = to_device(loss_inputs("overlap"), device)
    with pytest.raises(ValueError, match="one map per image"):
        ops.mask_loss(protos, coeffs, image_index, gt_masks[:2], gt_index, boxes)
    with pytest.raises(ValueError, match="integer"):
        ops.mask_loss(protos, coeffs, image_index, gt_masks.float(), gt_index, boxes, overlap=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["overlap", "uint8", "float"])
def test_opcheck(device, kind, layout):
    protos, coeffs, image_index, gt_masks, gt_index, boxes = to_device(loss_inputs(kind, num=5), device)
    if layout == "channels_last":
        protos = protos.to(memory_format=torch.channels_last)
    protos.requires_grad_()
    coeffs.requires_grad_()
    args = (protos, coeffs, image_index, gt_masks, gt_index, boxes, kind == "overlap")
    torch.library.opcheck(torch.ops.pyseg.mask_loss, args)
    grad = torch.rand(5, device=device)
    torch.library.opcheck(
        torch.ops.pyseg.mask_loss_backward, (grad, *[a.detach() if torch.is_tensor(a) else a for a in args])
    )


def test_runs_under_torch_compile(device):
    args = to_device(loss_inputs("overlap", seed=5), device)

    def fn(protos, coeffs):
        return ops.mask_loss(protos * 1.0, coeffs, *args[2:]).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with ops.deferred_device_checks():  # as the trainer runs ops: no host sync inside the graph
        got = compiled(args[0], args[1])
    ops.check_device_errors(device)
    torch.testing.assert_close(got, fn(args[0], args[1]))
