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
def test_registered_ops_lists_what_pyseg_c_registered(monkeypatch):
    # What the GPU checks (conftest's PYSEG_EXPECT_GPU, benchmarks/gpu_check.py) require a CUDA kernel for.
    assert _extension.registered_ops() == sorted(OPS)
    monkeypatch.setattr(_extension, "_C", None)
    assert _extension.registered_ops() == []


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


def expected_archs() -> set[str]:
    """The sm_XY a FORCE_CUDA=1 build was asked for: TORCH_CUDA_ARCH_LIST ("8.0;9.0", "9.0a", "8.6+PTX"), else
    what CI builds (sm_80 and sm_90)."""
    archs = set()
    for entry in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";").split(";"):
        found = re.fullmatch(r"(\d+)\.(\d+)[af]?(\+PTX)?", entry.strip())
        if found:
            archs.add(f"sm_{found[1]}{found[2]}")
    return archs or {"sm_80", "sm_90"}


@pytest.mark.skipif(os.environ.get("PYSEG_EXPECT_CUDA_BUILD") != "1", reason="only where CI builds with FORCE_CUDA=1")
def test_ci_build_contains_the_cuda_kernels():
    # Without pyseg._C every CUDA test would compare the pure-torch reference with itself and pass: fail here.
    assert ops.has_ops(), f"PYSEG_EXPECT_CUDA_BUILD=1 but pyseg._C did not load: {ops.build_info()['error']}"
    info = ops.build_info()
    assert info["cuda"] is True, info
    assert expected_archs() <= set(info["cuda_archs"]), (expected_archs(), info)
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", "CUDA"), op


