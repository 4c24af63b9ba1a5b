"""pyseg.export: ONNX (run by onnxruntime) and TorchScript files compute what eager pyseg computes, on real images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import COCO128_SEG

from pyseg.engine.export import ExportOptions, export_model, read_onnx_metadata
from pyseg.engine.predict import detect, masks_in_input, select_detections
from pyseg.models.weights import load_model

IMGSZ = 160
NAMES = ["circle", "square", "triangle"]
# Detections compared: each image's best 30. This random model's weaker detections include some whose score or
# overlap sits within the graph's float error (threads, kernels) of --conf or --iou, which may fall either way.
MAX_DET = 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A pyseg-n checkpoint of random weights (seed 0) made to detect as a trained model does: BatchNorm statistics
    measured on real images (activations stay varied) and the last class layers scaled up (distinct scores, some
    above 0.25)."""
    from pyseg.config import make_config
    from pyseg.engine.checkpoint import save_checkpoint
    from pyseg.models.seg_model import build_model

    torch.manual_seed(0)
    model = build_model("pyseg-n", len(NAMES))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batch below
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(real_images(4))
        for branch in model.head.class_branches:
            branch[-1].weight.mul_(6.0)
            branch[-1].bias.add_(4.0)
    path = tmp_path_factory.mktemp("export") / "weights" / "best.pt"
    config = make_config({"model": "pyseg-n", "imgsz": IMGSZ}).to_dict()
    state = model.eval().state_dict()
    save_checkpoint(path, {"model": state, "ema": state, "config": config, "names": NAMES, "model_name": "pyseg-n"})
    return path


def real_images(count: int, size: int = IMGSZ) -> torch.Tensor:
    """(count, 3, size, size) float RGB in [0, 1]: COCO128-Seg images where present, else shapes-seg ones."""
    folder = COCO128_SEG / "images" / "train2017"
    paths = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if len(paths) < count:
        import tempfile

        from pyseg.data.synthetic import generate_shapes_seg

        with tempfile.TemporaryDirectory(prefix="pyseg-test-") as tmp:
            generate_shapes_seg(Path(tmp) / "shapes", train=count, val=1, imgsz=size, seed=5)
            paths = sorted((Path(tmp) / "shapes" / "images" / "train").glob("*"))[:count]
            images = [cv2.imread(str(p)) for p in paths]
    else:
        images = [cv2.imread(str(p)) for p in paths]
    batch = [cv2.resize(image, (size, size))[:, :, ::-1].transpose(2, 0, 1) for image in images]
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch))).float() / 255


def onnx_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_exported(path: Path, images: torch.Tensor) -> list[torch.Tensor]:
    if path.suffix == ".onnx":
        session = onnx_session(path)
        return [torch.from_numpy(out) for out in session.run(None, {"images": images.numpy()})]
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return list(module(images))


def eager(checkpoint: Path, images: torch.Tensor, conf: float = 0.25, iou: float = 0.7, max_det: int = 300):
    """pyseg's own detections and input-size masks, as pyseg.predict computes them."""
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        outputs = model(images)
        detections = detect(outputs, model.strides, model.reg_max, conf, iou, max_det)
        masks = masks_in_input(outputs.protos.float(), detections, tuple(images.shape[2:]))
    return detections, masks


