"""Ultralytics YOLO11-seg / YOLOv8-seg checkpoints as pyseg models.

The file is read without Ultralytics and without running anything from it (pyseg.models.pickle_records). The
architecture comes from the checkpoint's own model description (its layer list, scale and nc), which must be one of
pyseg's families (pyseg.models.yolo). Tensors are matched to pyseg's modules by structure: each pyseg block knows the
Ultralytics block it computes and the names of that block's children, so every tensor of the checkpoint is placed
(or, for the DFL's fixed bin weights, checked) and every tensor of the pyseg model is filled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pyseg.errors import CheckpointError
from pyseg.models.blocks import (
    SPPF,
    Attention,
    Bottleneck,
    C2PSABlock,
    C3Block,
    C3k2Block,
    Concat,
    Conv,
    CSPBlock,
    DepthwiseConv,
    ProtoBranch,
    PSABlock,
)
from pyseg.models.pickle_records import PickledRecord, load_as_records, module_records, module_tensors
from pyseg.models.yolo import FAMILIES, YoloSegmentHead, YoloSegModel

WHAT = "an Ultralytics checkpoint"
WHERE_FROM = (
    "Ultralytics publishes yolo11{n,s,m,l,x}-seg.pt and yolov8{n,s,m,l,x}-seg.pt as release assets of its "
    "ultralytics/assets GitHub repository (`yolo predict model=yolo11n-seg.pt` also downloads one); pyseg does not "
    "download weights: give the path of the file"
)

# pyseg block -> (the Ultralytics block it computes, {pyseg child name: Ultralytics child name})
STRUCTURE: dict[type, tuple[str, dict[str, str]]] = {
    YoloSegModel: ("SegmentationModel", {"layers": "model"}),
    Conv: ("Conv", {}),
    DepthwiseConv: ("DWConv", {}),
    Bottleneck: ("Bottleneck", {"conv1": "cv1", "conv2": "cv2"}),
    CSPBlock: ("C2f", {"split_conv": "cv1", "merge_conv": "cv2", "bottlenecks": "m"}),
    C3k2Block: ("C3k2", {"split_conv": "cv1", "merge_conv": "cv2", "bottlenecks": "m"}),
    C3Block: ("C3k", {"main_conv": "cv1", "skip_conv": "cv2", "merge_conv": "cv3", "bottlenecks": "m"}),
    SPPF: ("SPPF", {"reduce_conv": "cv1", "merge_conv": "cv2"}),
    C2PSABlock: ("C2PSA", {"split_conv": "cv1", "merge_conv": "cv2", "blocks": "m"}),
    PSABlock: ("PSABlock", {"attention": "attn", "feed_forward": "ffn"}),
    Attention: ("Attention", {"output_proj": "proj", "position_conv": "pe"}),
    YoloSegmentHead: (
        "Segment",
        {"box_branches": "cv2", "class_branches": "cv3", "mask_branches": "cv4", "prototypes": "proto"},
    ),
    ProtoBranch: ("Proto", {"conv1": "cv1", "conv2": "cv2", "conv3": "cv3"}),
    Concat: ("Concat", {}),
}
DFL_WEIGHT = "dfl.conv.weight"  # the head's fixed DFL bins (0..15): pyseg computes them, the checkpoint stores them


@dataclass
class UltralyticsCheckpoint:
    """What pyseg takes from an Ultralytics checkpoint: the model (by pyseg name), class names and the weights
    under pyseg's tensor names, float32, for YoloSegModel(family, scale, nc)."""

    path: Path
    model_name: str  # e.g. "yolo11n-seg"
    names: list[str]
    state_dict: dict[str, Tensor]
    imgsz: int | None  # the image size it was trained at, when the file says
    version: str | None  # the Ultralytics version that wrote it
    data: str | None = None  # the dataset YAML it was trained on, when the file says

    @property
    def nc(self) -> int:
        return len(self.names)


