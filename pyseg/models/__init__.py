"""pyseg models: building blocks, the SegModel family (pyseg-n/s/m), anchors and box decoding."""

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

__all__ = [
    "DFL",
    "MODEL_SCALES",
    "SPPF",
    "Bottleneck",
    "CSPBlock",
    "Conv",
    "SegModel",
    "SegOutputs",
    "build_model",
    "decode_boxes",
    "expected_distances",
    "make_anchors",
    "model_info",
]
