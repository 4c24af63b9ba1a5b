"""pyseg._C loading, build_info, and the reference fallback when the extension is missing."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import pack_polygons

import pyseg.ops as ops
from pyseg import _extension
from pyseg.ops import reference


def test_build_info_reports_what_was_compiled():
    info = ops.build_info()
    assert info["cpu"] is ops.has_ops()
    if not ops.has_ops():
        assert "pip install --no-build-isolation -e ." in info["error"]
        return
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_version"] and all(a.startswith("sm_") for a in info["cuda_archs"])


@pytest.mark.skipif(os.environ.get("PYSEG_EXPECT_CUDA_BUILD") != "1", reason="only where CI builds with FORCE_CUDA=1")
def test_ci_build_contains_the_cuda_kernels():
    info = ops.build_info()
    assert info["cuda"] is True, info
    assert {"sm_80", "sm_90"} <= set(info["cuda_archs"]), info
    for op in ("rasterize_polygons", "rasterize_polygons_overlap", "assemble_masks", "mask_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", "CUDA"), op


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "_load_error", "No module named 'pyseg._C'")
    monkeypatch.setattr(_extension, "_warned", False)
    v, off, owner = pack_polygons([np.array([[1, 1], [7, 1], [4, 6]], dtype=np.float32)])
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation -e ."):
        masks = ops.rasterize_polygons(v, off, owner, 1, 8, 8)
    assert torch.equal(masks, reference.rasterize_polygons(v, off, owner, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        ops.rasterize_polygons(v, off, owner, 1, 8, 8)
    assert ops.build_info()["cpu"] is False and "pyseg._C" in ops.build_info()["error"]
