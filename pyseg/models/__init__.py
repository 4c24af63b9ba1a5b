"""pyseg models: building blocks, the SegModel family (pyseg-n/s/m), the YOLO11-seg and YOLOv8-seg families,
anchors and box decoding. Checkpoints of other programs are read by pyseg.models.weights."""

from __future__ import annotations

from pyseg.models.blocks import DFL, SPPF, Bottleneck, Conv, CSPBlock, expected_distances
from pyseg.models.seg_model import (
    MODEL_SCALES,
    SegModel,
    SegOutputs,
    build_model,
    decode_boxes,
    make_anchors,
    model_info,
)
from pyseg.models.yolo import FAMILIES, YoloSegModel

__all__ = [
    "DFL",
    "FAMILIES",
    "MODEL_SCALES",
    "SPPF",
    "Bottleneck",
    "CSPBlock",
    "Conv",
    "SegModel",
    "SegOutputs",
    "YoloSegModel",
    "build_model",
    "decode_boxes",
    "expected_distances",
    "make_anchors",
    "model_info",
]
