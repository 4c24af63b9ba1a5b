"""Where training and inference run: the one place that turns a --device value into a torch.device."""

from __future__ import annotations

import torch

from pyseg.errors import ConfigError


def select_device(device: str | None) -> torch.device:
    """'' or None: cuda when torch sees a GPU, else cpu; 'cpu', 'cuda', 'cuda:N' or a GPU index 'N'."""
    if device in ("", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.isdigit():
        device = f"cuda:{device}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asks for CUDA, but torch sees no GPU; use --device cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) (0..{torch.cuda.device_count() - 1})"
            )
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or N") from error


def cpu_threads(threads: int, device: torch.device, cpus: float | None = None) -> int | None:
    """The one rule for torch's CPU threads: --threads (threads) when training on the CPU; without it (0), the
    CPUs Ray gave the process (cpus), whatever the device; else None (torch's own default)."""
    if threads:
        return threads if device.type == "cpu" else None
    return max(int(cpus), 1) if cpus else None


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on device (non-blocking); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def masks_made_by_loader(device: torch.device) -> bool:
    """Who rasterizes the ground-truth masks: the loader workers on CPU, the training step on a GPU (where the
    CUDA kernel is faster than shipping [B, h, w] maps through the loader queue)."""
    return device.type != "cuda"


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The mixed precision of training on device with --amp amp: bfloat16 on a CUDA GPU that supports it, else
    float16 (with a gradient scaler); None on the CPU, where --amp does nothing."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
