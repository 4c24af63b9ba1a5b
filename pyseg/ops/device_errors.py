"""Bad input values met by the CUDA kernels, raised as ValueError without a host sync per op.

A CUDA kernel that meets a value that would make it read or write out of bounds (an offset or an
index out of range) or a NaN vertex skips that item and sets a bit of a per-device flag
(csrc/cuda/device_errors.h). The op wrappers of pyseg.ops read the flag after each CUDA call, one
host sync, and raise. Inside ``deferred_device_checks()`` they do not: the caller reads the flag
once, e.g. once per training step with ``check_device_errors`` (or ``raise_for_flags`` on a value it
already copied to the host together with others).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from pyseg import _extension

# Bits of the flag (csrc/cuda/device_errors.h) and what to do about each.
MESSAGES = {
    1: "poly_offsets must be non-decreasing from 0 to the number of vertices",
    2: "poly_to_mask values must lie in [0, num_masks)",
    4: "image_index values must lie in [0, number of images)",
    8: "vertices must be finite: found NaN or inf; drop or repair those polygons first",
    16: "gt_index values must lie in [0, rows of gt_masks)",
}

_deferred = threading.local()


def error_flag(device: torch.device | str) -> torch.Tensor | None:
    """The int32 Tensor[1] flag of a CUDA device, or None (a CPU device, or no CUDA kernels built)."""
    device = torch.device(device)
    if device.type != "cuda" or _extension._C is None or not hasattr(_extension._C, "device_error_flag"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _extension._C.device_error_flag(index)


def raise_for_flags(bits: int) -> None:
    """Raises ValueError naming every problem set in bits (an int read from the flag); nothing when 0."""
    if bits:
        problems = [message for bit, message in MESSAGES.items() if bits & bit]
        problems = problems or [f"unknown device error bits {bits:#x}"]
        raise ValueError("a pyseg CUDA kernel skipped bad input: " + "; ".join(problems))


def check_device_errors(device: torch.device | str) -> None:
    """Reads and clears the flag of device (one host sync) and raises ValueError if a kernel set it."""
    flag = error_flag(device)
    if flag is None:
        return
    bits = int(flag.item())
    if bits:
        flag.zero_()
    raise_for_flags(bits)


@contextlib.contextmanager
def deferred_device_checks() -> Iterator[None]:
    """Within this block (this thread), pyseg.ops wrappers do not sync to read the flag after CUDA ops."""
    depth = getattr(_deferred, "depth", 0)
    _deferred.depth = depth + 1
    try:
        yield
    finally:
        _deferred.depth = depth


def after_op(device: torch.device) -> None:
    """Called by the wrappers after a native op: checks the flag of a CUDA device unless deferred."""
    if device.type == "cuda" and not getattr(_deferred, "depth", 0):
        check_device_errors(device)
