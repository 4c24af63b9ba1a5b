"""pyseg: distributed training orchestrator for YOLO-style instance segmentation.

Importing the package imports nothing heavy (torch loads with the modules that need it: the job client of
pyseg.submit runs without it); has_ops() loads the native extension when first called."""

__version__ = "0.1.0"

__all__ = ["has_ops", "__version__"]


def __getattr__(name: str):
    if name == "has_ops":
        from pyseg._extension import has_ops

        return has_ops
    raise AttributeError(f"module 'pyseg' has no attribute {name!r}")
