"""Ultralytics as the test-only peer: importing it into a private settings folder, and saving checkpoints through its
own save path. Tests that need it call `ultralytics_or_skip()`; under PYSEG_EXPECT_ULTRALYTICS=1 (CI) a missing
Ultralytics fails them instead of skipping."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

EXPECT_ULTRALYTICS = os.environ.get("PYSEG_EXPECT_ULTRALYTICS") == "1"
_settings = tempfile.TemporaryDirectory(prefix="pyseg-ultralytics-")  # removed when the test process ends


def ultralytics_or_skip():
    """The ultralytics module, its settings kept in a private temporary folder; skips (fails under
    PYSEG_EXPECT_ULTRALYTICS=1) where it is not installed."""
    os.environ.setdefault("YOLO_CONFIG_DIR", _settings.name)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        import ultralytics
    except ImportError as error:
        reason = f"ultralytics is not installed ({error}); `make test` installs it (requirements-peer.txt)"
        if EXPECT_ULTRALYTICS:
            pytest.fail(f"PYSEG_EXPECT_ULTRALYTICS=1, but {reason}", pytrace=False)
        pytest.skip(reason)
    return ultralytics


def save_ultralytics_checkpoint(model_name: str, path: Path, nc: int | None = None, seed: int = 0) -> Path:
    """Builds `model_name` (e.g. 'yolo11n-seg') from Ultralytics' own config with random weights, calibrates its
    BatchNorm statistics on random images and makes the BatchNorm affine terms and class biases random too (so that
    no layer is an identity, activations stay varied and detections exist), and saves it through Ultralytics' own
    save path (YOLO.save). Returns path."""
    ultralytics_or_skip()
    from ultralytics import YOLO

    torch.manual_seed(seed)
    yolo = YOLO(f"{model_name}.yaml")
    if nc is not None:
        from ultralytics.nn.tasks import SegmentationModel

        yolo.model = SegmentationModel(f"{model_name}.yaml", nc=nc, verbose=False)
        yolo.model.names = {i: f"thing{i}" for i in range(nc)}
    generator = torch.Generator().manual_seed(seed)
    calibrate_batchnorm(yolo.model, torch.rand(4, 3, 128, 128, generator=generator))
    with torch.no_grad():
        for module in yolo.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.add_(0.1)  # no channel amplified by more than ~3x (keeps float32 stable)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
        head = yolo.model.model[-1]
        for branch in head.cv3:
            branch[-1].bias.copy_(torch.randn(branch[-1].bias.shape, generator=generator))
    yolo.save(str(path))
    return path


def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Sets every BatchNorm's running statistics to those of `images` (as training would), so that a model with
    random weights keeps varied activations in eval mode instead of collapsing to constants."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(images)
    for norm in norms:
        norm.momentum = 0.03
    model.eval()


def load_ultralytics_model(path: Path) -> torch.nn.Module:
    """The model of an Ultralytics checkpoint, as Ultralytics loads it, float32, eval mode."""
    ultralytics_or_skip()
    from ultralytics import YOLO

    return YOLO(str(path)).model.float().eval()


def ultralytics_raw_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head's raw outputs in pyseg's layout, taken with forward hooks on Ultralytics' own branches:
    box (B, A, 64), cls (B, A, nc), coeffs (B, A, 32), protos (B, 32, H/4, W/4); plus 'predictions', Ultralytics'
    own eval output (B, 4 + nc + 32, A)."""
    head = model.model[-1]
    captured: dict = {}
    hooks = []
    for key, branches in (("box", head.cv2), ("cls", head.cv3), ("coeffs", head.cv4)):
        for level, branch in enumerate(branches):
            hooks.append(
                branch.register_forward_hook(
                    lambda _m, _i, out, key=key, level=level: captured.__setitem__((key, level), out)
                )
            )
    hooks.append(head.proto.register_forward_hook(lambda _m, _i, out: captured.__setitem__("protos", out)))
    try:
        with torch.no_grad():
            output = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    predictions, protos = output[0] if isinstance(output[0], tuple) else (output[0], output[1][-1])
    result = {
        key: torch.cat([captured[(key, level)].flatten(2) for level in range(3)], dim=2).transpose(1, 2)
        for key in ("box", "cls", "coeffs")
    }
    result["protos"] = captured["protos"]
    result["predictions"], result["eval_protos"] = predictions, protos
    return result
