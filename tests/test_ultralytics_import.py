"""Ultralytics checkpoints in pyseg: the same function as Ultralytics' own model (raw outputs and final predictions),
every tensor placed, and the files pyseg must refuse (code in the pickle, truncated, foreign, other architecture)."""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import COCO128_SEG
from ultralytics_peer import (
    Payload,
    rewrite_ultralytics_checkpoint,
    run_peer_calls,
    save_ultralytics_checkpoint,
    ultralytics_or_skip,
    ultralytics_state_shapes,
)

from pyseg.errors import CheckpointError
from pyseg.models import build_model
from pyseg.models.ultralytics_import import foreign_names, read_ultralytics_checkpoint
from pyseg.models.weights import build_from_weights, load_weights

# each family at size n and at one larger size (yolo11m: the C3k links of the larger YOLO11 scales)
EQUALITY_MODELS = ["yolo11n-seg", "yolo11m-seg", "yolov8n-seg", "yolov8s-seg"]
IMGSZ = 256


class SavedCheckpoints(dict):
    """Ultralytics checkpoints saved on first use (each costs a subprocess): checkpoints['yolov8n-seg'] -> Path."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, name: str) -> Path:
        self[name] = save_ultralytics_checkpoint(name, self.folder / f"{name}.pt")
        return self[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> SavedCheckpoints:
    ultralytics_or_skip()
    return SavedCheckpoints(tmp_path_factory.mktemp("ultralytics"))


def coco128_images_present(count: int = 2) -> bool:
    folder = COCO128_SEG / "images" / "train2017"
    return folder.is_dir() and len(sorted(folder.glob("*.jpg"))[:count]) == count


def real_images(count: int = 2) -> torch.Tensor:
    """(count, 3, IMGSZ, IMGSZ) float RGB in [0, 1]: COCO128-Seg images where present, else shapes-seg images."""
    import tempfile

    folder = COCO128_SEG / "images" / "train2017"
    paths = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if len(paths) == count:
        images = [cv2.imread(str(p)) for p in paths]
    else:
        from pyseg.data.synthetic import generate_shapes_seg

        with tempfile.TemporaryDirectory(prefix="pyseg-test-") as tmp:
            generate_shapes_seg(Path(tmp) / "shapes", train=count, val=1, imgsz=IMGSZ, seed=3)
            paths = sorted((Path(tmp) / "shapes" / "images" / "train").glob("*"))[:count]
            images = [cv2.imread(str(p)) for p in paths]
    resized = [cv2.resize(image, (IMGSZ, IMGSZ), interpolation=cv2.INTER_LINEAR)[:, :, ::-1] for image in images]
    return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy()).float() / 255.0


CONF, IOU = 0.25, 0.7


@pytest.fixture(scope="module")
def references(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """Ultralytics' own raw outputs, detections and masks for the same real images, per model (every model saved and
    run in one peer process)."""
    folder = tmp_path_factory.mktemp("references")
    images = real_images()
    images_file = folder / "images.pt"
    torch.save(images, images_file)
    calls = [["save", name, str(checkpoints.folder / f"{name}.pt"), "0", "0"] for name in EQUALITY_MODELS]
    calls += [
        [
            "reference",
            str(checkpoints.folder / f"{name}.pt"),
            str(images_file),
            str(folder / f"{name}.pt"),
            str(CONF),
            str(IOU),
        ]
        for name in EQUALITY_MODELS
    ]
    run_peer_calls(calls)
    for name in EQUALITY_MODELS:
        checkpoints[name] = checkpoints.folder / f"{name}.pt"
    return {
        name: {"images": images, **torch.load(folder / f"{name}.pt", weights_only=True)} for name in EQUALITY_MODELS
    }


@pytest.mark.slow
@pytest.mark.parametrize("model_name", EQUALITY_MODELS)
def test_raw_outputs_equal_ultralytics(checkpoints, references, model_name):
    """Box distributions, class logits, mask coefficients and prototypes within 1e-4 in float32."""
    imported = read_ultralytics_checkpoint(checkpoints[model_name])
    assert imported.model_name == model_name and imported.nc == 80
    model, _ = build_from_weights(load_weights(checkpoints[model_name]))
    expected = references[model_name]
    with torch.no_grad():
        got = model.eval()(expected["images"])
    for name, ours, theirs in (
        ("box distribution", got.box_distribution, expected["box"]),
        ("class logits", got.class_logits, expected["cls"]),
        ("mask coefficients", got.mask_coeffs, expected["coeffs"]),
        ("prototypes", got.protos, expected["protos"]),
    ):
        assert ours.shape == theirs.shape, name
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert expected["cls"].abs().max() > 1.0, "the outputs vary: the comparison is not of constants"


@pytest.mark.slow
@pytest.mark.parametrize("model_name", EQUALITY_MODELS)
def test_final_predictions_equal_ultralytics(checkpoints, references, model_name):
    """pyseg's NMS and mask assembly against Ultralytics' NMS and process_mask on the same input, conf and iou: the
    same boxes (1e-3 px), classes, scores (1e-4) and masks (IoU >= 0.999)."""
    if not coco128_images_present():
        pytest.skip(
            f"needs COCO128-Seg images ({COCO128_SEG}; set PYSEG_COCO128_SEG): on shapes-seg images these untrained "
            "models give hundreds of near-equal scores, whose order after NMS follows float rounding"
        )
    from pyseg.engine.predict import detect, masks_in_input

    model, _ = build_from_weights(load_weights(checkpoints[model_name]))
    expected = references[model_name]
    with torch.no_grad():
        outputs = model.eval()(expected["images"])
    ours = detect(outputs, model.strides, model.reg_max, CONF, IOU, 300)
    our_masks = masks_in_input(outputs.protos, ours, (IMGSZ, IMGSZ))
    theirs = [expected[f"det{b}"] for b in range(len(ours))]
    total = 0
    for b, (det, their_det) in enumerate(zip(ours, theirs, strict=True)):
        assert det.boxes.shape[0] == their_det.shape[0], f"image {b}: {det.boxes.shape[0]} vs {their_det.shape[0]}"
        total += det.boxes.shape[0]
        their_masks = expected[f"masks{b}"]
        # pair each detection with Ultralytics' one of the same box (equal scores may come in either order)
        distance = (det.boxes[:, None, :] - their_det[None, :, :4]).abs().amax(-1)  # (n, n) px
        pairs = distance.argmin(1)
        assert torch.equal(pairs.sort().values, torch.arange(len(pairs))), f"image {b}: detections without a twin"
        torch.testing.assert_close(det.boxes, their_det[pairs, :4], atol=1e-3, rtol=0)
        torch.testing.assert_close(det.scores, their_det[pairs, 4], atol=1e-4, rtol=0)
        assert torch.equal(det.classes, their_det[pairs, 5].long())
        mine, other = our_masks[b].bool(), their_masks[pairs].bool()
        union = (mine | other).flatten(1).sum(1)
        mask_iou = torch.where(union > 0, (mine & other).flatten(1).sum(1) / union.clamp(min=1), 1.0)
        assert bool((mask_iou >= 0.999).all()), f"image {b}: lowest mask IoU {mask_iou.min():.4f}"
        assert int((union > 0).sum()) >= 5, f"image {b}: too few non-empty masks to compare"
    assert total >= 20, "too few detections to compare"


ALL_YOLO_MODELS = [f"{family}{scale}-seg" for family in ("yolo11", "yolov8") for scale in "nsmlx"]


@pytest.fixture(scope="module")
def ultralytics_shapes() -> dict[str, dict[str, list[int]]]:
    return ultralytics_state_shapes(ALL_YOLO_MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ALL_YOLO_MODELS)
def test_every_scale_has_ultralytics_tensor_shapes(ultralytics_shapes, model_name):
    """Every size of both families, built by pyseg and by Ultralytics from its own config (nc=80): each pyseg tensor
    has the shape of its Ultralytics twin, and the parameter counts agree (depth, width and max-channel scaling)."""
    theirs = {key: tuple(shape) for key, shape in ultralytics_shapes[model_name].items()}
    model = build_model(model_name, 80)
    ours = model.state_dict()
    names = foreign_names(model)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: theirs[names[k]] for k in ours}
    assert set(theirs) - set(names.values()) == {f"model.{len(model.layers) - 1}.dfl.conv.weight"}
    count = sum(math.prod(shape) for key, shape in theirs.items() if "dfl" not in key)
    assert sum(v.numel() for v in ours.values()) == count


def test_every_tensor_is_placed_and_named_by_structure():
    """Every pyseg tensor has one Ultralytics tensor, no two share one, and the DFL bins are the only leftover."""
    model = build_model("yolo11n-seg", 80)
    names = foreign_names(model)
    assert set(names) == set(model.state_dict())
    assert len(set(names.values())) == len(names)
    theirs = ultralytics_state_shapes(["yolo11n-seg"])["yolo11n-seg"]
    assert set(theirs) - set(names.values()) == {"model.23.dfl.conv.weight"}
    assert names["layers.10.blocks.0.attention.position_conv.conv.weight"] == "model.10.m.0.attn.pe.conv.weight"


def test_other_class_count_transfers_all_but_the_class_layers(checkpoints):
    """nc=3 from an nc=80 file: every tensor outside the class branches is transferred unchanged; in the class
    branches, exactly those whose shape depends on nc start new (YOLOv8n's class width is max(64, min(nc, 100)))."""
    weights = load_weights(checkpoints["yolov8n-seg"])
    model, message = build_from_weights(weights, nc=3)
    state = model.state_dict()
    new = [k for k in state if state[k].shape != weights.state_dict[k].shape]
    assert new and all(".class_branches." in k for k in new)
    assert any(k.endswith("class_branches.0.2.weight") for k in new)
    for key in state:
        if key not in new:
            torch.testing.assert_close(state[key], weights.state_dict[key].to(state[key].dtype), msg=key)
    total = len(weights.state_dict)
    assert f"transferred {total - len(new)}/{total} tensors; class layers new for nc=3 (the file has nc=80)" in message


def test_named_scale_or_found_by_shapes(checkpoints, tmp_path):
    """A checkpoint whose description has no 'scale' (older files) is matched by its tensors' shapes."""
    path = rewrite_ultralytics_checkpoint(checkpoints["yolov8s-seg"], tmp_path / "old.pt", "no-scale")
    assert read_ultralytics_checkpoint(path).model_name == "yolov8s-seg"


# ------------------------------------------------------------------ files pyseg refuses


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARK"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "ultralytics": "8.4"}, path)
    for load in (read_ultralytics_checkpoint, load_weights):
        with pytest.raises(CheckpointError, match=r"refused|not a readable") as error:
            load(path)
        assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="refused: its pickle calls posix.system"):
        read_ultralytics_checkpoint(path)
    assert not marker.exists(), "the payload ran"


