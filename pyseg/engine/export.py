"""Export a checkpoint to ONNX or TorchScript: the raw outputs, or end to end (NMS and masks inside the graph).

Raw outputs, for B images (B, 3, H, W) float RGB in [0, 1] (H, W multiples of 32):
    boxes (B, A, 4) xyxy input pixels, scores (B, A, nc) in [0, 1], mask_coeffs (B, A, K), protos (B, K, H/4, W/4)
End to end, for one image (1, 3, H, W):
    boxes (N, 4) xyxy input pixels, scores (N,), classes (N,) int64, masks (N, H, W) uint8 (1 inside)

Graphs hold only standard operators: pyseg's own ops (torch.ops.pyseg.*) are never called on this path, the masks
are assembled by their pure-torch definition (pyseg.ops.reference), and NMS is torchvision's, which ONNX writes as
NonMaxSuppression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import pyseg
from pyseg.engine.boxes import batched_nms
from pyseg.engine.predict import CROP_SHIFT_PX, decoded_boxes
from pyseg.errors import CheckpointError, ConfigError, UserError

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}
ONNX_OPSET = 17  # pinned: onnxruntime 1.14+ and TensorRT 8.6+ read it
RAW_OUTPUTS = ("boxes", "scores", "mask_coeffs", "protos")
END2END_OUTPUTS = ("boxes", "scores", "classes", "masks")
METADATA_FILE = "pyseg.json"  # TorchScript: the metadata as an extra file of the archive
PROTO_STRIDE = 4  # prototypes are at 1/4 of the input size in every model pyseg builds


@dataclass(frozen=True)
class ExportOptions:
    """What `python -m pyseg.export` was asked for (see its --help)."""

    format: str = "onnx"
    imgsz: int | None = None  # None: the checkpoint's
    batch: int = 1
    dynamic: bool = False
    half: bool = False
    end2end: bool = False
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    device: str = ""


class RawOutputs(nn.Module):
    """A pyseg model with its boxes decoded: images (B, 3, H, W) -> boxes, scores, mask_coeffs, protos."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.strides = tuple(int(s) for s in model.strides)
        self.reg_max = int(model.reg_max)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.model(images)
        boxes = decoded_boxes(out, self.strides, self.reg_max)
        return boxes, out.class_logits.sigmoid(), out.mask_coeffs, out.protos


class EndToEnd(nn.Module):
    """Raw outputs, then what pyseg.predict does in input pixels: best class per anchor, score > conf, class-aware
    NMS at iou, at most max_det, masks cropped to their boxes (Ultralytics' pixel rule, CROP_SHIFT_PX) and
    upsampled to the input size. One image: (1, 3, H, W) -> boxes, scores, classes, masks."""

    def __init__(self, model: nn.Module, conf: float, iou: float, max_det: int):
        super().__init__()
        self.raw = RawOutputs(model)
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores, coeffs, protos = self.raw(images)
        boxes, scores, coeffs = boxes[0].float(), scores[0].float(), coeffs[0].float()
        best, classes = scores.max(-1)
        keep = torch.nonzero(best > self.conf).flatten()
        boxes, best, classes, coeffs = boxes[keep], best[keep], classes[keep], coeffs[keep]
        kept = batched_nms(boxes, best, classes, self.iou)[: self.max_det]
        boxes, best, classes, coeffs = boxes[kept], best[kept], classes[kept], coeffs[kept]
        return boxes, best, classes, masks_at_input(protos[0].float(), coeffs, boxes)


def masks_at_input(protos: Tensor, coeffs: Tensor, boxes: Tensor) -> Tensor:
    """(N, H, W) uint8 masks at the input size (PROTO_STRIDE x the prototypes'): pyseg.predict.masks_in_input's
    math in pure torch, written without shape-dependent Python (one image; any N, 0 included).

    protos (K, h, w), coeffs (N, K), boxes (N, 4) xyxy input pixels."""
    import torch.nn.functional as F

    from pyseg.ops.reference import box_crop

    # bilinear upsampling is linear: the prototypes are upsampled once, then combined (the same logits as
    # combining, then upsampling N masks; and no empty tensor to upsample when N is 0)
    upsampled = F.interpolate(protos[None], scale_factor=PROTO_STRIDE, mode="bilinear", align_corners=False)[0]
    channels, height, width = upsampled.shape
    logits = (coeffs @ upsampled.reshape(channels, -1)).reshape(-1, height, width)
    # (the predict path scales the shifted boxes to the prototypes and back up, by powers of two: exact)
    crop = box_crop(boxes + CROP_SHIFT_PX, logits.shape[1], logits.shape[2])
    return ((logits.sigmoid() * crop) > 0.5).to(torch.uint8)


def output_path(weights: Path, fmt: str, out: str | None) -> Path:
    """--out (a file, or a folder to write the weights' name into), else the weights' path with the format's
    suffix (best.pt -> best.onnx). ConfigError for an --out of the other format's suffix, or where nothing can be
    written: checked before the export's work."""
    import tempfile

    if not out:
        path = weights.with_suffix(FORMATS[fmt])
    else:
        path = Path(out).expanduser()
        if path.is_dir():
            path = path / weights.with_suffix(FORMATS[fmt]).name
        other = [name for name, suffix in FORMATS.items() if name != fmt and path.suffix.lower() == suffix]
        if other:
            raise ConfigError(f"--out {out} names a {other[0]} file, but --format is {fmt}: match the two")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        flag = f"--out {out}" if out else f"--weights {weights} (the export goes beside it; pass --out)"
        raise ConfigError(f"{flag}: cannot write {path} ({error.strerror or error}); pick a writable place") from error
    return path