@pytest.mark.parametrize(
    ("arch_list", "archs"),
    [
        ("", {"sm_80", "sm_90"}),
        ("8.0;9.0", {"sm_80", "sm_90"}),
        ("9.0a", {"sm_90"}),
        ("7.5 8.6+PTX", {"sm_75", "sm_86"}),
    ],
)
def test_the_expected_archs_are_the_ones_the_build_was_asked_for(arch_list, archs, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert expected_archs() == archs


@pytest.mark.needs_cuda
def test_cuda_tensors_reach_the_cuda_kernels():
    # On a GPU the CUDA tests are only worth something when pyseg._C holds the CUDA kernels.
    assert ops.has_ops(), ops.build_info()["error"]
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", "CUDA"), op
    square = np.array([[1, 1], [6, 1], [6, 5], [1, 5]], dtype=np.float32)
    v, off, owner = pack_polygons([square])
    masks = torch.ops.pyseg.rasterize_polygons(v.cuda(), off.cuda(), owner.cuda(), 1, 8, 9)
    assert masks.is_cuda and torch.equal(masks.cpu(), torch.ops.pyseg.rasterize_polygons(v, off, owner, 1, 8, 9))


# A pytest plugin for the run below: the machine counts as a working GPU machine (conftest.gpu_run_problem), so
# that what PYSEG_EXPECT_GPU=1 does with a skipped needs_cuda test shows on a machine without one.
GPU_ASSUMED = """
import sys

def pytest_collection_modifyitems(config, items):
    sys.modules["conftest"].gpu_run_problem = lambda: None
"""

NEEDS_CUDA_TESTS = """
import pytest

@pytest.mark.needs_cuda
def test_on_a_gpu():
    pytest.skip("COCO128-Seg not found")

def test_on_any_machine():
    pass
"""


@pytest.mark.slow
def test_expect_gpu_fails_every_needs_cuda_test_that_cannot_run_on_the_cuda_kernels(tmp_path):
    """PYSEG_EXPECT_GPU=1 (benchmarks/gpu_check.sh build-test): a needs_cuda test fails where it would skip."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    shutil.copy(tests / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "gpu_assumed.py").write_text(GPU_ASSUMED)
    (tmp_path / "test_sample.py").write_text(NEEDS_CUDA_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    needs_cuda: runs only with a CUDA device\n")

    def pytest_run(*args: str, expect_gpu: bool) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{tests.parent}"}
        env["PYSEG_EXPECT_GPU"] = "1" if expect_gpu else "0"
        command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args, "test_sample.py"]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    skipped = pytest_run("-p", "gpu_assumed", expect_gpu=True)
    assert skipped.returncode == 1, skipped.stdout
    assert "1 failed, 1 passed" in skipped.stdout, skipped.stdout
    assert "a needs_cuda test must run, but it skipped: COCO128-Seg not found" in skipped.stdout
    assert "1 passed, 1 skipped" in pytest_run("-p", "gpu_assumed", expect_gpu=False).stdout
    if not torch.cuda.is_available():  # the real check, here: no device, so every needs_cuda test fails
        no_gpu = pytest_run(expect_gpu=True)
        assert no_gpu.returncode == 1 and "1 passed, 1 error" in no_gpu.stdout, no_gpu.stdout  # fails in setup
        assert "PYSEG_EXPECT_GPU=1, but torch" in no_gpu.stdout and "sees no CUDA device" in no_gpu.stdout
        without = pytest_run(expect_gpu=False)
        assert without.returncode == 0 and "1 passed, 1 skipped" in without.stdout, without.stdout


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


HIDDEN_EXTENSION_SCRIPT = """
import sys, importlib.abc, warnings, torch

class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pyseg._C":
            raise ImportError("hidden by the test")

sys.meta_path.insert(0, HideExtension())
import pyseg.ops as ops
assert not ops.has_ops()
inputs = torch.load(sys.argv[1], weights_only=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    masks = ops.rasterize_polygons(*inputs["rasterize"])
    assembled = ops.assemble_masks(*inputs["assemble"], out_size=(24, 20), threshold=0.5)
    protos = inputs["loss"][0].clone().requires_grad_(True)
    loss = ops.mask_loss(protos, *inputs["loss"][1:])
    loss.sum().backward()
assert any("pure-torch reference" in str(w.message) for w in caught)
torch.save({"masks": masks, "assembled": assembled, "loss": loss.detach(), "grad": protos.grad}, sys.argv[2])
"""


def test_the_pure_torch_fallback_runs_when_the_extension_is_hidden_and_matches_the_kernels(tmp_path):
    """With pyseg._C hidden, `import pyseg.ops` still works: each wrapper warns once and runs the reference, whose
    results equal the native kernels' (run here, where _C is built)."""
    import subprocess
    import sys

    import torch

    from pyseg import ops

    if not ops.has_ops():
        pytest.skip("pyseg._C is not built: nothing to compare the fallback with")
    generator = torch.Generator().manual_seed(0)
    square = torch.tensor([[2.0, 2.0], [12.0, 2.0], [12.0, 10.0], [2.0, 10.0]])
    triangle = torch.tensor([[1.0, 1.0], [7.0, 3.0], [3.0, 9.0]])
    rasterize = (torch.cat([square, triangle]), torch.tensor([0, 4, 7]), torch.tensor([0, 1]), 2, 12, 14)
    protos = torch.randn(2, 8, 12, 10, generator=generator)
    coeffs = torch.randn(3, 8, generator=generator)
    image_index = torch.tensor([0, 1, 1])
    boxes = torch.tensor([[1.0, 1.0, 8.0, 9.0], [0.0, 2.0, 10.0, 12.0], [3.0, 3.0, 6.0, 7.0]])
    gt_masks = (torch.rand(3, 12, 10, generator=generator) > 0.5).to(torch.uint8)
    loss_inputs = (protos, coeffs, image_index, gt_masks, torch.tensor([0, 1, 2]), boxes)
    inputs = {"rasterize": rasterize, "assemble": (protos, coeffs, image_index, boxes), "loss": loss_inputs}
    torch.save(inputs, tmp_path / "inputs.pt")

    script = tmp_path / "hidden.py"
    script.write_text(HIDDEN_EXTENSION_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    fallback = torch.load(tmp_path / "outputs.pt", weights_only=True)

    assert torch.equal(fallback["masks"], ops.rasterize_polygons(*rasterize))
    assert torch.equal(fallback["assembled"], ops.assemble_masks(*inputs["assemble"], out_size=(24, 20), threshold=0.5))
    native_protos = protos.clone().requires_grad_(True)
    native = ops.mask_loss(native_protos, *loss_inputs[1:])
    native.sum().backward()
    torch.testing.assert_close(fallback["loss"], native.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fallback["grad"], native_protos.grad, rtol=1e-4, atol=1e-6)