def test_a_payload_inside_an_ultralytics_checkpoint_is_refused(checkpoints, tmp_path):
    marker = tmp_path / "MARK"
    path = rewrite_ultralytics_checkpoint(checkpoints["yolov8n-seg"], tmp_path / "tampered.pt", "payload", marker)
    with pytest.raises(CheckpointError, match="would run code"):
        load_weights(path)
    assert not marker.exists()


def test_a_truncated_or_damaged_file_is_one_line(checkpoints, tmp_path):
    data = checkpoints["yolov8n-seg"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_ultralytics_checkpoint(truncated)
    with pytest.raises(CheckpointError):
        load_weights(truncated)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(checkpoints["yolov8n-seg"]) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
        offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + 64
    flipped = bytearray(data)
    flipped[offset : offset + 16] = bytes(b ^ 0xFF for b in flipped[offset : offset + 16])
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="damaged: its member .* fails its CRC check"):
        read_ultralytics_checkpoint(damaged)


def test_pyseg_and_ultralytics_checkpoints_are_told_apart(checkpoints, tmp_path):
    from pyseg.engine.checkpoint import load_checkpoint, save_checkpoint

    pyseg_file = tmp_path / "pyseg.pt"
    model = build_model("pyseg-n", 2)
    save_checkpoint(pyseg_file, {"model": model.state_dict(), "config": {"model": "pyseg-n"}, "names": ["a", "b"]})
    with pytest.raises(CheckpointError, match="is a pyseg checkpoint, not an Ultralytics one"):
        read_ultralytics_checkpoint(pyseg_file)
    with pytest.raises(
        CheckpointError, match="is an Ultralytics checkpoint, not a pyseg one: start from it with --weights"
    ):
        load_checkpoint(checkpoints["yolov8n-seg"])
    assert load_weights(pyseg_file).kind == "pyseg" and load_weights(checkpoints["yolov8n-seg"]).kind == "ultralytics"


