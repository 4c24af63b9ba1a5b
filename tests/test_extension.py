"""pyseg._C loading, build_info, and the reference fallback when the extension is missing."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import pack_polygons

import pyseg.ops as ops
from pyseg import _extension
from pyseg.ops import reference

OPS = ("rasterize_polygons", "rasterize_polygons_overlap", "assemble_masks", "mask_loss", "mask_loss_backward")
needs_ops = pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built")


@needs_ops
def test_build_info_reports_what_was_compiled():
    info = ops.build_info()
    assert set(info) == {"cpu", "torch_version", "cuda", "cuda_version", "cuda_archs", "openmp"}
    assert info["cpu"] is True and isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"]), info
        # torch refuses to build an extension with a CUDA major version other than its own
        assert torch.version.cuda and info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0], info
        assert info["cuda_archs"] and all(re.fullmatch(r"sm_\d{2,3}", a) for a in info["cuda_archs"]), info
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] == [], info


@needs_ops
def test_every_op_has_a_cpu_kernel_and_mask_loss_an_autograd_one():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", "CPU"), op
    # register_autograd (pyseg/ops/losses.py) makes mask_loss differentiable; the other ops have no gradient
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyseg::mask_loss", "Autograd")


@needs_ops
def test_registered_cpu_ops_compute_the_reference():
    # Straight through torch.ops.pyseg (not the Python wrappers): one small input per op.
    square = np.array([[1, 1], [6, 1], [6, 5], [1, 5]], dtype=np.float32)
    triangle = np.array([[2, 0.5], [7.5, 7], [0.5, 6]], dtype=np.float32)
    v, off, owner = pack_polygons([square, triangle])
    masks = torch.ops.pyseg.rasterize_polygons(v, off, owner, 2, 8, 9)
    assert torch.equal(masks, reference.rasterize_polygons(v, off, owner, 2, 8, 9))
    expected_square = torch.zeros((8, 9), dtype=torch.uint8)
    expected_square[1:5, 1:6] = 1  # centres 1.5..4.5 in y, 1.5..5.5 in x
    assert torch.equal(masks[0], expected_square)

    image_index = torch.tensor([0, 0])
    index_map, areas = torch.ops.pyseg.rasterize_polygons_overlap(v, off, owner, image_index, 1, 8, 9)
    ref_map, ref_areas = reference.rasterize_polygons_overlap(v, off, owner, image_index, 1, 8, 9)
    assert torch.equal(index_map, ref_map) and torch.equal(areas, ref_areas) and int(areas[0]) == 20

    generator = torch.Generator().manual_seed(0)
    protos = torch.randn((1, 3, 8, 9), generator=generator, dtype=torch.float64)
    coeffs = torch.randn((2, 3), generator=generator, dtype=torch.float64)
    boxes = torch.tensor([[1.0, 1.0, 6.0, 5.0], [0.5, 0.5, 7.5, 7.0]])  # float32 px, whatever the protos dtype
    got = torch.ops.pyseg.assemble_masks(protos, coeffs, image_index, boxes, None, None)
    assert torch.allclose(got, reference.assemble_masks(protos, coeffs, image_index, boxes), rtol=0, atol=1e-12)
    gt_index = torch.tensor([1, 2])
    losses = torch.ops.pyseg.mask_loss(protos, coeffs, image_index, index_map, gt_index, boxes, True)
    want = reference.mask_loss(protos, coeffs, image_index, index_map, gt_index, boxes, True)
    assert torch.allclose(losses, want, rtol=0, atol=1e-12) and bool((want > 0).all())


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
