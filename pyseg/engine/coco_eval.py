"""COCO box and mask mAP of YOLO-format ground truth, computed by pycocotools' COCOeval.

The ground truth is converted once: every polygon is rasterized at the image's original resolution with
pyseg.ops.rasterize_polygons (the same pixel rule as training) and stored as RLE. Predictions are added per image
in original pixels (undo the letterbox first: original pixel = (output pixel - pad) / r, see SegDataset's
ratio_pad) and evaluated with iouType 'bbox' and 'segm', maxDets [1, 10, 100], per category.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from pyseg.data.labels import ImageLabels
from pyseg.ops import rasterize_polygons

METRIC_KEYS = ("precision", "recall", "map50", "map")


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


def _empty_metrics(class_has_gt: list[bool], names: list[str]) -> dict:
    metrics: dict = {key: 0.0 for key in METRIC_KEYS}
    metrics["per_class_ap"] = {name: 0.0 for name, has_gt in zip(names, class_has_gt, strict=True) if has_gt}
    return metrics


class CocoEvaluator:
    """Collects predictions in original pixels and computes COCO box and mask mAP against the verified labels.

    Usage: evaluator = CocoEvaluator(split.images, names); evaluator.add(image_index, ...) for each image (several
    calls for one image add up); evaluator.evaluate().
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
        at_50 = precision[0, :, :, 0, -1]
        at_50 = at_50[at_50 > -1]
        per_class_ap = {}
        for k, name in enumerate(self.names):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            if values.size:
                per_class_ap[name] = float(values.mean())
        return {
            "precision": float(at_50.mean()) if at_50.size else 0.0,
            "recall": max(float(stats[8]), 0.0),  # AR@100; -1 when there is no ground truth
            "map50": max(float(stats[1]), 0.0),
            "map": max(float(stats[0]), 0.0),
            "per_class_ap": per_class_ap,
        }

    def evaluate(self, verbose: bool = False) -> dict:
        """COCO metrics of everything added so far.

        Returns {'box': m, 'mask': m} ('mask' left out for box-only predictions), each m =
        {'precision', 'recall', 'map50', 'map', 'per_class_ap': {name: AP50-95}}: map = AP@[.5:.95], map50 = AP@.5,
        recall = AR@100, precision = mean precision at IoU 0.5 over the recall thresholds of classes with ground
        truth; per_class_ap lists only classes with ground truth. With no predictions every metric is 0.0.
        verbose prints pycocotools' own output (its summary table included).
        """
        metrics = {"box": self._evaluate_type("bbox", verbose)}
        if not self.box_only:
            metrics["mask"] = self._evaluate_type("segm", verbose)
        return metrics


def format_table(metrics: dict, names: list[str]) -> str:
    """A printable table: AP50-95 per class (box and mask; '-' for classes without ground truth), then one summary
    line per kind with precision, recall, mAP50 and mAP50-95."""
    kinds = [kind for kind in ("box", "mask") if kind in metrics]
    width = max([len("class")] + [len(str(name)) for name in names])
    lines = [f"{'class':<{width}}" + "".join(f"  {kind + ' AP50-95':>14}" for kind in kinds)]
    for name in names:
        cells = []
        for kind in kinds:
            value = metrics[kind]["per_class_ap"].get(name)
            cells.append(f"  {'-' if value is None else f'{value:.3f}':>14}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    for kind in kinds:
        m = metrics[kind]
        lines.append(
            f"{kind:<4}  P {m['precision']:.3f}  R {m['recall']:.3f}  mAP50 {m['map50']:.3f}  mAP50-95 {m['map']:.3f}"
        )
    return "\n".join(lines)
