"""Building blocks of the pyseg models and of the YOLO11/YOLOv8-seg families built from them.

Conv, DepthwiseConv, Bottleneck, CSPBlock (C2f), C3Block (C3k), C3k2Block, SPPF, the position-sensitive
attention blocks (Attention, PSABlock, C2PSABlock), Concat, the mask prototype branch (ProtoBranch) and the DFL
expectation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3  # BatchNorm2d eps of every Conv
BN_MOMENTUM = 0.03  # BatchNorm2d momentum of every Conv (running stats follow the batch slowly)


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) + BatchNorm2d + SiLU (or no activation when activation=False).

    (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseConv(Conv):
    """A Conv with one group per gcd(in_channels, out_channels) channels (depthwise when they are equal)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=math.gcd(in_channels, out_channels))


class Bottleneck(nn.Module):
    """Two Convs (3x3 and 3x3 unless kernel_sizes says otherwise), with a residual connection when `shortcut` and
    the channel counts agree; the hidden width is out_channels * expansion.

    (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        shortcut: bool = True,
        expansion: float = 1.0,
        kernel_sizes: tuple[int, int] = (3, 3),
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = Conv(in_channels, hidden, kernel_sizes[0])
        self.conv2 = Conv(hidden, out_channels, kernel_sizes[1])
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
        self.bottlenecks = nn.ModuleList(self.make_bottleneck(hidden, shortcut) for _ in range(num_bottlenecks))
        self.merge_conv = Conv((2 + num_bottlenecks) * hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.split_conv(x).chunk(2, dim=1))  # 2 x (B, hidden, H, W)
        for bottleneck in self.bottlenecks:
            parts.append(bottleneck(parts[-1]))
        return self.merge_conv(torch.cat(parts, dim=1))  # (B, (2 + n) * hidden, H, W) -> (B, out, H, W)

    def make_bottleneck(self, channels: int, shortcut: bool) -> nn.Module:
        """One link of the chain: (B, channels, H, W) -> (B, channels, H, W)."""
        return Bottleneck(channels, channels, shortcut)


class C3Block(nn.Module):
    """CSP block, C3 style (YOLO11's C3k): a chain of bottlenecks on one 1x1 projection, concatenated with a second
    1x1 projection of the input, then merged by a 1x1 Conv.

    (B, in_channels, H, W) -> (B, out_channels, H, W); the hidden width is out_channels * expansion
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_bottlenecks: int = 2,
        shortcut: bool = True,
        expansion: float = 0.5,
        kernel_size: int = 3,
    ):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.main_conv = Conv(in_channels, hidden, 1)
        self.skip_conv = Conv(in_channels, hidden, 1)
        self.merge_conv = Conv(2 * hidden, out_channels, 1)
        self.bottlenecks = nn.Sequential(
            *(Bottleneck(hidden, hidden, shortcut, 1.0, (kernel_size, kernel_size)) for _ in range(num_bottlenecks))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.merge_conv(torch.cat((self.bottlenecks(self.main_conv(x)), self.skip_conv(x)), dim=1))


class C3k2Block(CSPBlock):
    """YOLO11's C3k2: a CSPBlock whose links are C3Blocks (two bottlenecks each) when c3k, else bottlenecks of half
    width. Residual connections by default.

    (B, in_channels, H, W) -> (B, out_channels, H, W)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_bottlenecks: int = 1,
        c3k: bool = False,
        expansion: float = 0.5,
        shortcut: bool = True,
    ):
        self.c3k = c3k
        super().__init__(in_channels, out_channels, num_bottlenecks, shortcut, expansion)

    def make_bottleneck(self, channels: int, shortcut: bool) -> nn.Module:
        if self.c3k:
            return C3Block(channels, channels, 2, shortcut)
        return Bottleneck(channels, channels, shortcut, expansion=0.5)


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


class Attention(nn.Module):
    """Multi-head self-attention over the H * W positions, with a depthwise 3x3 positional term on the values.

    Each head has channels / num_heads value channels and key_ratio times as many query and key channels.
    (B, channels, H, W) -> (B, channels, H, W)
    """

    def __init__(self, channels: int, num_heads: int, key_ratio: float = 0.5):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads must divide channels ({channels}), got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.key_dim = int(self.head_dim * key_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(channels, channels + 2 * self.key_dim * num_heads, 1, activation=False)
        self.output_proj = Conv(channels, channels, 1, activation=False)
        self.position_conv = Conv(channels, channels, 3, groups=channels, activation=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        per_head = self.qkv(x).view(batch, self.num_heads, 2 * self.key_dim + self.head_dim, height * width)
        query, key, value = per_head.split([self.key_dim, self.key_dim, self.head_dim], dim=2)  # (B, h, d, N)
        weights = ((query.transpose(-2, -1) @ key) * self.scale).softmax(dim=-1)  # (B, h, N, N)
        attended = (value @ weights.transpose(-2, -1)).view(batch, channels, height, width)
        return self.output_proj(attended + self.position_conv(value.reshape(batch, channels, height, width)))


class PSABlock(nn.Module):
    """Position-sensitive attention block: x + Attention(x), then + a 1x1 feed-forward (2x wide).

    (B, channels, H, W) -> (B, channels, H, W)
    """

    def __init__(self, channels: int, num_heads: int, key_ratio: float = 0.5):
        super().__init__()
        self.attention = Attention(channels, num_heads, key_ratio)
        self.feed_forward = nn.Sequential(
            Conv(channels, 2 * channels, 1), Conv(2 * channels, channels, 1, activation=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class C2PSABlock(nn.Module):
    """YOLO11's C2PSA: a 1x1 Conv split into two halves, PSABlocks (one head per 64 channels) on the second, a 1x1
    Conv over both. (B, channels, H, W) -> (B, channels, H, W)
    """

    def __init__(self, channels: int, num_blocks: int = 1, expansion: float = 0.5):
        super().__init__()
        hidden = int(channels * expansion)
        self.split_conv = Conv(channels, 2 * hidden, 1)
        self.merge_conv = Conv(2 * hidden, channels, 1)
        self.blocks = nn.Sequential(*(PSABlock(hidden, max(hidden // 64, 1)) for _ in range(num_blocks)))
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:
        kept, attended = self.split_conv(x).split((self.hidden, self.hidden), dim=1)
        return self.merge_conv(torch.cat((kept, self.blocks(attended)), dim=1))


class Concat(nn.Module):
    """Concatenates a list of (B, C_i, H, W) tensors along the channels."""

    def forward(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(tensors), dim=1)


class ProtoBranch(nn.Module):
    """Mask prototypes with a learned 2x upsample (a stride-2 transposed convolution):
    (B, in_channels, H / 8, W / 8) -> (B, num_protos, H / 4, W / 4)
    """

    def __init__(self, in_channels: int, hidden: int, num_protos: int):
        super().__init__()
        self.conv1 = Conv(in_channels, hidden, 3)
        self.upsample = nn.ConvTranspose2d(hidden, hidden, 2, 2, 0, bias=True)
        self.conv2 = Conv(hidden, hidden, 3)
        self.conv3 = Conv(hidden, num_protos, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.conv2(self.upsample(self.conv1(x))))


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
