"""python -m pyseg.predict: instance masks for images, folders or videos, drawn and as COCO-results JSON.

    python -m pyseg.predict --weights runs/train/weights/best.pt --source path/to/image_or_folder_or_video
        [--imgsz 640] [--conf 0.25] [--iou 0.7] [--device cpu] [--project runs --name predict]

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

from pyseg.config import check_value
from pyseg.data.augment import PAD_VALUE, letterbox, warp_into
from pyseg.data.images import IMAGE_SUFFIXES, ImageReadError, read_image
from pyseg.engine.output_folders import add_output_arguments, output_dir, output_folder
from pyseg.errors import CommandParser, ConfigError, UserError, run_command
from pyseg.files import atomic_write_text

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
        from pyseg.engine.device import select_device
        from pyseg.models.weights import load_model

        for key, value in (("conf", conf), ("iou", iou), ("max_det", max_det), ("imgsz", imgsz)):
            if value is not None:
                check_value(key, value)
        self.device = select_device(device)
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.exported = None  # an ONNX file from pyseg.export, run by onnxruntime
        if Path(weights).suffix.lower() == ".torchscript":
            raise ConfigError(
                f"--weights {weights}: predict runs pyseg checkpoints (.pt) and ONNX files from pyseg.export; a "
                "TorchScript file runs with torch.jit.load (see the README's Export section), or export --format onnx"
            )
        if Path(weights).suffix.lower() == ".onnx":
            from pyseg.engine.exported import OnnxModel

            if not Path(weights).expanduser().is_file():
                raise ConfigError(f"--weights {weights}: no such file")
            self.exported = OnnxModel(Path(weights).expanduser(), self.device)
            self.model, self.names = None, self.exported.names
            if imgsz and imgsz != self.exported.imgsz and not self.exported.dynamic:
                raise ConfigError(
                    f"--imgsz {imgsz}: {weights} was exported for {self.exported.imgsz} px only; leave out --imgsz, "
                    "or export again with --dynamic"
                )
            self.imgsz = imgsz or self.exported.imgsz
            fixed = self.exported.thresholds
            if self.exported.end2end and (conf < fixed["conf"] or iou != fixed["iou"]):
                print(
                    f"note: {weights} holds its NMS (exported with --conf {fixed['conf']} --iou {fixed['iou']}): "
                    "detections below its --conf are not in it, and its --iou applies",
                    file=sys.stderr,
                )
            return
        self.model, cfg, self.names = load_model(weights, self.device)
        self.imgsz = imgsz or cfg.imgsz

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
        if self.exported is not None:
            det, masks = self.exported_detections(images)
        else:
            outputs = self.model(images)
            det = detect(outputs, self.model.strides, self.model.reg_max, self.conf, self.iou, self.max_det)[0]
            masks = masks_in_input(outputs.protos.float(), [det], (self.imgsz, self.imgsz))[0]
        boxes, full_masks = to_original(det.boxes, masks, ratio_pad, (h, w))
        return Prediction(boxes, det.scores.float().cpu().numpy(), det.classes.cpu().numpy().astype(int), full_masks)

    def exported_detections(self, images: torch.Tensor):
        """(Detections, masks (n, H, W) bool at the input size) of one letterboxed image from the ONNX file: raw
        outputs go through pyseg's own NMS and mask assembly, an end-to-end file's own are kept above --conf."""
        from pyseg.engine.predict import Detections, masks_in_input, select_detections

        outputs = self.exported.run(images)
        if self.exported.end2end:
            boxes, scores, classes, masks = outputs
            keep = scores.float() > self.conf
            coeffs = torch.zeros((int(keep.sum()), 0), device=boxes.device)
            det = Detections(boxes.float()[keep], scores.float()[keep], classes.long()[keep], coeffs)
            return det, masks[keep].bool()
        boxes, scores, coeffs, protos = outputs
        det = select_detections(boxes, scores, coeffs, self.conf, self.iou, self.max_det)[0]
        return det, masks_in_input(protos.float(), [det], (self.imgsz, self.imgsz))[0]


def draw(image: np.ndarray, prediction: Prediction, names: list[str]) -> np.ndarray:
    """A copy of image with masks (translucent), boxes and 'name score' labels drawn."""
    from pyseg.engine.plots import draw_instances

    return draw_instances(image, prediction.boxes, prediction.classes, prediction.masks, names, prediction.scores)


def coco_results(image_id: str, prediction: Prediction, names: list[str] | None = None) -> list[dict]:
    """COCO results rows of one image (category_id = class index + 1), with the class's name as category_name
    when names are given."""
    from pyseg.engine.coco_eval import encode_masks

    rles = encode_masks(prediction.masks) if len(prediction.masks) else []
    rows = [
        {
            "image_id": image_id,
            "category_id": int(c) + 1,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
            "segmentation": rle,
        }
        for b, s, c, rle in zip(prediction.boxes, prediction.scores, prediction.classes, rles, strict=True)
    ]
    if names is not None:
        for row in rows:
            row["category_name"] = names[row["category_id"] - 1]
    return rows


def _read_or_none(path: Path) -> np.ndarray | None:
    try:
        return read_image(path)
    except ImageReadError:
        return None


def image_files(folder: Path) -> list[Path]:
    """Every image file under folder (IMAGE_SUFFIXES, any depth), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def sources(source: Path):
    """(name, BGR frame) pairs from an image, a folder of images or a video; the frame is None when an image
    cannot be read. Images are read as training reads them (pyseg.data.images.read_image).

    name is the image's path relative to the folder ('sub/a.jpg', unique even where two subfolders hold an
    a.jpg), the file name of a single image, or 'VIDEO_000123.jpg' for frame 123 of a video.
    """
    if source.is_dir():
        for path in image_files(source):
            yield path.relative_to(source).as_posix(), _read_or_none(path)
    elif source.suffix.lower() in VIDEO_SUFFIXES:
        capture = cv2.VideoCapture(str(source))
        if not capture.isOpened():
            raise UserError(f"--source {source}: cannot open the video (a codec OpenCV lacks, or not a video)")
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
        raise ConfigError(f"--source {source}: no such image, folder or video")


