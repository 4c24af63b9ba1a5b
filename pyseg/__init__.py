"""pyseg: distributed training orchestrator for YOLO-style instance segmentation."""

from pyseg._extension import has_ops

__version__ = "0.1.0"

__all__ = ["has_ops", "__version__"]
