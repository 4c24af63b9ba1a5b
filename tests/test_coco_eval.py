"""COCO evaluation: ground-truth conversion, RLE encoding and mAP values that are known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pyseg.data.labels import ImageLabels
from pyseg.engine.coco_eval import CocoEvaluator, encode_masks, format_table, ground_truth_to_coco
from pyseg.ops import rasterize_polygons

NAMES = ["square", "blob"]


def rectangle(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """A rectangle polygon (4, 2) float32 in whatever units the corners are given."""
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)


def make_labels(height: int, width: int, classes: list[int], polygons_px: list[np.ndarray]) -> ImageLabels:
    """ImageLabels from polygons (k, 2) in pixels, normalized here; boxes are the polygons' extents."""
    scale = np.array([width, height], dtype=np.float32)
    polygons = [(p / scale).astype(np.float32) for p in polygons_px]
    boxes = [np.concatenate([p.min(0), p.max(0)]) for p in polygons]
    return ImageLabels(
        "image.jpg",
        height,
        width,
        np.asarray(classes, dtype=np.int64),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        polygons,
    )


def rasterize_px(polygons_px: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Masks (n, H, W) bool of polygons in pixels, drawn with the op the evaluator uses."""
    offsets = np.cumsum([0] + [len(p) for p in polygons_px]).astype(np.int64)
    masks = rasterize_polygons(
        torch.from_numpy(np.concatenate(polygons_px).astype(np.float32)),
        torch.from_numpy(offsets),
        torch.arange(len(polygons_px), dtype=torch.int64),
        len(polygons_px),
        height,
        width,
    )
    return masks.numpy().astype(bool)


def add_boxes_and_masks(
    evaluator: CocoEvaluator, image_id: int, boxes_px: list[tuple], scores: list[float], classes: list[int]
) -> None:
    """Adds rectangular predictions, each with its rectangle's mask."""
    height, width = evaluator.sizes[image_id]
    masks = rasterize_px([rectangle(*box) for box in boxes_px], height, width)
    evaluator.add(image_id, np.asarray(boxes_px, dtype=np.float32), np.asarray(scores), np.asarray(classes), masks)


def assert_metrics(metrics: dict, **expected: float) -> None:
    for kind in ("box", "mask"):
        for key, value in expected.items():
            assert metrics[kind][key] == pytest.approx(value, abs=1e-6), (kind, key, metrics[kind][key])


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode, numpy 2
def test_ground_truth_in_original_pixels_of_a_non_square_image():
    height, width = 100, 200
    item = ImageLabels(
        "wide.jpg",
        height,
        width,
        np.array([0, 1, 1], dtype=np.int64),
        np.array([[0.125, 0.25, 0.375, 0.75], [0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 1.0]], dtype=np.float32),
        [
            rectangle(0.125, 0.25, 0.375, 0.75),  # x 25..75, y 25..75 px: 50 x 50
            np.array([[0.0, 0.0], [0.25, 0.0], [0.0, 0.25]], dtype=np.float32),  # (0,0) (50,0) (0,25) px
            np.zeros((0, 2), dtype=np.float32),  # box-only: x 100..150, y 50..100 px
        ],
    )
    gt = ground_truth_to_coco([item], NAMES)
    assert gt["images"] == [{"id": 0, "width": 200, "height": 100}]
    assert gt["categories"] == [{"id": 1, "name": "square"}, {"id": 2, "name": "blob"}]
    rect, triangle, box = gt["annotations"]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3]
    assert [a["category_id"] for a in gt["annotations"]] == [1, 2, 2]
    assert all(a["iscrowd"] == 0 and a["image_id"] == 0 for a in gt["annotations"])
    assert rect["bbox"] == pytest.approx([25, 25, 50, 50]) and rect["area"] == 2500
    # pixel (i, j) is inside when i + 2 j + 1.5 < 50 (no centre on the edge): sum over j < 25 of (49 - 2 j) = 625
    assert triangle["bbox"] == pytest.approx([0, 0, 50, 25]) and triangle["area"] == 625
    assert box["bbox"] == pytest.approx([100, 50, 50, 50]) and box["area"] == 2500
    decoded = mask_utils.decode(box["segmentation"])  # (H, W) uint8
    assert decoded.shape == (100, 200)
    assert decoded[50:100, 100:150].all() and decoded.sum() == 2500
    assert mask_utils.decode(rect["segmentation"]).sum() == rect["area"]


def test_ground_truth_rejects_class_outside_names():
    item = make_labels(32, 32, [2], [rectangle(4, 4, 20, 20)])
    with pytest.raises(ValueError, match="names lists only 2"):
        ground_truth_to_coco([item], NAMES)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_encode_masks_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.5
    rles = encode_masks(masks)
    assert len(rles) == 3 and all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    json.dumps(rles)  # plain JSON
    decoded = mask_utils.decode(rles)  # (H, W, N)
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)
    from_tensor = encode_masks(torch.from_numpy(masks.astype(np.uint8)))
    assert [r["counts"] for r in from_tensor] == [r["counts"] for r in rles]
    assert encode_masks(np.zeros((0, 5, 5), dtype=bool)) == []


