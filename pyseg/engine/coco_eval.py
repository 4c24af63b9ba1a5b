"""COCO box and mask metrics of YOLO-format ground truth, computed by pycocotools' COCOeval.

The ground truth is converted once per CocoEvaluator: every polygon is rasterized at the image's original resolution
with pyseg.ops.rasterize_polygons (the same pixel rule as training) and stored as RLE; one evaluator serves any number
of evaluations (evaluate() starts the next one). Predictions are added per image in original pixels (undo the
letterbox first: original pixel = (output pixel - pad) / r, see SegDataset's ratio_pad) and evaluated with iouType
'bbox' and 'segm', maxDets [1, 10, 100], per category.

mAP50 and mAP50-95 are COCO's. Precision and recall are reported at one operating point, as YOLO tools do: at IoU 0.5
(COCOeval's own matching), at the confidence threshold that maximizes the F1 averaged over the classes with ground
truth; that confidence is reported with them.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from pyseg.data.labels import ImageLabels
from pyseg.ops import rasterize_polygons

# The summary metrics of every kind (metrics["box"], metrics["mask"]), in the order results.csv lists them. Each kind's
# dict also holds "conf" and "f1" (the operating point of precision and recall) and "per_class".
METRIC_KEYS = ("precision", "recall", "map50", "map")
METRIC_LABELS = {"precision": "P", "recall": "R", "map50": "mAP50", "map": "mAP50-95"}  # names in the table
IOU_OF_PRECISION_RECALL = 0.5  # the IoU threshold at which precision and recall are reported


def _to_numpy(array: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def encode_masks(masks: np.ndarray | Tensor) -> list[dict]:
    """Binary masks (N, H, W) bool/uint8 -> N COCO RLE dicts {'size': [H, W], 'counts': str}."""
    masks = _to_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) uint8 in Fortran order
    stacked = np.asfortranarray((masks != 0).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(stacked)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _instance_polygons_px(item: ImageLabels) -> list[np.ndarray]:
    """One polygon (k, 2) float32 in original pixels per instance; box-only instances become their rectangle."""
    scale = np.array([item.width, item.height], dtype=np.float32)
    polygons = []
    for box, polygon in zip(item.boxes, item.polygons, strict=True):
        if len(polygon):
            polygons.append(np.asarray(polygon, dtype=np.float32).reshape(-1, 2) * scale)
        else:
            x1, y1, x2, y2 = np.asarray(box, dtype=np.float32) * np.tile(scale, 2)
            polygons.append(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32))
    return polygons


def ground_truth_to_coco(images: list[ImageLabels], names: list[str]) -> dict:
    """A COCO ground-truth dict of verified labels.

    Image ids are the indices into `images` (width/height = the original size); category id = class index + 1.
    Each instance is one annotation: segmentation = RLE of its polygon rasterized at the original resolution,
    area = mask pixel count, bbox = [x, y, w, h] of the polygon's box in original pixels, iscrowd 0. Box-only
    instances (empty polygon) get their box as bbox and a box-shaped mask.
    """
    categories = [{"id": index + 1, "name": str(name)} for index, name in enumerate(names)]
    image_entries, annotations = [], []
    for image_id, item in enumerate(images):
        image_entries.append({"id": image_id, "width": int(item.width), "height": int(item.height)})
        classes = np.asarray(item.classes, dtype=np.int64).reshape(-1)
        if len(classes) != len(item.polygons) or len(classes) != len(item.boxes):
            raise ValueError(
                f"image {image_id} ({item.image}): {len(classes)} classes, {len(item.boxes)} boxes and "
                f"{len(item.polygons)} polygons; labels must have one of each per instance"
            )
        if len(classes) == 0:
            continue
        if classes.min() < 0 or classes.max() >= len(names):
            raise ValueError(
                f"image {image_id} ({item.image}) has class {int(classes.max())} but names lists only {len(names)} "
                "classes; pass the dataset's full names list"
            )
        polygons = _instance_polygons_px(item)
        offsets = np.cumsum([0] + [len(p) for p in polygons])
        masks = rasterize_polygons(
            torch.from_numpy(np.concatenate(polygons)),
            torch.from_numpy(offsets.astype(np.int64)),
            torch.arange(len(polygons), dtype=torch.int64),
            len(polygons),
            int(item.height),
            int(item.width),
        )  # (n, H, W) uint8
        areas = masks.flatten(1).sum(1).tolist()
        for cls, polygon, rle, area in zip(classes.tolist(), polygons, encode_masks(masks), areas, strict=True):
            x1, y1 = polygon.min(0).tolist()
            x2, y2 = polygon.max(0).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched": ids start at 1
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "segmentation": rle,
                    "area": int(area),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
    return {"images": image_entries, "annotations": annotations, "categories": categories}


@dataclass(frozen=True)
class OperatingPoint:
    """Precision and recall at one confidence threshold: detections with score >= conf count.

    conf: the threshold (0.0 when no detection of a class with ground truth exists); f1: the class-mean F1 there;
    precision, recall: (K,) float64 per class, in the order the classes were given.
    """

    conf: float
    f1: float
    precision: np.ndarray
    recall: np.ndarray


def _sorted_by_score(scores: np.ndarray, true_positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores sorted highest first (D,), running true-positive count (D,)) of one class's detections."""
    order = np.argsort(-scores, kind="stable")
    return scores[order], np.cumsum(true_positive[order])


