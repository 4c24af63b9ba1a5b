"""python -m pyseg.predict: instance masks for images, folders or videos, drawn and as COCO-results JSON.

    python -m pyseg.predict --weights runs/train/weights/best.pt --source path/to/image_or_folder_or_video
        [--imgsz 640] [--conf 0.25] [--iou 0.7] [--device cpu] [--out runs/predict]

Python API: `Predictor(weights).predict(image_bgr)` -> Prediction (boxes, scores, classes, masks at the image size).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pyseg.data.augment import PAD_VALUE, letterbox, warp_into
from pyseg.data.images import IMAGE_SUFFIXES, ImageReadError, read_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass
class Prediction:
    """One image's instances in its own pixels: boxes (n, 4) xyxy float, scores (n,), classes (n,) int, masks
    (n, H, W) bool."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray


class Predictor:
    """A checkpoint ready to predict: letterbox -> model -> NMS -> masks (pyseg.ops.assemble_masks) -> original size."""

    def __init__(
        self,
        weights: str | Path,
        imgsz: int | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        device: str = "",
    ):
        from pyseg.engine.trainer import select_device
        from pyseg.val import load_model

        self.device = select_device(device)
        self.model, cfg, self.names = load_model(weights, self.device)
        self.imgsz = imgsz or cfg.imgsz
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32, got {self.imgsz}")
        self.conf, self.iou, self.max_det = conf, iou, max_det

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> Prediction:
        """image: BGR uint8 (H, W, 3), as pyseg.data.images.read_image (or a video frame from cv2) gives it."""
        from pyseg.engine.predict import detect, masks_in_input, to_original

        if image is None or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("predict needs a BGR uint8 image of shape (H, W, 3)")
        h, w = image.shape[:2]
        matrix, ratio_pad = letterbox(h, w, self.imgsz)
        letterboxed = np.full((self.imgsz, self.imgsz, 3), PAD_VALUE, np.uint8)
        warp_into(letterboxed, image, matrix)
        tensor = torch.from_numpy(np.ascontiguousarray(letterboxed[:, :, ::-1].transpose(2, 0, 1)))
        images = tensor[None].to(self.device).float().div_(255.0)
        outputs = self.model(images)
        det = detect(outputs, self.model.strides, self.model.reg_max, self.conf, self.iou, self.max_det)[0]
        masks = masks_in_input(outputs.protos.float(), [det], (self.imgsz, self.imgsz))[0]
        boxes, full_masks = to_original(det.boxes, masks, ratio_pad, (h, w))
        return Prediction(boxes, det.scores.float().cpu().numpy(), det.classes.cpu().numpy().astype(int), full_masks)


def draw(image: np.ndarray, prediction: Prediction, names: list[str]) -> np.ndarray:
    """A copy of image with masks (translucent), boxes and 'name score' labels drawn."""
    from pyseg.engine.plots import draw_instances

    return draw_instances(image, prediction.boxes, prediction.classes, prediction.masks, names, prediction.scores)


def coco_results(image_id: str, prediction: Prediction) -> list[dict]:
    from pyseg.engine.coco_eval import encode_masks

    rles = encode_masks(prediction.masks) if len(prediction.masks) else []
    return [
        {
            "image_id": image_id,
            "category_id": int(c) + 1,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
            "segmentation": rle,
        }
        for b, s, c, rle in zip(prediction.boxes, prediction.scores, prediction.classes, rles, strict=True)
    ]


def _read_or_none(path: Path) -> np.ndarray | None:
    try:
        return read_image(path)
    except ImageReadError:
        return None


def sources(source: Path):
    """(name, BGR frame) pairs from an image, a folder of images or a video; the frame is None when an image
    cannot be read. Images are read as training reads them (pyseg.data.images.read_image)."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            yield path.name, _read_or_none(path)
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(source))
        if not capture.isOpened():
            raise ValueError(f"cannot open video {source}")
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield f"{source.stem}_{index:06d}.jpg", frame
            index += 1
        capture.release()
    elif source.is_file():
        yield source.name, _read_or_none(source)
    else:
        raise FileNotFoundError(f"--source {source}: no such image, folder or video")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyseg.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--source", required=True, help="an image, a folder of images or a video")
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--device", default="")
    parser.add_argument("--out", default="runs/predict", help="folder for drawn images and predictions.json")
    args = parser.parse_args(argv)
    try:
        predictor = Predictor(args.weights, args.imgsz, args.conf, args.iou, device=args.device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results, count = [], 0
        for name, frame in sources(Path(args.source)):
            if frame is None:
                print(f"pyseg.predict: cannot read {name}; skipped", file=sys.stderr)
                continue
            prediction = predictor.predict(frame)
            cv2.imwrite(str(out / Path(name).with_suffix(".jpg")), draw(frame, prediction, predictor.names))
            results += coco_results(name, prediction)
            count += 1
    except (ValueError, FileNotFoundError) as error:
        print(f"pyseg.predict: {error}", file=sys.stderr)
        return 2
    (out / "predictions.json").write_text(json.dumps(results))
    print(f"{count} images, {len(results)} instances -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
