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