def is_ultralytics_file(path: Path) -> bool:
    """Whether a torch file's pickle names Ultralytics classes (read without unpickling anything)."""
    try:
        return any(
            n.startswith("ultralytics.") for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        )
    except Exception:  # noqa: BLE001 - not a torch file at all: not an Ultralytics one either
        return False


def read_ultralytics_checkpoint(path: str | Path) -> UltralyticsCheckpoint:
    """Reads an Ultralytics segmentation checkpoint (.pt) into pyseg's terms; CheckpointError says what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. {WHERE_FROM}")
    content = load_as_records(path, WHAT)
    if not isinstance(content, dict) or not isinstance(content.get("model"), PickledRecord):
        if isinstance(content, dict) and {"model", "config", "names"} <= set(content):
            raise CheckpointError(
                f"{path} is a pyseg checkpoint, not an Ultralytics one: pyseg reads it as it is (pass it to --weights)"
            )
        raise CheckpointError(f"{path} is a torch file but not {WHAT} (it holds no 'model'); give a YOLO .pt file")
    model = content.get("ema") if isinstance(content.get("ema"), PickledRecord) else content["model"]
    description = model.attribute("yaml")
    if not isinstance(description, dict):
        raise CheckpointError(f"{path}: its model has no layer list ('yaml'); pyseg cannot tell its architecture")
    family = _family_of(description, path)
    tensors = {name: tensor for name, tensor, _ in module_tensors(model)}
    nc = _class_count(model, description, tensors, path)
    candidates = [description["scale"]] if description.get("scale") in family.scales else _scales_named(description)
    problems = []
    for scale in candidates or list(family.scales):
        pyseg_model = YoloSegModel(family.name, scale, nc)
        try:
            state = match_tensors(pyseg_model, model, tensors)
        except CheckpointError as error:
            problems.append(f"{family.name}{scale}-seg: {error}")
            continue
        return UltralyticsCheckpoint(
            path=path,
            model_name=pyseg_model.name,
            names=_class_names(model, nc),
            state_dict=state,
            imgsz=_train_imgsz(content),
            data=_train_arg(content, "data", str),
            version=content.get("version") if isinstance(content.get("version"), str) else None,
        )
    raise CheckpointError(f"{path}: its tensors fit no {family.name}-seg scale pyseg has ({problems[0]})")


def match_tensors(model: nn.Module, record: PickledRecord, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """pyseg state dict (float32) of `model` filled from a recorded Ultralytics model, matched block by block.

    Raises CheckpointError naming the first block or tensor that does not correspond, or a checkpoint tensor left
    over. The DFL bins are checked to be 0..reg_max-1.
    """
    records = dict(module_records(record))
    names = foreign_names(model)
    state: dict[str, Tensor] = {}
    own = model.state_dict()
    for path, expected in _expected_blocks(model):
        found = records.get(path)
        if found is None or found.class_name != expected:
            raise CheckpointError(
                f"block {path or 'model'} is {found.class_name if found else 'missing'}, pyseg expects {expected}"
            )
    for ours, theirs in names.items():
        tensor = tensors.get(theirs)
        if tensor is None:
            raise CheckpointError(f"it lacks {theirs} (pyseg's {ours})")
        if tuple(tensor.shape) != tuple(own[ours].shape):
            raise CheckpointError(f"{theirs} has shape {tuple(tensor.shape)}, pyseg expects {tuple(own[ours].shape)}")
        state[ours] = tensor.to(own[ours].dtype)  # float16 files become float32, counters stay int64
    placed = set(names.values())
    for theirs, tensor in tensors.items():
        if theirs in placed:
            continue
        if theirs.endswith(DFL_WEIGHT):
            bins = torch.arange(tensor.numel(), dtype=torch.float32).view_as(tensor)
            if tensor.numel() != 16 or not torch.equal(tensor.float(), bins):
                raise CheckpointError(f"{theirs} is not the fixed DFL bins 0..15 that pyseg computes")
            continue
        raise CheckpointError(f"its tensor {theirs} has no place in pyseg's model")
    return state


def foreign_names(model: nn.Module) -> dict[str, str]:
    """{pyseg state_dict name: Ultralytics state_dict name} of every tensor of model, by STRUCTURE's renames."""
    names: dict[str, str] = {}

    def walk(module: nn.Module, ours: str, theirs: str) -> None:
        renames = STRUCTURE.get(type(module), ("", {}))[1]
        for name in module.state_dict(keep_vars=True, prefix="").keys():
            if "." not in name:  # the module's own tensors; its children's are handled below
                names[ours + name] = theirs + name
        for name, child in module.named_children():
            walk(child, f"{ours}{name}.", f"{theirs}{renames.get(name, name)}.")

    walk(model, "", "")
    return names