def check_source(source: Path) -> None:
    """A user error for a --source that is missing, a folder without images, or a file of another kind."""
    if not source.exists():
        raise ConfigError(f"--source {source}: no such image, folder or video")
    if source.is_dir() and not image_files(source):
        suffixes = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        raise ConfigError(f"--source {source}: the folder holds no images ({suffixes}); point it at images")
    if source.is_file() and source.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        kinds = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        raise ConfigError(f"--source {source}: not an image or video file ({kinds})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser("python -m pyseg.predict", __doc__)
    parser.add_argument(
        "--weights",
        required=True,
        help="a pyseg checkpoint (runs/NAME/weights/best.pt), an Ultralytics YOLO11/YOLOv8-seg .pt, or an ONNX "
        "file from pyseg.export (run by onnxruntime)",
    )
    parser.add_argument("--source", required=True, help="an image, a folder of images or a video")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the checkpoint's)")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    parser.add_argument("--device", default="")
    add_output_arguments(parser, "predict")
    parser.add_argument("--out", default=None, help="output folder instead of PROJECT/NAME")
    return parser.parse_args(argv)


def predict_command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else output_dir(args)
    source = Path(args.source)
    check_source(source)
    predictor = Predictor(args.weights, args.imgsz, args.conf, args.iou, device=args.device)
    results, count, unreadable = [], 0, 0
    with output_folder(out, "--out" if args.out else "--project/--name"):
        for name, frame in sources(source):
            if frame is None:
                where = source / name if source.is_dir() else source
                print(f"pyseg.predict: cannot read {where}; skipped", file=sys.stderr)
                unreadable += 1
                continue
            prediction = predictor.predict(frame)
            drawn = out / name
            drawn.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(drawn), draw(frame, prediction, predictor.names))
            results += coco_results(name, prediction, predictor.names)
            count += 1
        if count == 0:
            raise UserError(f"--source {source}: no image could be read ({unreadable} unreadable); nothing written")
        atomic_write_text(out / "predictions.json", json.dumps(results))
    print(f"{count} images, {len(results)} instances -> {out}" + (f" ({unreadable} unreadable)" if unreadable else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line for a user error."""
    return run_command("pyseg.predict", predict_command, argv)


if __name__ == "__main__":
    sys.exit(main())