def _precision_recall_at(
    sorted_scores: np.ndarray, true_positive_count: np.ndarray, num_ground_truth: int, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) (U,) of one class at each threshold in thresholds (U,); precision is 0 where no detection
    reaches the threshold."""
    kept = np.searchsorted(-sorted_scores, -thresholds, side="right")  # detections with score >= threshold
    running = np.concatenate([[0], true_positive_count])  # running[k]: true positives among the first k
    true_positives = running[kept].astype(np.float64)
    precision = true_positives / np.maximum(kept, 1)
    recall = true_positives / num_ground_truth
    return precision, recall


def max_f1_operating_point(
    scores: list[np.ndarray], true_positive: list[np.ndarray], num_ground_truth: list[int]
) -> OperatingPoint:
    """The confidence threshold that maximizes the class-mean F1, and each class's precision and recall there.

    Args:
        scores: per class (K entries, every one with ground truth), the (D_k,) scores of its detections.
        true_positive: per class, (D_k,) bool: the detection matched a ground-truth instance.
        num_ground_truth: per class, its number of ground-truth instances (> 0).

    Per class, P(c) = TP(c) / (TP(c) + FP(c)) (0 when it keeps no detection) and R(c) = TP(c) / num_ground_truth over
    the detections with score >= c, and F1(c) = 2 P R / (P + R) (0 when P + R = 0). The candidate thresholds are the
    detections' scores, where these step curves change; the threshold with the largest mean F1 over the K classes is
    chosen (the highest of equal ones). Exact, no grid or smoothing.
    """
    count = len(num_ground_truth)
    if not len(scores) == len(true_positive) == count or min(num_ground_truth, default=1) <= 0:
        raise ValueError(
            f"scores, true_positive and num_ground_truth must describe the same classes, each with ground truth; got "
            f"{len(scores)}, {len(true_positive)} and {num_ground_truth}"
        )
    classes = [
        _sorted_by_score(np.asarray(s, dtype=np.float64).reshape(-1), np.asarray(tp, dtype=bool).reshape(-1))
        for s, tp in zip(scores, true_positive, strict=True)
    ]
    thresholds = np.unique(np.concatenate([s for s, _ in classes] + [np.zeros(0)]))[::-1]  # highest first
    if count == 0 or thresholds.size == 0:
        return OperatingPoint(0.0, 0.0, np.zeros(count), np.zeros(count))
    f1_sum = np.zeros(len(thresholds))
    for (sorted_scores, true_positive_count), ground_truth in zip(classes, num_ground_truth, strict=True):
        precision, recall = _precision_recall_at(sorted_scores, true_positive_count, ground_truth, thresholds)
        total = precision + recall
        f1_sum += np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.argmax(f1_sum))  # the first maximum: the highest threshold among equal F1s
    conf = thresholds[best : best + 1]
    per_class = [_precision_recall_at(s, tp, n, conf) for (s, tp), n in zip(classes, num_ground_truth, strict=True)]
    return OperatingPoint(
        conf=float(conf[0]),
        f1=float(f1_sum[best] / count),
        precision=np.array([p[0] for p, _ in per_class]),
        recall=np.array([r[0] for _, r in per_class]),
    )


def matches_at_iou(coco_eval: COCOeval, iou_threshold: float) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Per category id: (scores (D,), true_positive (D,) bool, number of ground-truth instances) at one of the
    evaluation's IoU thresholds, read from the matching that COCOeval.evaluate() did (its evalImgs).

    As COCOeval.accumulate does for area 'all' and the largest maxDets: the highest-scoring maxDets[-1] detections
    per image and class, detections and ground truth that COCOeval ignores (crowd) left out. Categories without
    ground truth and detections are absent.
    """
    params = coco_eval.params
    thresholds = np.asarray(params.iouThrs)
    iou_index = int(np.argmin(np.abs(thresholds - iou_threshold)))
    if not np.isclose(thresholds[iou_index], iou_threshold):
        raise ValueError(f"COCOeval evaluated IoU thresholds {thresholds.tolist()}, not {iou_threshold}")
    all_areas, max_detections = list(params.areaRng[0]), params.maxDets[-1]
    scores: dict[int, list[np.ndarray]] = defaultdict(list)
    true_positive: dict[int, list[np.ndarray]] = defaultdict(list)
    ground_truth: dict[int, int] = defaultdict(int)
    for entry in coco_eval.evalImgs:  # one per (category, area range, image) with ground truth or detections
        if entry is None or list(entry["aRng"]) != all_areas or entry["maxDet"] != max_detections:
            continue
        category = entry["category_id"]
        counted = ~np.asarray(entry["dtIgnore"], dtype=bool).reshape(len(thresholds), -1)[iou_index]  # (D,)
        matched = np.asarray(entry["dtMatches"]).reshape(len(thresholds), -1)[iou_index] != 0  # (D,) gt id or 0
        scores[category].append(np.asarray(entry["dtScores"], dtype=np.float64)[counted])
        true_positive[category].append(matched[counted])
        ground_truth[category] += int((np.asarray(entry["gtIgnore"]) == 0).sum())
    return {
        category: (np.concatenate(scores[category]), np.concatenate(true_positive[category]), ground_truth[category])
        for category in scores
    }


