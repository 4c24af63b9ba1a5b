"""The pyseg instance-segmentation models: CSP backbone, PAN neck, decoupled anchor-free head, mask prototypes.

Shapes: B images of H x W pixels (multiples of 32); three levels at strides 8, 16, 32 with h_l x w_l cells each;
A = sum_l h_l * w_l anchors, ordered level by level, row-major within a level (index y * w_l + x).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pyseg.config import MODEL_NAMES, canonical_model_name
from pyseg.models.blocks import SPPF, Conv, CSPBlock, expected_distances

# name -> (depth multiple, width multiple, max channels before the width multiple)
MODEL_SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
}

BASE_WIDTHS = (64, 128, 256, 512, 1024)  # channels at strides 2, 4, 8, 16, 32 at width 1.0
BASE_BACKBONE_DEPTHS = (3, 6, 6, 3)  # bottlenecks of the CSP blocks at strides 4, 8, 16, 32 at depth 1.0
BASE_NECK_DEPTH = 3  # bottlenecks of each neck CSP block at depth 1.0


def scale_width(channels: int, width: float, max_channels: int) -> int:
    """min(channels, max_channels) * width, rounded up to a multiple of 8."""
    return math.ceil(min(channels, max_channels) * width / 8) * 8


def scale_depth(num_blocks: int, depth: float) -> int:
    """num_blocks * depth, rounded, at least 1."""
    return max(round(num_blocks * depth), 1)


def flatten_level(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h * w, C), row-major over the cells (a view for channels_last input)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


@dataclass
class SegOutputs:
    """Raw outputs of SegModel for B images of H x W pixels; A anchors over the three levels.

    box_distribution: (B, A, 4 * reg_max) logits of the l, t, r, b distance distributions (side-major, stride units)
    class_logits: (B, A, nc)
    mask_coeffs: (B, A, num_protos)
    protos: (B, num_protos, H / 4, W / 4)
    feature_shapes: (h_l, w_l) of each level (strides 8, 16, 32); A = sum h_l * w_l
    """

    box_distribution: Tensor
    class_logits: Tensor
    mask_coeffs: Tensor
    protos: Tensor
    feature_shapes: list[tuple[int, int]]


class Backbone(nn.Module):
    """CSP backbone: (B, 3, H, W) -> P3 (B, c3, H/8, W/8), P4 (B, c4, H/16, W/16), P5 (B, c5, H/32, W/32)."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int]):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.stem = Conv(3, c1, 3, 2)  # stride 2
        self.stage2 = nn.Sequential(Conv(c1, c2, 3, 2), CSPBlock(c2, c2, depths[0], shortcut=True))  # stride 4
        self.stage3 = nn.Sequential(Conv(c2, c3, 3, 2), CSPBlock(c3, c3, depths[1], shortcut=True))  # stride 8
        self.stage4 = nn.Sequential(Conv(c3, c4, 3, 2), CSPBlock(c4, c4, depths[2], shortcut=True))  # stride 16
        self.stage5 = nn.Sequential(  # stride 32
            Conv(c4, c5, 3, 2), CSPBlock(c5, c5, depths[3], shortcut=True), SPPF(c5, c5)
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.stage3(self.stage2(self.stem(images)))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        return p3, p4, p5


class PANNeck(nn.Module):
    """FPN top-down then PAN bottom-up fusion; each output keeps its input's channels and stride.

    (P3 (B, c3, H/8, W/8), P4 (B, c4, H/16, W/16), P5 (B, c5, H/32, W/32)) -> (N3, N4, N5) of the same shapes
    """

    def __init__(self, c3: int, c4: int, c5: int, depth: int):
        super().__init__()
        self.top_down4 = CSPBlock(c5 + c4, c4, depth)
        self.top_down3 = CSPBlock(c4 + c3, c3, depth)
        self.downsample3 = Conv(c3, c3, 3, 2)
        self.bottom_up4 = CSPBlock(c3 + c4, c4, depth)
        self.downsample4 = Conv(c4, c4, 3, 2)
        self.bottom_up5 = CSPBlock(c4 + c5, c5, depth)

    def forward(self, p3: Tensor, p4: Tensor, p5: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t4 = self.top_down4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], dim=1))
        n3 = self.top_down3(torch.cat([F.interpolate(t4, scale_factor=2.0, mode="nearest"), p3], dim=1))
        n4 = self.bottom_up4(torch.cat([self.downsample3(n3), t4], dim=1))
        n5 = self.bottom_up5(torch.cat([self.downsample4(n4), p5], dim=1))
        return n3, n4, n5


