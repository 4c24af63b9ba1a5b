"""Ultralytics as the test-only peer, always in a subprocess of its own.

Importing Ultralytics patches other libraries for the whole process (PIL.Image.open, cv2.imread, torch.save): the
pyseg tests must not run under those patches, so every use of Ultralytics happens in `python ultralytics_peer.py
ACTION ...` (this file run as a script), which writes its results to files the test then reads (tensors with
torch's weights-only loader, shapes as JSON). Its settings go to a private temporary folder.

Tests call `ultralytics_or_skip()` first: it skips where Ultralytics is not installed, and fails instead under
PYSEG_EXPECT_ULTRALYTICS=1 (CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

EXPECT_ULTRALYTICS = os.environ.get("PYSEG_EXPECT_ULTRALYTICS") == "1"
HERE = Path(__file__).resolve()


def ultralytics_or_skip() -> None:
    """Skips the test (fails it under PYSEG_EXPECT_ULTRALYTICS=1) where Ultralytics is not installed; never imports
    it into the test process."""
    if importlib.util.find_spec("ultralytics") is None:
        reason = "ultralytics is not installed; `make test` installs it (requirements-peer.txt)"
        if EXPECT_ULTRALYTICS:
            pytest.fail(f"PYSEG_EXPECT_ULTRALYTICS=1, but {reason}", pytrace=False)
        pytest.skip(reason)


def run_peer(*args: str) -> None:
    """Runs this file as a script with args in a fresh interpreter (fails the test on error)."""
    ultralytics_or_skip()
    with tempfile.TemporaryDirectory(prefix="pyseg-ultralytics-") as settings:
        env = {**os.environ, "YOLO_CONFIG_DIR": settings, "YOLO_OFFLINE": "1"}
        done = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"ultralytics_peer {' '.join(args)} failed:\n{done.stderr[-4000:]}"


def run_peer_calls(calls: list[list[str]]) -> None:
    """Several run_peer calls (each a list of its args) in one fresh interpreter: Ultralytics' import, seconds of CPU,
    is paid once."""
    with tempfile.TemporaryDirectory(prefix="pyseg-test-") as folder:
        listed = Path(folder) / "calls.json"
        listed.write_text(json.dumps(calls))
        run_peer("calls", str(listed))


def save_ultralytics_checkpoint(model_name: str, path: Path, nc: int | None = None, seed: int = 0) -> Path:
    """`model_name` (e.g. 'yolo11n-seg', or 'yolo11n' for a detection model) built by Ultralytics from its own config
    with random weights, BatchNorm statistics calibrated on random images (so that activations stay varied), random
    BatchNorm affine terms and class biases (so that detections exist), saved through Ultralytics' own save path
    (YOLO.save)."""
    run_peer("save", model_name, str(path), str(nc or 0), str(seed))
    return path


def ultralytics_reference(checkpoint: Path, images: torch.Tensor, out: Path, conf: float, iou: float) -> dict:
    """Ultralytics' own results for `images` (B, 3, H, W) float in [0, 1] with the model of `checkpoint`, loaded as
    Ultralytics loads it (float32, eval mode): the head's raw outputs in pyseg's layout (box (B, A, 64), cls (B, A,
    nc), coeffs (B, A, 32), protos (B, 32, H/4, W/4)), and per image its NMS detections ('det{b}': (n, 6 + 32)
    xyxy, score, class, coefficients) and process_mask masks ('masks{b}': (n, H, W) uint8)."""
    images_file = out.with_suffix(".images.pt")
    torch.save(images, images_file)
    run_peer("reference", str(checkpoint), str(images_file), str(out), str(conf), str(iou))
    return torch.load(out, weights_only=True)


def ultralytics_state_shapes(model_names: list[str]) -> dict[str, dict[str, list[int]]]:
    """{model name: {state_dict key: shape}} of each model built by Ultralytics from its own config (nc=80)."""
    with tempfile.TemporaryDirectory(prefix="pyseg-test-") as folder:
        out = Path(folder) / "shapes.json"
        run_peer("shapes", str(out), *model_names)  # (Ultralytics prints to stdout: the answer goes to a file)
        return json.loads(out.read_text())


def rewrite_ultralytics_checkpoint(source: Path, target: Path, change: str, marker: Path | None = None) -> Path:
    """A copy of an Ultralytics checkpoint with one change: 'no-scale' (its model description without 'scale' and
    'yaml_file', as older files have it) or 'payload' (a train_args whose unpickling would create `marker`)."""
    run_peer("rewrite", str(source), str(target), change, str(marker or ""))
    return target


# ------------------------------------------------------------------ the script side (Ultralytics imported here only)


class Payload:
    """A pickle that would run `touch marker` when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
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


