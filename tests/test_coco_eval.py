"""COCO evaluation: ground-truth conversion, RLE encoding and mAP values that are known by construction."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pyseg.data.labels import ImageLabels
from pyseg.engine import coco_eval
from pyseg.engine.coco_eval import (
    METRIC_KEYS,
    CocoEvaluator,
    encode_masks,
    format_metrics_table,
    ground_truth_to_coco,
    max_f1_operating_point,
)
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
    results = evaluator.results_json()  # before evaluate(), which consumes the predictions
    assert len(results) == 3 and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    json.dumps(results)
    metrics = evaluator.evaluate()
    assert_metrics(metrics, map50=1.0, map=1.0, precision=1.0, recall=1.0, conf=0.9, f1=1.0)
    for kind in ("box", "mask"):
        assert metrics[kind]["per_class_ap"] == pytest.approx({"square": 1.0, "blob": 1.0})
    assert evaluator.results_json() == []


def test_shifted_square_with_iou_0_6():
    # 20 x 20 px squares, the prediction 5 px to the right: IoU = 15 * 20 / (25 * 20) = 0.6 exactly, for boxes
    # and for masks -> matched at IoU thresholds 0.50, 0.55, 0.60 and missed at the 7 above.
    images = [make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])]
    evaluator = CocoEvaluator(images, NAMES)
    add_boxes_and_masks(evaluator, 0, [(15, 10, 35, 30)], [0.8], [0])
    metrics = evaluator.evaluate()
    # precision and recall count the match at IoU 0.5; COCO's AR@100 (the mean over the 10 IoU thresholds) would be 0.3
    assert_metrics(metrics, map50=1.0, map=0.3, precision=1.0, recall=1.0, conf=0.8)
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
        assert m["precision"] == pytest.approx(1.0, abs=1e-6)  # the blob has no ground truth: no class's precision
        assert m["conf"] == pytest.approx(0.9)  # the blob's 0.95 is no candidate threshold
        assert m["map50"] == pytest.approx(51 / 101, abs=0.01)  # precision 1 up to recall 0.5 of 101 points
        assert m["map"] == pytest.approx(51 / 101, abs=0.01)
        assert set(m["per_class_ap"]) == {"square"}


def test_false_positive_ranked_first_halves_ap():
    images = [make_labels(64, 64, [0], [rectangle(4, 4, 24, 24)]), make_labels(48, 48, [], [])]
    evaluator = CocoEvaluator(images, NAMES)
    add_boxes_and_masks(evaluator, 0, [(4, 4, 24, 24)], [0.9], [0])
    add_boxes_and_masks(evaluator, 1, [(10, 10, 30, 30)], [0.95], [0])  # image without ground truth
    metrics = evaluator.evaluate()
    # detections by score: FP, TP -> precision 0.5 at recall 1 everywhere after interpolation; F1 is 0 at conf 0.95
    # (no true positive) and 2/3 at 0.9, with precision 0.5 and recall 1
    assert_metrics(metrics, map50=0.5, map=0.5, precision=0.5, recall=1.0, conf=0.9, f1=2 / 3)


def test_no_predictions_give_zeros():
    images = [make_labels(64, 64, [0, 1], [rectangle(4, 4, 24, 24), rectangle(30, 30, 50, 50)])]
    images.append(make_labels(32, 48, [], []))
    evaluator = CocoEvaluator(images, NAMES)
    evaluator.add(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), None)  # an empty image is fine
    metrics = evaluator.evaluate()
    assert_metrics(metrics, map50=0.0, map=0.0, precision=0.0, recall=0.0, conf=0.0, f1=0.0)
    assert metrics["box"]["per_class_ap"] == {"square": 0.0, "blob": 0.0}
    assert metrics["box"]["per_class"]["blob"] == {key: 0.0 for key in METRIC_KEYS}
    assert evaluator.results_json() == []
    lines = format_metrics_table(metrics, NAMES).splitlines()
    assert "box conf 0.000 (F1 0.000), mask conf 0.000 (F1 0.000)" in lines[0]
    assert lines[2].split() == ["all"] + ["0.000"] * 8 and lines[3].split() == ["square"] + ["0.000"] * 8


def test_box_only_predictions_skip_mask_metrics():
    images = [make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])]
    evaluator = CocoEvaluator(images, NAMES)
    evaluator.add(0, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([0.7]), torch.tensor([0]), None)
    assert "segmentation" not in evaluator.results_json()[0]
    with pytest.raises(ValueError, match="masks for every image"):  # within one evaluation
        add_boxes_and_masks(evaluator, 0, [(10, 10, 30, 30)], [0.5], [0])
    metrics = evaluator.evaluate()
    assert set(metrics) == {"box"}
    assert metrics["box"]["map"] == pytest.approx(1.0, abs=1e-6)
    table = format_metrics_table(metrics, NAMES)
    assert "mask" not in table and "box mAP50-95" in table and "box conf 0.700" in table


def test_add_rejects_masks_not_at_original_resolution():
    evaluator = CocoEvaluator([make_labels(64, 96, [0], [rectangle(10, 10, 30, 30)])], NAMES)
    with pytest.raises(ValueError, match="original"):
        evaluator.add(0, np.array([[10, 10, 30, 30]]), np.array([0.9]), np.array([0]), np.ones((1, 64, 64), bool))
    with pytest.raises(ValueError, match="image_id"):
        evaluator.add(5, np.zeros((0, 4)), np.zeros(0), np.zeros(0), None)


def test_verbose_prints_the_cocoeval_summary(capsys):
    evaluator = CocoEvaluator([make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])], NAMES)
    for verbose in (False, True):
        add_boxes_and_masks(evaluator, 0, [(10, 10, 30, 30)], [0.9], [0])
        evaluator.evaluate(verbose=verbose)
        assert ("Average Precision" in capsys.readouterr().out) == verbose


# Four 20 x 20 px squares in a 128 x 128 image; a prediction 5 px to the right of one has IoU 0.6 (boxes and masks).
FOUR_SQUARES = [(8, 8, 28, 28), (40, 8, 60, 28), (72, 8, 92, 28), (8, 40, 28, 60)]
EMPTY_CORNER = (90, 90, 110, 110)  # overlaps no square: a false positive


def shifted(box: tuple, dx: float) -> tuple:
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def test_precision_and_recall_at_the_max_f1_confidence():
    evaluator = CocoEvaluator([make_labels(128, 128, [0] * 4, [rectangle(*box) for box in FOUR_SQUARES])], NAMES)
    # three squares found (two at IoU 0.6, one exactly), the fourth missed, and a false positive scored lowest
    boxes = [FOUR_SQUARES[0], shifted(FOUR_SQUARES[1], 5), shifted(FOUR_SQUARES[2], 5), EMPTY_CORNER]
    add_boxes_and_masks(evaluator, 0, boxes, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])
    metrics = evaluator.evaluate()
    # conf  0.9   0.8   0.7   0.6          (detections with score >= conf, matched at IoU 0.5)
    # P     1     1     1     3/4
    # R     1/4   2/4   3/4   3/4
    # F1    0.4   0.667 0.857 0.75   -> conf 0.7: P 1, R 3/4, F1 6/7
    assert_metrics(metrics, precision=1.0, recall=0.75, conf=0.7, f1=6 / 7)
    # AP50: precision 1 up to recall 0.75 = 76 of 101 recall points; the old "precision" was this AP50, and the old
    # "recall" COCO's AR@100 = (3 IoU thresholds x 3/4 + 7 x 1/4) / 10 = 0.4
    assert_metrics(metrics, map50=76 / 101)
    for kind in ("box", "mask"):
        assert metrics[kind]["per_class"]["square"] == pytest.approx(
            {"precision": 1.0, "recall": 0.75, "map50": 76 / 101, "map": metrics[kind]["map"]}
        )
        assert set(metrics[kind]["per_class"]) == {"square"}


def test_operating_point_keeps_a_false_positive_scored_above_true_positives():
    evaluator = CocoEvaluator([make_labels(128, 128, [0] * 4, [rectangle(*box) for box in FOUR_SQUARES])], NAMES)
    boxes = [FOUR_SQUARES[0], EMPTY_CORNER, FOUR_SQUARES[1], FOUR_SQUARES[2], (100, 40, 120, 60)]
    add_boxes_and_masks(evaluator, 0, boxes, [0.9, 0.8, 0.7, 0.6, 0.5], [0] * 5)
    metrics = evaluator.evaluate()
    # by score TP FP TP TP FP:  conf 0.9 0.8 0.7 0.6 0.5 -> P 1, 1/2, 2/3, 3/4, 3/5; R 1/4, 1/4, 2/4, 3/4, 3/4;
    # F1 0.4, 0.333, 0.571, 0.75, 0.667 -> conf 0.6 with P = R = F1 = 3/4
    assert_metrics(metrics, precision=0.75, recall=0.75, conf=0.6, f1=0.75)
    # AP50: interpolated precision 1 at recall <= 1/4 (26 points), 3/4 up to recall 3/4 (50 points)
    assert_metrics(metrics, map50=(26 + 50 * 0.75) / 101, map=(26 + 50 * 0.75) / 101)


def test_several_classes_share_one_conf_that_maximizes_the_mean_f1():
    names = ["square", "blob", "ring"]  # no ring in the ground truth
    images = [
        make_labels(128, 128, [0, 0], [rectangle(*box) for box in FOUR_SQUARES[:2]]),
        make_labels(128, 128, [1, 1], [rectangle(*box) for box in FOUR_SQUARES[2:]]),
    ]
    evaluator = CocoEvaluator(images, names)
    # square: TP 0.9, FP 0.4 (second square missed); blob: TP 0.8, FP 0.7, TP 0.5; ring: FP 0.95
    add_boxes_and_masks(evaluator, 0, [FOUR_SQUARES[0], EMPTY_CORNER, (60, 60, 80, 80)], [0.9, 0.4, 0.95], [0, 0, 2])
    add_boxes_and_masks(evaluator, 1, [FOUR_SQUARES[2], EMPTY_CORNER, FOUR_SQUARES[3]], [0.8, 0.7, 0.5], [1, 1, 1])
    metrics = evaluator.evaluate()
    # conf         0.9        0.8        0.7        0.5        0.4
    # square F1    2/3        2/3        2/3        2/3        1/2    (P 1 R 1/2, then P 1/2 R 1/2)
    # blob F1      0          2/3        1/2        4/5        4/5    (P 1 R 1/2, P 1/2 R 1/2, P 2/3 R 1)
    # mean F1      1/3        2/3        7/12       11/15      13/20  -> conf 0.5 (ring's 0.95 is no candidate)
    assert_metrics(metrics, conf=0.5, f1=11 / 15, precision=(1 + 2 / 3) / 2, recall=(1 / 2 + 1) / 2)
    square_ap50, blob_ap50 = 51 / 101, (51 + 50 * 2 / 3) / 101
    assert_metrics(metrics, map50=(square_ap50 + blob_ap50) / 2)
    for kind in ("box", "mask"):
        per_class = metrics[kind]["per_class"]
        assert set(per_class) == {"square", "blob"} == set(metrics[kind]["per_class_ap"])
        # the true positives are exact: AP50-95 = AP50
        square = {"precision": 1, "recall": 0.5, "map50": square_ap50, "map": square_ap50}
        assert per_class["square"] == pytest.approx(square)
        assert per_class["blob"] == pytest.approx(
            {"precision": 2 / 3, "recall": 1, "map50": blob_ap50, "map": blob_ap50}
        )
    lines = format_metrics_table(metrics, names).splitlines()
    assert lines[0] == (
        "P and R at IoU 0.5 and the confidence of max class-mean F1: box conf 0.500 (F1 0.733), "
        "mask conf 0.500 (F1 0.733)"
    )
    columns = [f"{kind} {label}" for kind in ("box", "mask") for label in ("P", "R", "mAP50", "mAP50-95")]
    assert re.split(r"\s{2,}", lines[1]) == ["class"] + columns
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["all", "square", "blob", "ring"]
    mean_ap = f"{(square_ap50 + blob_ap50) / 2:.3f}"
    assert rows["all"] == ["0.833", "0.750", mean_ap, mean_ap] * 2
    assert rows["square"][:2] == ["1.000", "0.500"] and rows["blob"][:2] == ["0.667", "1.000"]
    assert rows["ring"] == ["-"] * 8


def test_max_f1_operating_point_edge_cases():
    # equal mean F1 at two thresholds: the higher one wins
    point = max_f1_operating_point([np.array([0.9, 0.8])], [np.array([True, False])], [1])
    assert (point.conf, point.f1) == (0.9, 1.0)
    point = max_f1_operating_point(
        [np.array([0.6, 0.3]), np.array([0.5])], [np.array([True, True]), np.zeros(1)], [2, 1]
    )
    # a class that keeps no detection has precision 0; the second class never scores
    assert point.conf == 0.3 and point.precision.tolist() == [1.0, 0.0] and point.recall.tolist() == [1.0, 0.0]
    assert point.f1 == pytest.approx(0.5)
    empty = max_f1_operating_point([np.zeros(0)], [np.zeros(0, bool)], [3])
    assert (empty.conf, empty.f1, empty.precision.tolist(), empty.recall.tolist()) == (0.0, 0.0, [0.0], [0.0])
    with pytest.raises(ValueError, match="each with ground truth"):
        max_f1_operating_point([np.zeros(0)], [np.zeros(0, bool)], [0])


def test_one_evaluator_serves_several_evaluations_and_encodes_the_ground_truth_once(monkeypatch):
    calls = []

    def counting_rasterize(*args, **kwargs):
        calls.append(args[3])  # number of masks
        return rasterize_polygons(*args, **kwargs)

    monkeypatch.setattr(coco_eval, "rasterize_polygons", counting_rasterize)
    images = [
        make_labels(128, 128, [0, 0, 1], [rectangle(*box) for box in FOUR_SQUARES[:3]]),
        make_labels(64, 96, [1], [rectangle(10, 10, 40, 30)]),
        make_labels(40, 40, [], []),
    ]

    def first(evaluator):  # masks: a match at IoU 0.6, a miss, a false positive
        add_boxes_and_masks(evaluator, 0, [shifted(FOUR_SQUARES[0], 5), EMPTY_CORNER], [0.9, 0.6], [0, 1])
        add_boxes_and_masks(evaluator, 1, [(10, 10, 40, 30)], [0.8], [1])

    def second(evaluator):  # box-only
        evaluator.add(0, np.array([FOUR_SQUARES[2], FOUR_SQUARES[1]]), np.array([0.7, 0.5]), np.array([1, 0]), None)

    reused = CocoEvaluator(images, NAMES)
    assert calls == [3, 1]  # one rasterization per image with ground truth
    first(reused)
    reused_first = reused.evaluate()
    second(reused)
    reused_second = reused.evaluate()
    assert calls == [3, 1]  # the evaluations drew no ground truth again
    first(reused)
    reused.reset()  # discarded
    assert reused.evaluate()["box"]["map"] == 0.0

    fresh_first, fresh_second = CocoEvaluator(images, NAMES), CocoEvaluator(images, NAMES)
    first(fresh_first)
    second(fresh_second)
    assert reused_first == fresh_first.evaluate()
    assert reused_second == fresh_second.evaluate()
    assert set(reused_first) == {"box", "mask"} and set(reused_second) == {"box"}
    assert reused_first["mask"]["map50"] > 0 and reused_second["box"]["map50"] > 0


def test_every_kind_has_the_metric_keys():
    evaluator = CocoEvaluator([make_labels(64, 64, [0], [rectangle(10, 10, 30, 30)])], NAMES)
    assert METRIC_KEYS == ("precision", "recall", "map50", "map")
    empty = evaluator.evaluate()
    add_boxes_and_masks(evaluator, 0, [(10, 10, 30, 30)], [0.9], [0])
    for metrics in (empty, evaluator.evaluate()):
        for kind in ("box", "mask"):
            assert set(metrics[kind]) == set(METRIC_KEYS) | {"conf", "f1", "per_class", "per_class_ap"}
            assert set(metrics[kind]["per_class"]["square"]) == set(METRIC_KEYS)


def test_a_class_without_detections_beside_one_with_them_has_zero_precision_and_recall():
    # the second class has ground truth but not a single detection (a barely trained model)
    point = max_f1_operating_point(
        [np.array([0.7, 0.2]), np.zeros(0)], [np.array([True, False]), np.zeros(0, bool)], [1, 2]
    )
    assert point.conf == 0.7 and point.precision.tolist() == [1.0, 0.0] and point.recall.tolist() == [1.0, 0.0]