def _empty_metrics(class_has_gt: list[bool], names: list[str]) -> dict:
    metrics: dict = {key: 0.0 for key in METRIC_KEYS}
    metrics.update(conf=0.0, f1=0.0)
    metrics["per_class"] = {
        name: {key: 0.0 for key in METRIC_KEYS} for name, has_gt in zip(names, class_has_gt, strict=True) if has_gt
    }
    metrics["per_class_ap"] = {name: 0.0 for name in metrics["per_class"]}
    return metrics


class CocoEvaluator:
    """Collects predictions in original pixels and computes COCO box and mask metrics against the verified labels.

    Usage: evaluator = CocoEvaluator(split.images, names); evaluator.add(image_index, ...) for each image (several
    calls for one image add up); metrics = evaluator.evaluate().

    Reuse: build one evaluator per image list and keep it. The constructor converts the ground truth once (every
    polygon rasterized and RLE-encoded); evaluate() consumes the predictions added since the last evaluate() and
    leaves the evaluator empty, ready for the next evaluation (e.g. the next epoch's validation), box-only or not.
    reset() discards added predictions without evaluating them (e.g. after an interrupted validation pass).
    """

    def __init__(self, images: list[ImageLabels], names: list[str]):
        self.names = list(names)
        self.sizes = [(int(item.height), int(item.width)) for item in images]
        self.ground_truth = ground_truth_to_coco(images, self.names)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO()
            self.coco_gt.dataset = self.ground_truth
            self.coco_gt.createIndex()
        has_gt = np.zeros(len(self.names), dtype=bool)
        for annotation in self.ground_truth["annotations"]:
            has_gt[annotation["category_id"] - 1] = True
        self.class_has_gt = has_gt.tolist()
        self.predictions: list[dict] = []
        self.box_only: bool | None = None  # None until an add() with predictions says whether masks come

    def reset(self) -> None:
        """Discards the predictions added so far (the ground truth stays): the next add() starts a new evaluation."""
        self.predictions = []
        self.box_only = None

    def add(
        self,
        image_id: int,
        boxes_xyxy: np.ndarray | Tensor,
        scores: np.ndarray | Tensor,
        classes: np.ndarray | Tensor,
        masks: np.ndarray | Tensor | None,
    ) -> None:
        """Adds the predictions of one image, in its ORIGINAL pixels.

        Args:
            image_id: index of the image in the `images` given to the constructor.
            boxes_xyxy: (N, 4) float, original pixels.
            scores: (N,) float confidences.
            classes: (N,) int, 0-based class indices.
            masks: (N, H, W) bool/uint8 at the original resolution (H, W) = (height, width) of the image, or None
                for box-only evaluation (then for every image).
        """
        if not 0 <= int(image_id) < len(self.sizes):
            raise ValueError(f"image_id must be an index into the {len(self.sizes)} evaluated images, got {image_id}")
        image_id = int(image_id)
        boxes = _to_numpy(boxes_xyxy).astype(np.float64).reshape(-1, 4)
        scores = _to_numpy(scores).astype(np.float64).reshape(-1)
        classes = _to_numpy(classes).reshape(-1)
        count = len(boxes)
        if len(scores) != count or len(classes) != count:
            raise ValueError(
                f"boxes_xyxy, scores and classes must describe the same N predictions, got {count}, {len(scores)} "
                f"and {len(classes)}"
            )
        if count == 0:
            return
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {image_id}: boxes_xyxy and scores must be finite; drop NaN/inf predictions first")
        if classes.min() < 0 or classes.max() >= len(self.names):
            raise ValueError(
                f"image {image_id}: classes must be 0-based indices below {len(self.names)}, got {classes.min()} to "
                f"{classes.max()}"
            )
        box_only = masks is None
        if self.box_only is not None and self.box_only != box_only:
            raise ValueError(
                "pass masks for every image with predictions or for none (None = box-only evaluation); "
                f"image {image_id} {'has none' if box_only else 'has masks'} unlike earlier images"
            )
        self.box_only = box_only
        rles: list[dict | None] = [None] * count
        if masks is not None:
            masks = _to_numpy(masks)
            height, width = self.sizes[image_id]
            if masks.shape != (count, height, width):
                raise ValueError(
                    f"image {image_id}: masks must have shape (N, H, W) = ({count}, {height}, {width}), the original "
                    f"resolution, got {masks.shape}; crop the letterbox padding and resize to the original size first "
                    "(original pixel = (output pixel - pad) / r)"
                )
            rles = encode_masks(masks)
        for box, score, cls, rle in zip(boxes.tolist(), scores.tolist(), classes.tolist(), rles, strict=True):
            x1, y1, x2, y2 = box
            prediction = {
                "image_id": image_id,
                "category_id": int(cls) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
            }
            if rle is not None:
                prediction["segmentation"] = rle
            self.predictions.append(prediction)

    def results_json(self) -> list[dict]:
        """All predictions in the COCO results format: image_id, category_id, bbox [x, y, w, h] px, score and
        (when masks were given) segmentation as RLE; JSON-serializable."""
        results = []
        for prediction in self.predictions:
            result = dict(prediction, bbox=list(prediction["bbox"]))
            if "segmentation" in prediction:
                result["segmentation"] = dict(prediction["segmentation"])
            results.append(result)
        return results

    def _evaluate_type(self, iou_type: str, verbose: bool) -> dict:
        if iou_type == "bbox":
            keys = ("image_id", "category_id", "bbox", "score")
        else:  # without 'bbox', loadRes keeps the masks and takes the detection area from them
            keys = ("image_id", "category_id", "segmentation", "score")
        results = [{key: prediction[key] for key in keys} for prediction in self.predictions]
        if not results:
            return _empty_metrics(self.class_has_gt, self.names)
        output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with output:
            coco_dt = self.coco_gt.loadRes(results)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = coco_eval.stats
        precision = coco_eval.eval["precision"]  # (T=10 IoU, R=101 recall, K classes, A=4 areas, M=3 maxDets)
        category_ids = list(coco_eval.params.catIds)
        matches = matches_at_iou(coco_eval, IOU_OF_PRECISION_RECALL)
        with_gt = [k for k, category in enumerate(category_ids) if category in matches and matches[category][2] > 0]
        point = max_f1_operating_point(
            [matches[category_ids[k]][0] for k in with_gt],
            [matches[category_ids[k]][1] for k in with_gt],
            [matches[category_ids[k]][2] for k in with_gt],
        )
        per_class = {}
        for i, k in enumerate(with_gt):
            at_50 = precision[0, :, k, 0, -1]  # -1 marks classes without ground truth: none here
            per_class[self.names[category_ids[k] - 1]] = {
                "precision": float(point.precision[i]),
                "recall": float(point.recall[i]),
                "map50": float(at_50.mean()),
                "map": float(precision[:, :, k, 0, -1].mean()),
            }
        return {
            "precision": float(point.precision.mean()) if with_gt else 0.0,
            "recall": float(point.recall.mean()) if with_gt else 0.0,
            "map50": max(float(stats[1]), 0.0),  # -1 when there is no ground truth
            "map": max(float(stats[0]), 0.0),
            "conf": point.conf,
            "f1": point.f1,
            "per_class": per_class,
            "per_class_ap": {name: values["map"] for name, values in per_class.items()},
        }

    def evaluate(self, verbose: bool = False) -> dict:
        """COCO metrics of the predictions added since the last evaluate() (or reset()); then starts a new evaluation:
        the predictions are cleared, the ground truth kept.

        Returns {'box': m, 'mask': m} ('mask' left out for box-only predictions), each m = {'precision', 'recall',
        'map50', 'map', 'conf', 'f1', 'per_class', 'per_class_ap'}:
            map, map50: COCO AP@[.5:.95] and AP@.5 (101-point interpolated, maxDets 100), the mean over classes with
                ground truth.
            precision, recall: the class means of precision and recall at IoU 0.5 at the operating point `conf`, the
                confidence threshold that maximizes the class-mean F1 (`f1`, the mean of the per-class F1s, so not
                2 P R / (P + R) of the means); see max_f1_operating_point.
            per_class: {name: {'precision', 'recall', 'map50', 'map'}} for the classes with ground truth, precision and
                recall at the same `conf`.
            per_class_ap: {name: AP@[.5:.95]}, the same classes (per_class[name]['map']).
        With no predictions every metric is 0.0. verbose prints pycocotools' own output (its summary table included).
        Call results_json() before evaluate() to keep the predictions.
        """
        try:
            metrics = {"box": self._evaluate_type("bbox", verbose)}
            if not self.box_only:
                metrics["mask"] = self._evaluate_type("segm", verbose)
        finally:
            self.reset()
        return metrics


