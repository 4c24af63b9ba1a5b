"""pyseg's native ops (torch.ops.pyseg.*) with documented wrappers.

Each op has a C++ CPU kernel, a CUDA kernel and a pure-torch definition in pyseg.ops.reference,
which runs (with one warning) when pyseg._C is not built.
"""

from pyseg._extension import build_info, has_ops
from pyseg.ops.assemble import assemble_masks
from pyseg.ops.device_errors import check_device_errors, deferred_device_checks
from pyseg.ops.losses import mask_loss
from pyseg.ops.rasterize import rasterize_polygons, rasterize_polygons_overlap

__all__ = [
    "assemble_masks",
    "build_info",
    "check_device_errors",
    "deferred_device_checks",
    "has_ops",
    "mask_loss",
    "rasterize_polygons",
    "rasterize_polygons_overlap",
]