def test_an_architecture_pyseg_does_not_have_is_one_line(tmp_path):
    path = save_ultralytics_checkpoint("yolo11n", tmp_path / "detect.pt")  # a detection model: no segment head
    with pytest.raises(CheckpointError, match="an architecture pyseg does not have"):
        load_weights(path)


def test_a_yolo_name_that_is_not_a_file_says_where_weights_come_from(tmp_path):
    with pytest.raises(CheckpointError, match="no such file. Ultralytics publishes .* pyseg does not download"):
        load_weights(tmp_path / "yolo11n-seg.pt")


def test_records_never_call_anything(tmp_path):
    """Every class the file names becomes an inert record: a module's state is kept as data, nothing is built."""
    from pyseg.models.pickle_records import PickledRecord, load_as_records

    path = tmp_path / "module.pt"
    torch.save({"layer": torch.nn.Conv2d(2, 3, 1)}, path)
    content = load_as_records(path, "a test file")
    layer = content["layer"]
    assert isinstance(layer, PickledRecord) and not isinstance(layer, torch.nn.Module)
    assert layer.source == "torch.nn.modules.conv.Conv2d"
    assert layer.attribute("_parameters")["weight"].shape == (3, 2, 1, 1)
    assert pickle.dumps(1)  # (pickle untouched by the load)


def test_ultralytics_is_never_imported_into_the_test_process(checkpoints):
    """Importing Ultralytics patches PIL.Image.open, cv2.imread and torch.save for the whole process; every use of
    it above ran in a subprocess (ultralytics_peer.py), so the pyseg tests run unpatched."""
    import sys

    assert checkpoints["yolov8n-seg"].is_file()

    assert "ultralytics" not in sys.modules
