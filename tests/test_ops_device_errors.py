"""pyseg.ops.device_errors: how bad values found by CUDA kernels become one ValueError, and when it is read."""

from __future__ import annotations

import pytest
import torch

from pyseg.engine.trainer import step_values
from pyseg.ops import device_errors


def test_flag_bits_become_one_error_that_names_every_problem():
    with pytest.raises(ValueError, match=r"poly_offsets must be non-decreasing.*vertices must be finite"):
        device_errors.raise_for_flags(1 | 8)
    with pytest.raises(ValueError, match="unknown device error bits 0x40"):
        device_errors.raise_for_flags(64)
    device_errors.raise_for_flags(0)  # nothing set: nothing raised


def test_a_cpu_device_has_no_flag_and_checking_it_never_raises():
    assert device_errors.error_flag("cpu") is None
    device_errors.check_device_errors(torch.device("cpu"))


def test_deferred_checks_nest_and_end_with_their_block(monkeypatch):
    checked = []
    monkeypatch.setattr(device_errors, "check_device_errors", checked.append)
    cuda = torch.device("cuda", 0)
    with device_errors.deferred_device_checks():
        with device_errors.deferred_device_checks():
            device_errors.after_op(cuda)
        device_errors.after_op(cuda)
    assert checked == []
    device_errors.after_op(cuda)
    device_errors.after_op(torch.device("cpu"))  # CPU kernels raise at the call: nothing to read
    assert checked == [cuda]


def test_step_values_copies_loss_and_parts_in_one_go():
    loss = torch.tensor(2.5, requires_grad=True) * 1.0
    parts = {"box": torch.tensor(0.5), "mask": torch.tensor(float("nan"))}
    value, host = step_values(loss, parts, torch.device("cpu"))
    assert value == 2.5 and host["box"] == 0.5 and host["mask"] != host["mask"]  # NaN stays NaN
    assert list(host) == ["box", "mask"]


@pytest.mark.needs_cuda
def test_step_values_raises_for_a_flag_a_kernel_set_during_the_step():
    device = torch.device("cuda")
    flag = device_errors.error_flag(device)
    assert flag is not None, "pyseg._C was built without CUDA kernels"
    flag.fill_(4)
    with pytest.raises(ValueError, match="image_index values must lie"):
        step_values(torch.tensor(1.0, device=device), {}, device)
    assert int(flag.item()) == 0  # read once, cleared


def test_a_meta_tensor_among_cpu_tensors_is_refused_by_every_op():
    """A meta argument makes the dispatcher pick an op's fake (what torch.compile traces with): like the kernels, it
    must refuse inputs on two devices instead of returning uninitialized tensors."""
    import pyseg.ops as ops

    if not ops.has_ops():
        pytest.skip("pyseg._C is not built")
    square = torch.tensor([[1.0, 1.0], [5.0, 1.0], [5.0, 5.0], [1.0, 5.0]])
    offsets, owner = torch.tensor([0, 4]), torch.tensor([0])
    with pytest.raises(ValueError, match="poly_offsets must be on the device of vertices"):
        ops.rasterize_polygons(square, offsets.to("meta"), owner, 1, 8, 8)
    with pytest.raises(ValueError, match="image_index must be on the device of vertices"):
        ops.rasterize_polygons_overlap(square, offsets, owner, torch.tensor([0], device="meta"), 1, 8, 8)
    protos, coeffs, boxes = torch.randn(1, 3, 8, 8), torch.randn(1, 3), torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    with pytest.raises(ValueError, match="image_index must be on the device of protos"):
        ops.assemble_masks(protos, coeffs, torch.tensor([0], device="meta"), boxes)
    index_map = torch.ones(1, 8, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="gt_masks must be on the device of protos"):
        ops.mask_loss(protos, coeffs, torch.tensor([0]), index_map.to("meta"), torch.tensor([1]), boxes)


def test_an_int8_index_map_is_read_as_an_overlap_map():
    """Signed integer maps hold instance ids: an int8 map gives the loss of the same map in int32 (not per-instance
    masks, whose values would be read as targets above 1 and give a negative loss)."""
    import pyseg.ops as ops

    torch.manual_seed(0)
    protos, coeffs = torch.randn(1, 3, 8, 8), torch.randn(2, 3)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 6.0, 6.0]])
    index_map = torch.zeros(1, 8, 8, dtype=torch.int32)
    index_map[0, :4], index_map[0, 3:6, 3:6] = 1, 2
    args = (protos, coeffs, torch.tensor([0, 0]))
    want = ops.mask_loss(*args, index_map, torch.tensor([1, 2]), boxes)
    got = ops.mask_loss(*args, index_map.to(torch.int8), torch.tensor([1, 2]), boxes)
    assert torch.equal(got, want) and bool((got > 0).all())