def format_metrics_table(metrics: dict, names: list[str]) -> str:
    """A printable table of evaluate()'s metrics, YOLO-style: a header line that states the operating point of P and R
    (IoU 0.5, each kind's conf and mean F1), column names, a row 'all' with the summary metrics, then one row per
    class ('-' for classes without ground truth). Per kind (box, then mask when present) the columns are P, R, mAP50
    and mAP50-95."""
    kinds = [kind for kind in ("box", "mask") if kind in metrics]
    points = ", ".join(f"{kind} conf {metrics[kind]['conf']:.3f} (F1 {metrics[kind]['f1']:.3f})" for kind in kinds)
    header = f"P and R at IoU {IOU_OF_PRECISION_RECALL:g} and the confidence of max class-mean F1: {points}"
    columns = [(kind, key, f"{kind} {METRIC_LABELS[key]}") for kind in kinds for key in METRIC_KEYS]
    width = max([len("class"), len("all")] + [len(str(name)) for name in names])
    lines = [header, f"{'class':<{width}}" + "".join(f"  {title:>{max(len(title), 5)}}" for *_, title in columns)]
    rows = [("all", {kind: metrics[kind] for kind in kinds})]
    rows += [(str(name), {kind: metrics[kind]["per_class"].get(name) for kind in kinds}) for name in names]
    for name, values in rows:
        cells = []
        for kind, key, title in columns:
            value = None if values[kind] is None else values[kind][key]
            cells.append(f"  {'-' if value is None else f'{value:.3f}':>{max(len(title), 5)}}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