def _branch(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 Convs then a 1x1 Conv2d with bias: (B, in, h, w) -> (B, out, h, w)."""
    return nn.Sequential(Conv(in_channels, hidden, 3), Conv(hidden, hidden, 3), nn.Conv2d(hidden, out_channels, 1))


class PrototypeBranch(nn.Module):
    """Mask prototypes from the stride-8 features: (B, in_channels, H / 8, W / 8) -> (B, num_protos, H / 4, W / 4)."""

    def __init__(self, in_channels: int, hidden: int, num_protos: int):
        super().__init__()
        self.conv1 = Conv(in_channels, hidden, 3)
        self.conv2 = Conv(hidden, hidden, 3)
        self.conv3 = Conv(hidden, num_protos, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(self.conv1(x), scale_factor=2.0, mode="nearest")  # stride 8 -> 4
        return self.conv3(self.conv2(x))


class DecoupledHead(nn.Module):
    """What every segment head shares: per level a box, a class and a mask-coefficient branch (box_branches,
    class_branches, mask_branches; each ends in a 1x1 Conv2d with bias) and prototypes from level 0 (prototypes).
    Subclasses build those in __init__ and set nc, reg_max and strides.
    """

    def reset_biases(self) -> None:
        """Box-distribution biases 1.0; class biases log(5 / nc / (640 / stride)^2), i.e. ~5 objects per 640 image."""
        for box_branch, class_branch, stride in zip(self.box_branches, self.class_branches, self.strides, strict=True):
            nn.init.constant_(box_branch[-1].bias, 1.0)
            nn.init.constant_(class_branch[-1].bias, math.log(5 / self.nc / (640 / stride) ** 2))

    def forward(self, features: Sequence[Tensor]) -> SegOutputs:
        boxes, classes, coeffs = [], [], []
        for x, box_branch, class_branch, mask_branch in zip(
            features, self.box_branches, self.class_branches, self.mask_branches, strict=True
        ):
            boxes.append(flatten_level(box_branch(x)))  # (B, h * w, 4 * reg_max)
            classes.append(flatten_level(class_branch(x)))  # (B, h * w, nc)
            coeffs.append(flatten_level(mask_branch(x)))  # (B, h * w, num_protos)
        return SegOutputs(
            box_distribution=torch.cat(boxes, dim=1),
            class_logits=torch.cat(classes, dim=1),
            mask_coeffs=torch.cat(coeffs, dim=1),
            protos=self.prototypes(features[0]),
            feature_shapes=[(x.shape[2], x.shape[3]) for x in features],
        )


class SegHead(DecoupledHead):
    """Decoupled anchor-free head: per level a box, a class and a mask-coefficient branch; prototypes on level 0.

    The class branch's hidden width does not depend on nc, so only its final 1x1 layers change with the class count.
    """

    def __init__(
        self,
        nc: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        reg_max: int,
        num_protos: int,
        proto_channels: int,
    ):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, tuple(strides)
        box_hidden = max(16, in_channels[0] // 4, 4 * reg_max)
        class_hidden = in_channels[0]
        mask_hidden = max(in_channels[0] // 4, num_protos)
        self.box_branches = nn.ModuleList(_branch(c, box_hidden, 4 * reg_max) for c in in_channels)
        self.class_branches = nn.ModuleList(_branch(c, class_hidden, nc) for c in in_channels)
        self.mask_branches = nn.ModuleList(_branch(c, mask_hidden, num_protos) for c in in_channels)
        self.prototypes = PrototypeBranch(in_channels[0], proto_channels, num_protos)
        self.reset_biases()


class SegModel(nn.Module):
    """YOLO-style anchor-free instance segmentation model: images (B, 3, H, W) float -> SegOutputs.

    H and W must be multiples of 32. Boxes are predicted as distributions over reg_max bins of the distance
    (in stride units) from each anchor to the box's left, top, right and bottom sides; masks as num_protos
    coefficients per anchor that combine the prototypes (B, num_protos, H / 4, W / 4).
    """

    strides: tuple[int, ...] = (8, 16, 32)

    def __init__(self, nc: int, scale: str = "n", reg_max: int = 16, num_protos: int = 32, proto_channels: int = 256):
        super().__init__()
        if nc < 1:
            raise ValueError(f"nc (the number of classes) must be >= 1, got {nc}")
        if scale not in MODEL_SCALES:
            raise ValueError(f"scale must be one of {', '.join(MODEL_SCALES)}, got {scale!r}")
        if reg_max < 1 or num_protos < 1 or proto_channels < 1:
            raise ValueError(
                f"reg_max, num_protos and proto_channels must be >= 1, got {reg_max}, {num_protos}, {proto_channels}"
            )
        depth, width, max_channels = MODEL_SCALES[scale]
        self.nc, self.scale, self.reg_max, self.num_protos = nc, scale, reg_max, num_protos
        widths = [scale_width(c, width, max_channels) for c in BASE_WIDTHS]
        self.backbone = Backbone(widths, [scale_depth(n, depth) for n in BASE_BACKBONE_DEPTHS])
        self.neck = PANNeck(widths[2], widths[3], widths[4], scale_depth(BASE_NECK_DEPTH, depth))
        self.head = SegHead(
            nc, widths[2:], self.strides, reg_max, num_protos, scale_width(proto_channels, width, max_channels)
        )

    def forward(self, images: Tensor) -> SegOutputs:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 32 != 0 or images.shape[3] % 32 != 0:
            raise ValueError(
                f"images must have shape (B, 3, H, W) with H and W multiples of 32, got {tuple(images.shape)}"
            )
        return self.head(self.neck(*self.backbone(images)))

    def load_state_dict_partial(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Loads every tensor whose name and shape match this model and returns the keys of the others.

        Meant for fine-tuning with another class count: the class branches' final layers are skipped. The
        "module." (DDP) and "_orig_mod." (torch.compile) prefixes are ignored. Parameters of this model that
        the state dict lacks keep their values.
        """
        return load_matching(self, state_dict)


def load_matching(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Loads into model every tensor of state_dict whose name (less "module." / "_orig_mod.") and shape match;
    returns the keys of the others."""
    own = model.state_dict()
    matched: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        name = key.removeprefix("module.").removeprefix("_orig_mod.")
        if name in own and own[name].shape == value.shape:
            matched[name] = value
        else:
            skipped.append(key)
    model.load_state_dict(matched, strict=False)
    return skipped


def make_anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    offset: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Anchor points of every level, in the order of SegOutputs' anchors.

    Returns:
        anchor_points: (A, 2) xy cell centres (x + offset, y + offset) in units of each level's stride
        stride_tensor: (A, 1) the stride of each anchor; anchor centre in input pixels = anchor_points * stride_tensor
    """
    points, anchor_strides = [], []
    for (height, width), stride in zip(feature_shapes, strides, strict=True):
        ys = torch.arange(height, device=device, dtype=dtype) + offset
        xs = torch.arange(width, device=device, dtype=dtype) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
        points.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))
        anchor_strides.append(torch.full((height * width, 1), stride, device=device, dtype=dtype))
    return torch.cat(points), torch.cat(anchor_strides)