def test_perfect_predictions_score_one():
    images = [
        make_labels(64, 96, [0, 1], [rectangle(4, 4, 30, 40), np.array([[50, 10], [90, 20], [60, 60]], np.float32)]),
        make_labels(80, 48, [1], [np.array([[5, 5], [40, 8], [30, 70], [8, 50]], np.float32)]),
        make_labels(40, 40, [], []),  # background image
    ]
    evaluator = CocoEvaluator(images, NAMES)
    for image_id, item in enumerate(images):
        if not len(item.classes):
            continue
        scale = np.array([item.width, item.height], dtype=np.float32)
        polygons_px = [p * scale for p in item.polygons]
        masks = rasterize_px(polygons_px, item.height, item.width)
        boxes = item.boxes * np.tile(scale, 2)
        evaluator.add(image_id, boxes, np.full(len(boxes), 0.9), item.classes, masks)
    metrics = evaluator.evaluate()
    assert_metrics(metrics, map50=1.0, map=1.0, precision=1.0, recall=1.0)
    for kind in ("box", "mask"):
        assert metrics[kind]["per_class_ap"] == pytest.approx({"square": 1.0, "blob": 1.0})
    results = evaluator.results_json()
    assert len(results) == 3 and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    json.dumps(results)


def test_shifted_square_with_iou_0_6():
    # 20 x 20 px squares, the prediction 5 px to the right: IoU = 15 * 20 / (25 * 20) = 0.6 exactly, for boxes
    # and for masks -> matched at IoU thresholds 0.50, 0.55, 0.60 and missed at the 7 above.
    images = [make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])]
    evaluator = CocoEvaluator(images, NAMES)
    add_boxes_and_masks(evaluator, 0, [(15, 10, 35, 30)], [0.8], [0])
    metrics = evaluator.evaluate()
    assert_metrics(metrics, map50=1.0, map=0.3, precision=1.0, recall=0.3)
    assert metrics["mask"]["per_class_ap"] == pytest.approx({"square": 0.3})


def test_missed_instance_and_false_positive_of_a_class_without_ground_truth():
    images = [make_labels(64, 64, [0, 0], [rectangle(4, 4, 24, 24), rectangle(34, 34, 60, 60)])]
    evaluator = CocoEvaluator(images, NAMES)
    # the first square found, the second missed; a 'blob' nowhere in the ground truth counts for no class's AP
    add_boxes_and_masks(evaluator, 0, [(4, 4, 24, 24), (30, 2, 50, 20)], [0.9, 0.95], [0, 1])
    metrics = evaluator.evaluate()
    for kind in ("box", "mask"):
        m = metrics[kind]
        assert m["recall"] == pytest.approx(0.5, abs=1e-6)
        assert m["map50"] == pytest.approx(51 / 101, abs=0.01)  # precision 1 up to recall 0.5 of 101 points
        assert m["map"] == pytest.approx(51 / 101, abs=0.01)
        assert set(m["per_class_ap"]) == {"square"}


def test_false_positive_ranked_first_halves_ap():
    images = [make_labels(64, 64, [0], [rectangle(4, 4, 24, 24)]), make_labels(48, 48, [], [])]
    evaluator = CocoEvaluator(images, NAMES)
    add_boxes_and_masks(evaluator, 0, [(4, 4, 24, 24)], [0.9], [0])
    add_boxes_and_masks(evaluator, 1, [(10, 10, 30, 30)], [0.95], [0])  # image without ground truth
    metrics = evaluator.evaluate()
    # detections by score: FP, TP -> precision 0.5 at recall 1 everywhere after interpolation
    assert_metrics(metrics, map50=0.5, map=0.5, precision=0.5, recall=1.0)


def test_no_predictions_give_zeros():
    images = [make_labels(64, 64, [0, 1], [rectangle(4, 4, 24, 24), rectangle(30, 30, 50, 50)])]
    images.append(make_labels(32, 48, [], []))
    evaluator = CocoEvaluator(images, NAMES)
    evaluator.add(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), None)  # an empty image is fine
    metrics = evaluator.evaluate()
    assert_metrics(metrics, map50=0.0, map=0.0, precision=0.0, recall=0.0)
    assert metrics["box"]["per_class_ap"] == {"square": 0.0, "blob": 0.0}
    assert evaluator.results_json() == []
    table = format_table(metrics, NAMES)
    assert "square" in table and "mAP50-95 0.000" in table


def test_box_only_predictions_skip_mask_metrics():
    images = [make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])]
    evaluator = CocoEvaluator(images, NAMES)
    evaluator.add(0, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([0.7]), torch.tensor([0]), None)
    metrics = evaluator.evaluate()
    assert set(metrics) == {"box"}
    assert metrics["box"]["map"] == pytest.approx(1.0, abs=1e-6)
    assert "segmentation" not in evaluator.results_json()[0]
    table = format_table(metrics, NAMES)
    assert "mask" not in table and "box AP50-95" in table
    with pytest.raises(ValueError, match="masks for every image"):
        add_boxes_and_masks(evaluator, 0, [(10, 10, 30, 30)], [0.5], [0])


def test_add_rejects_masks_not_at_original_resolution():
    evaluator = CocoEvaluator([make_labels(64, 96, [0], [rectangle(10, 10, 30, 30)])], NAMES)
    with pytest.raises(ValueError, match="original"):
        evaluator.add(0, np.array([[10, 10, 30, 30]]), np.array([0.9]), np.array([0]), np.ones((1, 64, 64), bool))
    with pytest.raises(ValueError, match="image_id"):
        evaluator.add(5, np.zeros((0, 4)), np.zeros(0), np.zeros(0), None)


def test_verbose_prints_the_cocoeval_summary(capsys):
    evaluator = CocoEvaluator([make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])], NAMES)
    add_boxes_and_masks(evaluator, 0, [(10, 10, 30, 30)], [0.9], [0])
    evaluator.evaluate()
    assert capsys.readouterr().out == ""
    evaluator.evaluate(verbose=True)
    assert "Average Precision" in capsys.readouterr().out