def check_options(options: ExportOptions, device: torch.device) -> None:
    """ConfigError (one line) for a format pyseg does not export, or a --half it cannot do."""
    if options.format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    if options.half and device.type != "cuda":
        raise ConfigError(
            f"--half exports float16 {options.format}, which needs a CUDA device (--device 0): float16 convolutions "
            "do not run on the CPU; leave out --half for a float32 file"
        )
    if options.end2end and options.batch != 1:
        raise ConfigError(f"--end2end exports one image at a time: --batch must be 1, got {options.batch}")


def metadata(names: list[str], imgsz: int, model: nn.Module, options: ExportOptions, model_name: str) -> dict:
    """What a reader of the file needs: class names, image size, strides, the outputs and pyseg's version."""
    return {
        "pyseg_version": pyseg.__version__,
        "model": model_name,
        "names": list(names),
        "imgsz": imgsz,
        "stride": max(int(s) for s in model.strides),
        "strides": [int(s) for s in model.strides],
        "end2end": options.end2end,
        "outputs": list(END2END_OUTPUTS if options.end2end else RAW_OUTPUTS),
        "conf": options.conf if options.end2end else None,
        "iou": options.iou if options.end2end else None,
        "max_det": options.max_det if options.end2end else None,
        "dynamic": options.dynamic,
        "half": options.half,
        "opset": ONNX_OPSET if options.format == "onnx" else None,
    }


def export_model(weights: str | Path, options: ExportOptions, out: str | None = None) -> Path:
    """Writes the export of the checkpoint `weights` (a pyseg run's .pt or an Ultralytics YOLO11/YOLOv8-seg .pt)
    and returns its path. UserError (one line) for a bad option or an unreadable checkpoint."""
    from pyseg.config import check_value
    from pyseg.engine.device import select_device
    from pyseg.models.weights import load_model

    for key in ("conf", "iou", "max_det", "imgsz", "batch"):
        value = getattr(options, key)
        if value is not None:
            check_value(key, value)
    device = select_device(options.device)
    check_options(options, device)
    weights = Path(weights).expanduser()
    model, cfg, names = load_model(weights, device)  # cfg.model: the file's model, canonical
    imgsz = options.imgsz or cfg.imgsz
    path = output_path(weights, options.format, out)  # before the work: a place that cannot be written is one line
    model = model.half() if options.half else model.float()
    module = EndToEnd(model, options.conf, options.iou, options.max_det) if options.end2end else RawOutputs(model)
    module = module.to(device).eval()
    example = torch.zeros(options.batch, 3, imgsz, imgsz, device=device, dtype=torch.half if options.half else None)
    info = metadata(names, imgsz, model, options, cfg.model)
    if options.format == "onnx":
        export_onnx(module, example, path, info, options)
    else:
        export_torchscript(module, example, path, info)
    return path


def export_torchscript(module: nn.Module, example: Tensor, path: Path, info: dict) -> None:
    """torch.jit.trace of the module, with the metadata as the archive's extra file pyseg.json."""
    import warnings

    from pyseg.files import atomic_write

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: expected
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation: TorchScript is what was asked for
        traced = torch.jit.trace(module, example, strict=False, check_trace=False)
        extra = {METADATA_FILE: json.dumps(info)}
        atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files=extra))


def export_onnx(module: nn.Module, example: Tensor, path: Path, info: dict, options: ExportOptions) -> None:
    """torch.onnx (the tracing exporter: it writes NMS as NonMaxSuppression) at ONNX_OPSET, the metadata as the
    model's metadata_props (each value JSON)."""
    import io
    import warnings

    onnx = _require("onnx", "--format onnx")
    import torchvision.ops  # noqa: F401  (registers the ONNX form of torchvision's NMS)

    outputs = list(END2END_OUTPUTS if options.end2end else RAW_OUTPUTS)
    dynamic_axes = None
    if options.dynamic:
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        if options.end2end:
            dynamic_axes = {"images": {2: "height", 3: "width"}, **{name: {0: "detections"} for name in outputs}}
            dynamic_axes["masks"] = {0: "detections", 1: "height", 2: "width"}
        else:
            dynamic_axes.update({name: {0: "batch"} for name in outputs})
            dynamic_axes["boxes"] = dynamic_axes["scores"] = dynamic_axes["mask_coeffs"] = {0: "batch", 1: "anchors"}
            dynamic_axes["protos"] = {0: "batch", 2: "proto_height", 3: "proto_width"}
    elif options.end2end:
        dynamic_axes = {name: {0: "detections"} for name in outputs}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracing exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    for key, value in info.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(graph)

    from pyseg.files import atomic_write

    atomic_write(path, lambda f: f.write(graph.SerializeToString()))


def read_onnx_metadata(path: Path) -> dict:
    """The metadata pyseg stored in an exported ONNX file (values decoded from JSON); {} for a foreign file."""
    onnx = _require("onnx", f"reading {path}")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and others: not an ONNX model
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({type(error).__name__}); give a file written by pyseg.export"
        ) from error
    found = {}
    for entry in graph.metadata_props:
        try:
            found[entry.key] = json.loads(entry.value)
        except ValueError:
            found[entry.key] = entry.value
    return found


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"{what} needs the {module} package, which is not installed: pip install onnx onnxruntime "
            "(or pip install 'pyseg[export]')"
        ) from error
