"""Pictures of a run: a training batch with its masks, validation predictions next to their labels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from pyseg.data.loader import polygon_masks


def _palette(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(64, 255, (max(n, 1), 3))


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray,
    names: list[str],
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """BGR image with translucent masks (n, H, W) bool, boxes (n, 4) and labels drawn."""
    out = image.copy()
    colours = _palette(len(names))
    for mask, cls in zip(masks, classes, strict=True):
        out[mask] = (out[mask] * 0.45 + colours[int(cls) % len(colours)] * 0.55).astype(np.uint8)
    for i, (box, cls) in enumerate(zip(boxes, classes, strict=True)):
        colour = tuple(int(c) for c in colours[int(cls) % len(colours)])
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, 1)
        text = names[int(cls)] if int(cls) < len(names) else str(int(cls))
        if scores is not None:
            text += f" {scores[i]:.2f}"
        cv2.putText(out, text, (x0, max(y0 - 3, 9)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    return out


def _tile(images: list[np.ndarray], columns: int) -> np.ndarray:
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return grid


def batch_masks_full(batch: dict) -> torch.Tensor:
    """Per-instance masks (N, S, S) bool at the input size, rasterized from the batch's polygons."""
    return polygon_masks(batch, 1, overlap=False)["masks"].bool()


def plot_batch(batch: dict, names: list[str], path: Path, max_images: int = 16) -> None:
    """A grid of the batch's (augmented) images with their ground-truth masks and boxes."""
    masks = batch_masks_full(batch).numpy()
    images = []
    for i in range(min(batch["images"].shape[0], max_images)):
        sel = (batch["image_index"] == i).numpy()
        image = np.ascontiguousarray(batch["images"][i].permute(1, 2, 0).numpy()[:, :, ::-1])
        images.append(
            draw_instances(image, batch["boxes"][sel].numpy(), batch["classes"][sel].numpy(), masks[sel], names)
        )
    cv2.imwrite(str(path), _tile(images, min(4, len(images))))


@torch.no_grad()
def plot_predictions(model, batch: dict, names: list[str], path: Path, conf: float = 0.25, max_images: int = 8) -> None:
    """Each validation image twice: labels (left) and the model's predictions (right)."""
    from pyseg.engine.predict import detect, masks_in_input

    device = next(model.parameters()).device
    images = batch["images"][:max_images]
    outputs = model(images.to(device).float() / 255.0)
    detections = detect(outputs, model.strides, model.reg_max, conf, 0.7, 100)
    predicted = masks_in_input(outputs.protos.float(), detections, tuple(images.shape[2:]))
    gt_masks = batch_masks_full(batch).numpy()
    pairs = []
    for i in range(images.shape[0]):
        sel = (batch["image_index"] == i).numpy()
        image = np.ascontiguousarray(images[i].permute(1, 2, 0).numpy()[:, :, ::-1])
        pairs.append(
            draw_instances(image, batch["boxes"][sel].numpy(), batch["classes"][sel].numpy(), gt_masks[sel], names)
        )
        det = detections[i]
        pairs.append(
            draw_instances(
                image,
                det.boxes.cpu().numpy(),
                det.classes.cpu().numpy(),
                predicted[i].cpu().numpy(),
                names,
                det.scores.cpu().numpy(),
            )
        )
    cv2.imwrite(str(path), _tile(pairs, 4))


def plot_results(csv_path: Path) -> None:
    """results.png beside results.csv: one panel per column over the epochs (blank cells skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("epoch",)]
    columns = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / columns), columns, figsize=(16, 3 * math.ceil(len(keys) / columns)))
    epochs = [int(r["epoch"]) for r in rows]
    for ax, key in zip(np.ravel(axes), keys, strict=False):
        points = [(e, float(r[key])) for e, r in zip(epochs, rows, strict=True) if r.get(key) not in ("", None)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key, fontsize=9)
        # a few ticks, whole epochs: matplotlib's default ticks took half of a drawing's second of CPU
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
    for ax in np.ravel(axes)[len(keys) :]:
        ax.axis("off")
    # fixed margins: tight_layout measured every label of the 20-odd panels, 0.6 s of CPU per drawing
    rows_of_panels = math.ceil(len(keys) / columns)
    height = 3 * rows_of_panels  # inches
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.3 / height, top=1 - 0.35 / height, wspace=0.3, hspace=0.45)
    fig.savefig(csv_path.with_suffix(".png"), dpi=100)
    plt.close(fig)