def _save(model_name: str, path: str, nc: int, seed: int) -> None:
    from ultralytics import YOLO

    torch.manual_seed(seed)
    yolo = YOLO(f"{model_name}.yaml")
    if nc:
        from ultralytics.nn.tasks import SegmentationModel

        yolo.model = SegmentationModel(f"{model_name}.yaml", nc=nc, verbose=False)
        yolo.model.names = {i: f"thing{i}" for i in range(nc)}
    generator = torch.Generator().manual_seed(seed)
    _calibrate_batchnorm(yolo.model, torch.rand(4, 3, 128, 128, generator=generator))
    with torch.no_grad():
        for module in yolo.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.add_(0.1)  # no channel amplified by more than ~3x (keeps float32 stable)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
        head = yolo.model.model[-1]
        for branch in head.cv3:
            branch[-1].bias.copy_(torch.randn(branch[-1].bias.shape, generator=generator))
    yolo.save(path)


def _reference(checkpoint: str, images_file: str, out: str, conf: float, iou: float) -> None:
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import process_mask

    model = YOLO(checkpoint).model.float().eval()
    images = torch.load(images_file, weights_only=True)
    head = model.model[-1]
    captured: dict = {}
    for key, branches in (("box", head.cv2), ("cls", head.cv3), ("coeffs", head.cv4)):
        for level, branch in enumerate(branches):
            branch.register_forward_hook(
                lambda _m, _i, output, key=key, level=level: captured.__setitem__((key, level), output)
            )
    head.proto.register_forward_hook(lambda _m, _i, output: captured.__setitem__("protos", output))
    with torch.no_grad():
        output = model(images)
    predictions, protos = output[0] if isinstance(output[0], tuple) else (output[0], output[1][-1])
    result = {
        key: torch.cat([captured[(key, level)].flatten(2) for level in range(3)], dim=2).transpose(1, 2).contiguous()
        for key in ("box", "cls", "coeffs")
    }
    result["protos"] = captured["protos"]
    detections = non_max_suppression(predictions, conf, iou, nc=len(model.names), max_det=300)
    for b, det in enumerate(detections):
        result[f"det{b}"] = det
        result[f"masks{b}"] = process_mask(protos[b], det[:, 6:], det[:, :4], tuple(images.shape[2:]), upsample=True)
    torch.save(result, out)


def _shapes(out: str, model_names: list[str]) -> None:
    from ultralytics.nn.tasks import SegmentationModel

    shapes = {}
    for name in model_names:
        state = SegmentationModel(f"{name}.yaml", nc=80, verbose=False).state_dict()
        shapes[name] = {key: list(value.shape) for key, value in state.items()}
    Path(out).write_text(json.dumps(shapes))


def _rewrite(source: str, target: str, change: str, marker: str) -> None:
    import io

    content = torch.load(source, weights_only=False)
    if change == "no-scale":
        content["model"].yaml = {k: v for k, v in content["model"].yaml.items() if k not in ("scale", "yaml_file")}
    elif change == "payload":
        content["train_args"] = Payload(marker)
    else:
        raise SystemExit(f"unknown change {change}")
    buffer = io.BytesIO()
    torch.save(content, buffer)
    Path(target).write_bytes(buffer.getvalue())


def _dispatch(action: str, rest: list[str]) -> None:
    if action == "save":
        _save(rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif action == "reference":
        _reference(rest[0], rest[1], rest[2], float(rest[3]), float(rest[4]))
    elif action == "shapes":
        _shapes(rest[0], rest[1:])
    elif action == "rewrite":
        _rewrite(*rest)
    elif action == "calls":
        for call in json.loads(Path(rest[0]).read_text()):
            _dispatch(call[0], call[1:])
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    _dispatch(sys.argv[1], sys.argv[2:])