def decode_boxes(box_distribution: Tensor, anchor_points: Tensor, reg_max: int) -> Tensor:
    """Boxes from the distance distributions: anchor -/+ the expected ltrb distances (DFL expectation).

    box_distribution: (B, A, 4 * reg_max) logits; anchor_points: (A, 2) in stride units (see make_anchors)
    returns: (B, A, 4) xyxy in stride units (multiply by stride_tensor for input pixels)
    """
    bin_values = torch.arange(reg_max, device=box_distribution.device, dtype=box_distribution.dtype)
    distances = expected_distances(box_distribution, bin_values)  # (B, A, 4) ltrb
    left_top, right_bottom = distances.chunk(2, dim=-1)
    return torch.cat((anchor_points - left_top, anchor_points + right_bottom), dim=-1)


def build_model(model: str, nc: int) -> nn.Module:
    """A model by name, with nc classes and random weights: 'pyseg-n' | 'pyseg-s' | 'pyseg-m' (or 'n' | 's' |
    'm'), 'yolo11{n,s,m,l,x}-seg' or 'yolov8{n,s,m,l,x}-seg' (a '.yaml' suffix is allowed, as Ultralytics users
    write it). Every model maps images (B, 3, H, W) to SegOutputs and has .strides, .reg_max and .nc."""
    from pyseg.models.yolo import YoloSegModel

    name = canonical_model_name(model)
    if name is None:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name.startswith("pyseg-"):
        return SegModel(nc, scale=name.removeprefix("pyseg-"))
    family, scale = name[:-5], name[-5]  # "yolo11n-seg" -> "yolo11", "n"
    return YoloSegModel(family, scale, nc)


def model_info(model: nn.Module, imgsz: int = 640) -> dict:
    """{'parameters': int, 'gflops': float}: parameter count and FLOPs / 1e9 of one (1, 3, imgsz, imgsz) image.

    FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (a multiply-add counts 2) in eval mode under
    torch.no_grad(); the model's training mode is restored afterwards.
    """
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, imgsz, imgsz, device=first.device, dtype=first.dtype))
    finally:
        model.train(was_training)
    return {"parameters": sum(p.numel() for p in model.parameters()), "gflops": counter.get_total_flops() / 1e9}