def _expected_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """(Ultralytics module path, the Ultralytics block name it must be) of every pyseg block in STRUCTURE."""
    expected = []

    def walk(module: nn.Module, theirs: str) -> None:
        if type(module) in STRUCTURE:
            expected.append((theirs, STRUCTURE[type(module)][0]))
        renames = STRUCTURE.get(type(module), ("", {}))[1]
        for name, child in module.named_children():
            walk(child, f"{theirs}.{renames.get(name, name)}".lstrip("."))

    walk(model, "")
    return expected


def _normalised(layers) -> list:
    """A layer list with 'None' and None alike, tuples as lists (YAML and Python spell them differently)."""

    def clean(value):
        if value == "None":
            return None
        if isinstance(value, tuple | list):
            return [clean(v) for v in value]
        return value

    return [clean(layer) for layer in layers]


def _family_of(description: dict, path: Path):
    layers = _normalised(list(description.get("backbone") or []) + list(description.get("head") or []))
    for family in FAMILIES.values():
        if layers == _normalised(family.layers):
            return family
    kinds = sorted({str(layer[2]) for layer in layers if isinstance(layer, list) and len(layer) > 2})
    label = description.get("yaml_file") or "its layer list"
    raise CheckpointError(
        f"{path}: {label} is an architecture pyseg does not have (blocks {', '.join(kinds) or 'unknown'}); pyseg "
        f"imports yolo11{{n,s,m,l,x}}-seg and yolov8{{n,s,m,l,x}}-seg checkpoints"
    )


def _scales_named(description: dict) -> list[str]:
    """The scale a checkpoint's config file name states ('yolov8s-seg.yaml' -> ['s']), else []."""
    match = re.search(r"(?:yolo11|yolov8)([nslmx])", str(description.get("yaml_file") or ""))
    return [match.group(1)] if match else []


def _class_count(model: PickledRecord, description: dict, tensors: dict[str, Tensor], path: Path) -> int:
    head = len(description.get("backbone") or []) + len(description.get("head") or []) - 1
    final = tensors.get(f"model.{head}.cv3.0.2.weight")
    if final is None:
        raise CheckpointError(f"{path}: its segment head has no class layer (model.{head}.cv3.0.2.weight)")
    return int(final.shape[0])


def _class_names(model: PickledRecord, nc: int) -> list[str]:
    names = model.attribute("names")
    if isinstance(names, dict) and sorted(names) == list(range(nc)):
        return [str(names[i]) for i in range(nc)]
    if isinstance(names, list | tuple) and len(names) == nc:
        return [str(n) for n in names]
    return [f"class{i}" for i in range(nc)]


def _train_arg(content: dict, key: str, kind: type):
    """A training argument the file records (train_args), when it is of the kind given."""
    args = content.get("train_args")
    if isinstance(args, PickledRecord):
        args = args.state if isinstance(args.state, dict) else None
    value = args.get(key) if isinstance(args, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _train_imgsz(content: dict) -> int | None:
    value = _train_arg(content, "imgsz", int)
    return value if value and value > 0 else None
