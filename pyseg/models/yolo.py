"""The YOLO11-seg and YOLOv8-seg families, built from pyseg's blocks by the published model configs.

A family is a layer list in the published configs' own vocabulary, (source, repeats, block, args) per layer, with
channel counts at width 1.0 and repeats at depth 1.0, and a table of scales n/s/m/l/x giving (depth multiple, width
multiple, max channels). The last layer is the segment head over the three layers it names (strides 8, 16, 32).

Shapes follow pyseg.models.seg_model: B images of H x W pixels (multiples of 32), A anchors over the three levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from pyseg.models.blocks import (
    SPPF,
    C2PSABlock,
    C3k2Block,
    Concat,
    Conv,
    CSPBlock,
    DepthwiseConv,
    ProtoBranch,
)
from pyseg.models.seg_model import DecoupledHead, SegOutputs, scale_depth, scale_width


@dataclass(frozen=True)
class Family:
    """A published model family: its layer list (the config's backbone then head) and its scales."""

    name: str  # "yolo11" | "yolov8"
    layers: tuple[tuple, ...]  # (source, repeats, block, args): source -1 is the previous layer
    scales: dict[str, tuple[float, float, int]]  # scale -> (depth multiple, width multiple, max channels)


_UP = (-1, 1, "nn.Upsample", [None, 2, "nearest"])

YOLO11_SEG = Family(
    name="yolo11",
    layers=(
        (-1, 1, "Conv", [64, 3, 2]),  # 0: stride 2
        (-1, 1, "Conv", [128, 3, 2]),  # 1: stride 4
        (-1, 2, "C3k2", [256, False, 0.25]),
        (-1, 1, "Conv", [256, 3, 2]),  # 3: stride 8
        (-1, 2, "C3k2", [512, False, 0.25]),
        (-1, 1, "Conv", [512, 3, 2]),  # 5: stride 16
        (-1, 2, "C3k2", [512, True]),
        (-1, 1, "Conv", [1024, 3, 2]),  # 7: stride 32
        (-1, 2, "C3k2", [1024, True]),
        (-1, 1, "SPPF", [1024, 5]),
        (-1, 2, "C2PSA", [1024]),  # 10
        _UP,
        ([-1, 6], 1, "Concat", [1]),
        (-1, 2, "C3k2", [512, False]),  # 13
        _UP,
        ([-1, 4], 1, "Concat", [1]),
        (-1, 2, "C3k2", [256, False]),  # 16: stride 8 out
        (-1, 1, "Conv", [256, 3, 2]),
        ([-1, 13], 1, "Concat", [1]),
        (-1, 2, "C3k2", [512, False]),  # 19: stride 16 out
        (-1, 1, "Conv", [512, 3, 2]),
        ([-1, 10], 1, "Concat", [1]),
        (-1, 2, "C3k2", [1024, True]),  # 22: stride 32 out
        ([16, 19, 22], 1, "Segment", ["nc", 32, 256]),
    ),
    scales={
        "n": (0.50, 0.25, 1024),
        "s": (0.50, 0.50, 1024),
        "m": (0.50, 1.00, 512),
        "l": (1.00, 1.00, 512),
        "x": (1.00, 1.50, 512),
    },
)

YOLOV8_SEG = Family(
    name="yolov8",
    layers=(
        (-1, 1, "Conv", [64, 3, 2]),  # 0: stride 2
        (-1, 1, "Conv", [128, 3, 2]),  # 1: stride 4
        (-1, 3, "C2f", [128, True]),
        (-1, 1, "Conv", [256, 3, 2]),  # 3: stride 8
        (-1, 6, "C2f", [256, True]),
        (-1, 1, "Conv", [512, 3, 2]),  # 5: stride 16
        (-1, 6, "C2f", [512, True]),
        (-1, 1, "Conv", [1024, 3, 2]),  # 7: stride 32
        (-1, 3, "C2f", [1024, True]),
        (-1, 1, "SPPF", [1024, 5]),  # 9
        _UP,
        ([-1, 6], 1, "Concat", [1]),
        (-1, 3, "C2f", [512]),  # 12
        _UP,
        ([-1, 4], 1, "Concat", [1]),
        (-1, 3, "C2f", [256]),  # 15: stride 8 out
        (-1, 1, "Conv", [256, 3, 2]),
        ([-1, 12], 1, "Concat", [1]),
        (-1, 3, "C2f", [512]),  # 18: stride 16 out
        (-1, 1, "Conv", [512, 3, 2]),
        ([-1, 9], 1, "Concat", [1]),
        (-1, 3, "C2f", [1024]),  # 21: stride 32 out
        ([15, 18, 21], 1, "Segment", ["nc", 32, 256]),
    ),
    scales={
        "n": (0.33, 0.25, 1024),
        "s": (0.33, 0.50, 1024),
        "m": (0.67, 0.75, 768),
        "l": (1.00, 1.00, 512),
        "x": (1.00, 1.25, 512),
    },
)

FAMILIES: dict[str, Family] = {family.name: family for family in (YOLO11_SEG, YOLOV8_SEG)}


class YoloSegmentHead(DecoupledHead):
    """The segment head: per level a box branch (two 3x3 Convs, 1x1 to 4 * reg_max), a class branch and a
    mask-coefficient branch (two 3x3 Convs, 1x1 to num_protos); prototypes from level 0 (ProtoBranch).

    The class branch is two 3x3 Convs (YOLOv8) or, when depthwise_classes, two (depthwise 3x3, 1x1) pairs (YOLO11).
    (B, c_l, h_l, w_l) for each level -> SegOutputs
    """

    def __init__(
        self,
        nc: int,
        in_channels: Sequence[int],
        num_protos: int,
        proto_channels: int,
        depthwise_classes: bool,
        strides: Sequence[int] = (8, 16, 32),
        reg_max: int = 16,
    ):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, tuple(strides)
        box_hidden = max(16, in_channels[0] // 4, 4 * reg_max)
        class_hidden = max(in_channels[0], min(nc, 100))
        mask_hidden = max(in_channels[0] // 4, num_protos)
        self.box_branches = nn.ModuleList(
            nn.Sequential(
                Conv(c, box_hidden, 3), Conv(box_hidden, box_hidden, 3), nn.Conv2d(box_hidden, 4 * reg_max, 1)
            )
            for c in in_channels
        )
        self.class_branches = nn.ModuleList(
            _depthwise_class_branch(c, class_hidden, nc)
            if depthwise_classes
            else nn.Sequential(
                Conv(c, class_hidden, 3), Conv(class_hidden, class_hidden, 3), nn.Conv2d(class_hidden, nc, 1)
            )
            for c in in_channels
        )
        self.prototypes = ProtoBranch(in_channels[0], proto_channels, num_protos)
        self.mask_branches = nn.ModuleList(
            nn.Sequential(
                Conv(c, mask_hidden, 3), Conv(mask_hidden, mask_hidden, 3), nn.Conv2d(mask_hidden, num_protos, 1)
            )
            for c in in_channels
        )
        self.reset_biases()


def _depthwise_class_branch(in_channels: int, hidden: int, nc: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(DepthwiseConv(in_channels, in_channels, 3), Conv(in_channels, hidden, 1)),
        nn.Sequential(DepthwiseConv(hidden, hidden, 3), Conv(hidden, hidden, 1)),
        nn.Conv2d(hidden, nc, 1),
    )


class YoloSegModel(nn.Module):
    """A YOLO11-seg or YOLOv8-seg model: images (B, 3, H, W) float in [0, 1] -> SegOutputs.

    layers[i] is the config's layer i; sources[i] is where its input comes from (-1: the previous layer's output,
    an index or a list of indices: those layers' outputs).
    """

    strides: tuple[int, ...] = (8, 16, 32)
    reg_max: int = 16

    def __init__(self, family: str, scale: str, nc: int):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        spec = FAMILIES[family]
        if scale not in spec.scales:
            raise ValueError(f"scale must be one of {', '.join(spec.scales)}, got {scale!r}")
        if nc < 1:
            raise ValueError(f"nc (the number of classes) must be >= 1, got {nc}")
        self.family, self.scale, self.nc = family, scale, nc
        self.name = f"{family}{scale}-seg"
        depth, width, max_channels = spec.scales[scale]
        channels: list[int] = []  # output channels of each layer
        layers, sources = [], []
        for index, (source, repeats, block, args) in enumerate(spec.layers):
            repeats = scale_depth(repeats, depth) if repeats > 1 else repeats
            previous = (channels[source] if channels else 3) if isinstance(source, int) else None
            if block == "Conv":
                out = scale_width(args[0], width, max_channels)
                layer = Conv(previous, out, args[1], args[2])
            elif block == "C2f":
                out = scale_width(args[0], width, max_channels)
                layer = CSPBlock(previous, out, repeats, shortcut=bool(args[1]) if len(args) > 1 else False)
            elif block == "C3k2":
                out = scale_width(args[0], width, max_channels)
                c3k = scale in "mlx" or bool(args[1])  # the larger scales use C3k links everywhere
                layer = C3k2Block(previous, out, repeats, c3k, args[2] if len(args) > 2 else 0.5)
            elif block == "SPPF":
                out = scale_width(args[0], width, max_channels)
                layer = SPPF(previous, out, args[1])
            elif block == "C2PSA":
                out = previous  # C2PSA keeps its input's channels
                layer = C2PSABlock(previous, repeats)
            elif block == "nn.Upsample":
                out, layer = previous, nn.Upsample(scale_factor=args[1], mode=args[2])
            elif block == "Concat":
                out, layer = sum(channels[i] for i in source), Concat()
            elif block == "Segment":
                proto_channels = scale_width(args[2], width, max_channels)
                layer = YoloSegmentHead(
                    nc, [channels[i] for i in source], args[1], proto_channels, depthwise_classes=family == "yolo11"
                )
                out = 0
            else:  # pragma: no cover - the family tables hold only the blocks above
                raise AssertionError(f"layer {index}: unknown block {block}")
            if block not in ("C3k2", "C2f", "C2PSA") and repeats != 1:  # pragma: no cover - as above
                raise AssertionError(f"layer {index}: {block} repeated {repeats} times")
            channels.append(out)
            layers.append(layer)
            sources.append(source)
        self.layers = nn.ModuleList(layers)
        self.sources = [s if isinstance(s, int) else list(s) for s in sources]
        # outputs that a later layer reads by index (not only as "the previous layer") are kept during forward
        self.kept = {i for s in self.sources for i in ([s] if isinstance(s, int) else s) if i != -1}
        self.num_protos = int(spec.layers[-1][3][1])

    @property
    def head(self) -> YoloSegmentHead:
        return self.layers[-1]

    def forward(self, images: Tensor) -> SegOutputs:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 32 != 0 or images.shape[3] % 32 != 0:
            raise ValueError(
                f"images must have shape (B, 3, H, W) with H and W multiples of 32, got {tuple(images.shape)}"
            )
        x: Tensor | list[Tensor] = images
        kept: dict[int, Tensor] = {}
        for index, (layer, source) in enumerate(zip(self.layers, self.sources, strict=True)):
            if isinstance(source, list):
                x = [x if i == -1 else kept[i] for i in source]
            elif source != -1:
                x = kept[source]
            x = layer(x)
            if index in self.kept:
                kept[index] = x
        return x

    def load_state_dict_partial(self, state_dict) -> list[str]:
        """As SegModel.load_state_dict_partial: loads the tensors whose names and shapes match, returns the others."""
        from pyseg.models.seg_model import load_matching

        return load_matching(self, state_dict)