def assert_same_detections(expected, expected_masks, boxes, scores, classes, masks) -> None:
    """The same detections: each of pyseg's has one exported twin of the same class with its box within 0.5 px,
    its score within 1e-3 and its mask at IoU >= 0.98. (Two detections whose scores differ by less than the
    exported graph's float error may come in the other order.)"""
    assert len(boxes) == len(expected.boxes), (len(boxes), len(expected.boxes))
    unmatched = list(range(len(boxes)))
    for i in range(len(expected.boxes)):
        twins = [
            j
            for j in unmatched
            if classes[j] == expected.classes[i] and (boxes[j] - expected.boxes[i]).abs().max() <= 0.5
        ]
        assert twins, f"detection {i} ({expected.classes[i]}, {expected.boxes[i].tolist()}) has no exported twin"
        j = min(twins, key=lambda k: (boxes[k] - expected.boxes[i]).abs().max().item())
        unmatched.remove(j)
        assert abs(scores[j] - expected.scores[i]) <= 1e-3
        ours, theirs = masks[j].bool(), expected_masks[i]
        union = (ours | theirs).sum().item()
        assert union == 0 or (ours & theirs).sum().item() / union >= 0.98


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_raw_exports_give_the_detections_of_eager_pyseg(checkpoint, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path = export_model(checkpoint, ExportOptions(format=fmt, batch=2), str(tmp_path / f"raw.{fmt}"))
    images = real_images(2)
    boxes, scores, coeffs, protos = run_exported(path, images)
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        outputs = model(images)
    torch.testing.assert_close(protos, outputs.protos, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(coeffs, outputs.mask_coeffs, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(scores, outputs.class_logits.sigmoid(), atol=2e-4, rtol=1e-3)
    expected, expected_masks = eager(checkpoint, images, max_det=MAX_DET)
    found = select_detections(boxes, scores, coeffs, 0.25, 0.7, MAX_DET)
    found_masks = masks_in_input(protos, found, (IMGSZ, IMGSZ))
    assert sum(len(det.boxes) for det in expected) > 10  # detections to compare
    for b in range(2):
        det = found[b]
        assert_same_detections(expected[b], expected_masks[b], det.boxes, det.scores, det.classes, found_masks[b])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_end2end_exports_give_pyseg_predicts_detections(checkpoint, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    options = ExportOptions(format=fmt, end2end=True, max_det=MAX_DET)
    path = export_model(checkpoint, options, str(tmp_path / f"e2e.{fmt}"))
    compared = 0
    for image in real_images(2).split(1):
        boxes, scores, classes, masks = run_exported(path, image)
        compared += len(boxes)
        assert masks.dtype == torch.uint8 and masks.shape[1:] == (IMGSZ, IMGSZ)
        expected, expected_masks = eager(checkpoint, image, max_det=MAX_DET)
        assert_same_detections(expected[0], expected_masks[0], boxes, scores, classes, masks)
    assert compared > 10


def test_a_dynamic_onnx_export_runs_at_two_batch_sizes_and_two_image_sizes(checkpoint, tmp_path):
    """At each size, the file's outputs are eager pyseg's (decoded boxes within 0.01 px), which pyseg.predict turns
    into the same detections. (Detections are not compared here: at other sizes this random model's scores
    saturate at 1.0, and the order of equal scores is arbitrary.)"""
    pytest.importorskip("onnxruntime")
    from pyseg.models.seg_model import decode_boxes, make_anchors

    path = export_model(checkpoint, ExportOptions(format="onnx", dynamic=True), str(tmp_path / "dynamic.onnx"))
    model, _, _ = load_model(checkpoint, torch.device("cpu"))
    for batch, size in ((1, 128), (3, 192)):
        images = real_images(batch, size)
        boxes, scores, coeffs, protos = run_exported(path, images)
        with torch.no_grad():
            outputs = model(images)
        anchors, stride = make_anchors(outputs.feature_shapes, model.strides)
        expected_boxes = decode_boxes(outputs.box_distribution, anchors, model.reg_max) * stride
        assert boxes.shape == (batch, (size // 8) ** 2 * 21 // 16, 4) and protos.shape == (
            batch,
            32,
            size // 4,
            size // 4,
        )
        torch.testing.assert_close(boxes, expected_boxes, atol=1e-2, rtol=1e-4)
        torch.testing.assert_close(scores, outputs.class_logits.sigmoid(), atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(coeffs, outputs.mask_coeffs, atol=5e-4, rtol=1e-3)
        torch.testing.assert_close(protos, outputs.protos, atol=5e-4, rtol=1e-3)


def test_an_export_goes_beside_its_weights_and_carries_its_metadata(checkpoint):
    pytest.importorskip("onnx")
    path = export_model(checkpoint, ExportOptions(format="onnx"))
    assert path == checkpoint.with_suffix(".onnx") and path.is_file()
    info = read_onnx_metadata(path)
    assert info["names"] == NAMES and info["imgsz"] == IMGSZ and info["stride"] == 32 and info["opset"] == 17
    assert info["pyseg_version"] and info["outputs"] == ["boxes", "scores", "mask_coeffs", "protos"]
    import onnx

    assert {o.domain or "ai.onnx": o.version for o in onnx.load(str(path)).opset_import}["ai.onnx"] == 17
    scripted = export_model(checkpoint, ExportOptions(format="torchscript", end2end=True))
    extra = {"pyseg.json": ""}
    torch.jit.load(str(scripted), _extra_files=extra)
    assert json.loads(extra["pyseg.json"])["end2end"] is True and scripted.suffix == ".torchscript"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--format", "coreml"], "--format must be one of onnx, torchscript, got 'coreml'"),
        (["--half", "--device", "cpu"], "--half exports float16 onnx, which needs a CUDA device"),
        (["--imgsz", "100"], "--imgsz must be a positive multiple of 32"),
        (["--end2end", "--batch", "2"], "--end2end exports one image at a time"),
        (["--out", "model.torchscript"], "names a torchscript file, but --format is onnx"),
        (["--out", "/proc/x.onnx"], "cannot write /proc/x.onnx"),
    ],
)
def test_bad_export_flags_are_one_line_and_exit_2(checkpoint, capsys, flags, message):
    from pyseg import export

    assert export.main(["--weights", str(checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_weights_that_are_not_a_checkpoint_are_one_line_and_exit_2(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    done = subprocess.run(
        [sys.executable, "-m", "pyseg.export", "--weights", str(junk)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and str(junk) in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not junk.with_suffix(".onnx").exists()


def test_predict_with_an_onnx_file_writes_what_the_checkpoint_writes(checkpoint, tmp_path):
    """pyseg.predict --weights FILE.onnx (raw outputs, and end to end): the same drawings and predictions.json."""
    pytest.importorskip("onnxruntime")
    from pyseg import predict

    raw = export_model(checkpoint, ExportOptions(format="onnx"), str(tmp_path / "raw.onnx"))
    end2end = export_model(checkpoint, ExportOptions(format="onnx", end2end=True), str(tmp_path / "e2e.onnx"))
    source = tmp_path / "images"
    source.mkdir()
    for i, image in enumerate(real_images(2, 224)):
        cv2.imwrite(str(source / f"{i}.jpg"), (image.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).astype(np.uint8))
    written = {}
    for weights in (checkpoint, raw, end2end):
        out = tmp_path / weights.stem
        assert predict.main(["--weights", str(weights), "--source", str(source), "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["0.jpg", "1.jpg", "predictions.json"]
        written[weights.stem] = json.loads((out / "predictions.json").read_text())
    theirs = written[checkpoint.stem]
    assert len(theirs) > 10
    for ours in (written["raw"], written["e2e"]):
        assert len(ours) == len(theirs)
        unmatched = list(ours)
        for row in theirs:  # each row has its twin (detections of near-equal scores may come in the other order)
            twins = [
                other
                for other in unmatched
                if (other["image_id"], other["category_id"], other["category_name"])
                == (row["image_id"], row["category_id"], row["category_name"])
                and max(abs(x - y) for x, y in zip(other["bbox"], row["bbox"], strict=True)) <= 0.5
            ]
            assert twins, row
            unmatched.remove(twins[0])
            assert abs(twins[0]["score"] - row["score"]) <= 1e-3
            assert twins[0]["segmentation"]["size"] == row["segmentation"]["size"]


@pytest.mark.parametrize("model_name", ["yolo11n-seg", "yolov8n-seg"])
def test_the_yolo_families_export_and_compute_what_eager_pyseg_computes(model_name, tmp_path):
    pytest.importorskip("onnxruntime")
    from pyseg.config import make_config
    from pyseg.engine.checkpoint import save_checkpoint
    from pyseg.models.seg_model import build_model

    torch.manual_seed(0)
    model = build_model(model_name, len(NAMES)).eval()
    path = tmp_path / "weights" / "best.pt"
    config = make_config({"model": model_name, "imgsz": 128}).to_dict()
    state = model.state_dict()
    save_checkpoint(path, {"model": state, "ema": state, "config": config, "names": NAMES, "model_name": model_name})
    exported = export_model(path, ExportOptions(format="onnx"))
    assert read_onnx_metadata(exported)["model"] == model_name
    images = real_images(1, 128)
    boxes, scores, coeffs, protos = run_exported(exported, images)
    with torch.no_grad():
        outputs = model(images)
    torch.testing.assert_close(protos, outputs.protos, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(scores, outputs.class_logits.sigmoid(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(coeffs, outputs.mask_coeffs, atol=5e-4, rtol=1e-3)


def test_an_onnx_file_pyseg_cannot_use_is_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from pyseg import predict

    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model")
    fixed = export_model(checkpoint, ExportOptions(format="onnx"), str(tmp_path / "fixed.onnx"))
    image = tmp_path / "images" / "a.jpg"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    cases = [
        (["--weights", str(not_onnx)], "not a readable ONNX model"),
        (["--weights", str(tmp_path / "missing.onnx")], "no such file"),
        (["--weights", str(fixed), "--imgsz", "320"], "was exported for 160 px only"),
    ]
    for flags, message in cases:
        assert predict.main([*flags, "--source", str(image), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_end2end_export_with_nothing_above_conf_traces_and_runs_with_zero_detections(checkpoint, tmp_path, fmt):
    """The export traces a black image; a model that finds nothing there (any trained one at --conf 0.25) must
    still export, and the file must answer an image without detections with empty outputs."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    options = ExportOptions(format=fmt, end2end=True, conf=0.99999)
    path = export_model(checkpoint, options, str(tmp_path / f"none.{fmt}"))
    boxes, scores, classes, masks = run_exported(path, real_images(1))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
    assert masks.shape == (0, IMGSZ, IMGSZ)


def test_out_may_name_a_folder_and_a_folder_where_a_file_is_is_one_line(checkpoint, tmp_path, capsys):
    from pyseg import export

    folder = tmp_path / "exports"
    folder.mkdir()
    assert export.main(["--weights", str(checkpoint), "--format", "torchscript", "--out", str(folder)]) == 0
    assert (folder / "best.torchscript").is_file()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    assert export.main(["--weights", str(checkpoint), "--out", str(blocker / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {blocker / 'x.onnx'}" in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("**/*.probe")) and not list(tmp_path.glob("**/*.pyseg-tmp"))


def test_predict_says_a_torchscript_file_is_not_what_it_runs(checkpoint, tmp_path, capsys):
    from pyseg import predict

    scripted = tmp_path / "m.torchscript"
    scripted.write_bytes(b"")
    image = tmp_path / "a.jpg"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    assert predict.main(["--weights", str(scripted), "--source", str(image), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "TorchScript file runs with torch.jit.load" in err and err.count("\n") == 1, err
