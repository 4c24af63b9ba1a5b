"""Loads pyseg._C (the native ops) and says how to build it when it is missing."""

from __future__ import annotations

import importlib
import warnings

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the pyseg checkout "
    "(after torch; FORCE_CUDA=1 adds the CUDA kernels)"
)

_C = None
_load_error: str | None = None

try:
    import torch  # noqa: F401  (registers the dispatcher before the library loads)

    _C = importlib.import_module("pyseg._C")
except ImportError as error:  # missing or built against another torch
    _load_error = str(error)

_warned = False


def has_ops() -> bool:
    """True when pyseg._C loaded, so torch.ops.pyseg.* run the native kernels."""
    return _C is not None


def warn_fallback() -> None:
    """Warns once that the pure-torch reference runs instead of the native kernels."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"pyseg._C is not available ({_load_error}); pyseg.ops runs the slow pure-torch reference. "
            f"To get the native kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )


def registered_ops() -> list[str]:
    """Names of the ops pyseg._C registered with torch (torch.ops.pyseg.NAME); [] without pyseg._C."""
    import torch

    if _C is None:
        return []
    return sorted(n.removeprefix("pyseg::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyseg::"))


def build_info() -> dict:
    """What pyseg._C was compiled with: cpu, cuda, cuda_version, cuda_archs, torch_version, openmp.

    Without pyseg._C: {"cpu": False, "cuda": False, ..., "error": why it did not load}.
    """
    if _C is None:
        return {
            "cpu": False,
            "cuda": False,
            "cuda_version": None,
            "cuda_archs": [],
            "torch_version": None,
            "openmp": False,
            "error": f"{_load_error}; {BUILD_HINT}",
        }
    info = dict(_C.build_info())
    archs = [a for a in info.get("cuda_archs", "").split(",") if a]
    info["cuda_archs"] = [f"sm_{int(a) // 10}" for a in archs]
    return info
