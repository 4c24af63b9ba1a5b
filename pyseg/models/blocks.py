"""Building blocks of the pyseg models: Conv, Bottleneck, CSPBlock (C2f-style), SPPF and the DFL expectation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3  # BatchNorm2d eps of every Conv
BN_MOMENTUM = 0.03  # BatchNorm2d momentum of every Conv (running stats follow the batch slowly)


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) + BatchNorm2d + SiLU.

    (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with a residual connection when `shortcut` and the channel counts agree.

    (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = Conv(in_channels, hidden, 3)
        self.conv2 = Conv(hidden, out_channels, 3)
        self.residual = shortcut and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.residual else y


class CSPBlock(nn.Module):
    """Cross-stage-partial block, C2f style: a 1x1 Conv split into two halves, a chain of bottlenecks on the
    second half, then a 1x1 Conv over the concatenation of both halves and every bottleneck output.

    (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_bottlenecks: int = 1,
        shortcut: bool = False,
        expansion: float = 0.5,
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.split_conv = Conv(in_channels, 2 * hidden, 1)
        self.bottlenecks = nn.ModuleList(Bottleneck(hidden, hidden, shortcut) for _ in range(num_bottlenecks))
        self.merge_conv = Conv((2 + num_bottlenecks) * hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.split_conv(x).chunk(2, dim=1))  # 2 x (B, hidden, H, W)
        for bottleneck in self.bottlenecks:
            parts.append(bottleneck(parts[-1]))
        return self.merge_conv(torch.cat(parts, dim=1))  # (B, (2 + n) * hidden, H, W) -> (B, out, H, W)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools (stride 1) whose outputs are concatenated.

    (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, pool_size: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.reduce_conv = Conv(in_channels, hidden, 1)
        self.merge_conv = Conv(4 * hidden, out_channels, 1)
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce_conv(x)
        pooled = [x]
        for _ in range(3):
            pooled.append(F.max_pool2d(pooled[-1], self.pool_size, stride=1, padding=self.pool_size // 2))
        return self.merge_conv(torch.cat(pooled, dim=1))  # (B, 4 * hidden, H, W) -> (B, out, H, W)


def expected_distances(distribution: Tensor, bin_values: Tensor) -> Tensor:
    """DFL expectation: softmax over each side's bins, then the mean bin value.

    distribution: (..., 4 * reg_max) logits, laid out side-major (l, t, r, b), each side's reg_max bins contiguous
    bin_values: (reg_max,) the distance of each bin (0, 1, ..., reg_max - 1)
    returns: (..., 4) expected ltrb distances, in the units of the bins (stride units), dtype of distribution
    """
    reg_max = bin_values.shape[0]
    probs = distribution.unflatten(-1, (4, reg_max)).softmax(-1)  # (..., 4, reg_max)
    return probs @ bin_values.to(probs.dtype)  # (..., 4)


class DFL(nn.Module):
    """Decodes distribution-focal-loss box outputs: (..., 4 * reg_max) logits -> (..., 4) expected ltrb distances.

    The bin values 0..reg_max-1 are a fixed, non-trainable buffer (not saved in the state dict).
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("bin_values", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def forward(self, distribution: Tensor) -> Tensor:
        return expected_distances(distribution, self.bin_values)
