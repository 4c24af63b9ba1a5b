"""Running a model exported by pyseg.export: an ONNX file in onnxruntime (CPU, or CUDA where onnxruntime has it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pyseg.engine.export import END2END_OUTPUTS, RAW_OUTPUTS, read_onnx_metadata
from pyseg.errors import CheckpointError, UserError


class OnnxModel:
    """An exported ONNX file: run(images (B, 3, H, W) float in [0, 1]) -> its outputs as torch tensors on `device`
    (raw: boxes, scores, mask_coeffs, protos; end2end: boxes, scores, classes, masks; see pyseg.engine.export).

    names, imgsz, end2end and dynamic come from the metadata pyseg.export stored in the file."""

    def __init__(self, path: Path, device: torch.device):
        try:
            import onnxruntime
        except ImportError as error:
            raise UserError(
                f"--weights {path}: running an ONNX file needs onnxruntime: pip install onnxruntime (or "
                "onnxruntime-gpu for CUDA)"
            ) from error
        info = read_onnx_metadata(path)
        if "names" not in info or "imgsz" not in info:
            raise CheckpointError(
                f"--weights {path}: not an ONNX file written by pyseg.export (it has no class names or image size "
                "in its metadata); export the checkpoint with python -m pyseg.export"
            )
        self.path, self.device = path, device
        self.names = list(info["names"])
        self.imgsz = int(info["imgsz"])
        self.end2end = bool(info.get("end2end"))
        self.dynamic = bool(info.get("dynamic"))
        self.half = bool(info.get("half"))
        self.thresholds = {"conf": info.get("conf"), "iou": info.get("iou")}  # an end-to-end file's NMS
        wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        providers = [p for p in wanted if p in onnxruntime.get_available_providers()] + ["CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for a file it cannot read
            raise CheckpointError(
                f"--weights {path}: onnxruntime cannot load it ({str(error).splitlines()[0]})"
            ) from error
        outputs = [output.name for output in self.session.get_outputs()]
        if outputs != list(END2END_OUTPUTS if self.end2end else RAW_OUTPUTS):
            raise CheckpointError(f"--weights {path}: its outputs {outputs} are not those pyseg.export writes")

    def run(self, images: Tensor) -> list[Tensor]:
        array = images.detach().cpu().numpy().astype(np.float16 if self.half else np.float32)
        return [torch.from_numpy(out).to(self.device) for out in self.session.run(None, {"images": array})]
