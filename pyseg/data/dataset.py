"""SegDataset: verified YOLO segmentation labels -> augmented samples of uint8 images and flat polygons."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pyseg.data import augment
from pyseg.data.augment import PAD_VALUE, Instances
from pyseg.data.labels import ImageLabels


@dataclass
class AugmentConfig:
    """Augmentation hyperparameters (names as the tuner searches them); probabilities in [0, 1]."""

    hsv_h: float = 0.015  # hue gain, fraction of the hue circle
    hsv_s: float = 0.7  # saturation gain
    hsv_v: float = 0.4  # value gain
    degrees: float = 0.0  # rotation, +/- degrees
    translate: float = 0.1  # translation, +/- fraction of the image size
    scale: float = 0.5  # scale gain, +/- fraction
    shear: float = 0.0  # shear, +/- degrees
    perspective: float = 0.0  # perspective, +/- fraction (0..0.001 is sensible)
    flipud: float = 0.0  # probability of an up-down flip
    fliplr: float = 0.5  # probability of a left-right flip
    mosaic: float = 1.0  # probability of a 4-image mosaic
    mixup: float = 0.0  # probability of blending with a second sample
    copy_paste: float = 0.0  # probability, per instance, of pasting its mirrored copy
    close_mosaic: int = 10  # turn mosaic off for the last N epochs


class SegDataset(torch.utils.data.Dataset):
    """Samples of a verified split.

    A sample is a dict: image (Tensor[3, S, S] uint8, RGB), vertices (Tensor[V, 2] float32, output pixels),
    poly_offsets (Tensor[n + 1] int64), classes (Tensor[n] int64), boxes (Tensor[n, 4] float32 xyxy pixels),
    has_mask (Tensor[n] bool, False for box-only instances), path (str), orig_size ((h, w) of the file),
    ratio_pad ((r, pad_x, pad_y): original pixel = (output pixel - pad) / r; letterboxed samples only).

    Indices may be ints or (index, epoch) pairs (EpochSampler): each sample's randomness comes from
    (seed, epoch, index), so it does not depend on the loader's workers.
    """

    def __init__(
        self,
        images: list[ImageLabels],
        imgsz: int = 640,
        augment_config: AugmentConfig | None = None,
        *,
        epochs: int = 1,
        seed: int = 0,
        cache_images: bool = False,
    ):
        if not images:
            raise ValueError("SegDataset needs at least one image")
        self.images = images
        self.imgsz = int(imgsz)
        self.hyp = augment_config  # None: validation (letterbox only)
        self.epochs = epochs
        self.seed = seed
        self._cache: dict[int, np.ndarray] | None = None
        if cache_images:
            self._cache = {i: self._read(i) for i in range(len(images))}

    def __len__(self) -> int:
        return len(self.images)

    # ---------------------------------------------------------------- loading

    def _read(self, index: int) -> np.ndarray:
        """BGR uint8 image, decoded at a reduced size (power of two) when much larger than needed."""
        item = self.images[index]
        flag = cv2.IMREAD_COLOR
        shrink = max(item.height, item.width) / self.imgsz
        if item.image.lower().endswith((".jpg", ".jpeg")):
            for factor, reduced in (
                (8, cv2.IMREAD_REDUCED_COLOR_8),
                (4, cv2.IMREAD_REDUCED_COLOR_4),
                (2, cv2.IMREAD_REDUCED_COLOR_2),
            ):
                if shrink >= factor:
                    flag = reduced
                    break
        image = cv2.imread(item.image, flag)
        if image is None:
            raise OSError(f"cannot read image {item.image} (it verified earlier: was it changed or removed?)")
        return image

    def load(self, index: int) -> tuple[np.ndarray, Instances]:
        """Image (BGR uint8, as decoded) and its instances in that image's pixels."""
        image = self._cache[index] if self._cache is not None else self._read(index)
        h, w = image.shape[:2]
        item = self.images[index]
        scale = np.array([w, h], np.float32)
        polygons, has_mask = [], []
        for poly, box in zip(item.polygons, item.boxes, strict=True):
            if len(poly):
                polygons.append(poly * scale)
                has_mask.append(True)
            else:
                x0, y0, x1, y1 = box
                polygons.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32) * scale)
                has_mask.append(False)
        return image, Instances(item.classes.copy(), polygons, np.asarray(has_mask, bool))

    # ---------------------------------------------------------------- geometry

    def _letterbox(self, h: int, w: int) -> np.ndarray:
        """3x3: an h x w image scaled to fit imgsz, centred on the square output."""
        r = self.imgsz / max(h, w)
        return augment.translation((self.imgsz - w * r) / 2, (self.imgsz - h * r) / 2) @ augment.scaling(r)

    def _random_affine(self, rng: np.random.Generator) -> np.ndarray:
        hyp = self.hyp
        return augment.random_affine(rng, self.imgsz, hyp.degrees, hyp.translate, hyp.scale, hyp.shear, hyp.perspective)

    def _single(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, Instances, np.ndarray]:
        image, instances = self.load(index)
        h, w = image.shape[:2]
        matrix = self._letterbox(h, w)
        if rng is not None:  # random affine about the output centre
            matrix = self._random_affine(rng) @ augment.translation(-self.imgsz / 2, -self.imgsz / 2) @ matrix
        out = np.full((self.imgsz, self.imgsz, 3), PAD_VALUE, np.uint8)
        augment.warp_into(out, image, matrix)
        visible = (0.0, 0.0, float(w), float(h))
        return out, augment.transform_instances(instances, matrix, visible, out.shape[:2]), matrix

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
        """Four images around a random centre of a 2S x 2S canvas, each warped once into the S x S output."""
        s = self.imgsz
        indices = [index, *rng.integers(0, len(self), 3).tolist()]
        xc, yc = rng.uniform(0.5 * s, 1.5 * s, 2)
        canvas_to_out = self._random_affine(rng) @ augment.translation(-s, -s)
        out = np.full((s, s, 3), PAD_VALUE, np.uint8)
        parts = []
        for quadrant, i in enumerate(indices):
            image, instances = self.load(i)
            h, w = image.shape[:2]
            r = s / max(h, w)
            tw, th = w * r, h * r
            left = xc - tw if quadrant in (0, 2) else xc
            top = yc - th if quadrant in (0, 1) else yc
            # The tile's part on the canvas [0, 2S]^2, in the tile's own pixels.
            u0, v0 = max(0.0, -left) / r, max(0.0, -top) / r
            u1, v1 = min(w, (2 * s - left) / r), min(h, (2 * s - top) / r)
            if u1 <= u0 or v1 <= v0:
                continue
            matrix = canvas_to_out @ augment.translation(left, top) @ augment.scaling(r)
            x0, y0 = int(np.floor(u0)), int(np.floor(v0))
            crop = image[y0 : int(np.ceil(v1)), x0 : int(np.ceil(u1))]
            augment.warp_into(out, crop, matrix @ augment.translation(x0, y0))
            parts.append(augment.transform_instances(instances, matrix, (u0, v0, u1, v1), (s, s)))
        return out, Instances.concat(parts)

    def _copy_paste(self, image: np.ndarray, instances: Instances, rng: np.random.Generator) -> Instances:
        """Pastes mirrored copies of instances where they cover < 30% of any existing box."""
        from pyseg.ops import rasterize_polygons

        candidates = [j for j in range(len(instances)) if instances.has_mask[j] and rng.random() < self.hyp.copy_paste]
        if not candidates:
            return instances
        mirrored = augment.flip_instances(
            instances.select(np.isin(np.arange(len(instances)), candidates)), image.shape[1], 0
        )
        boxes = instances.boxes()
        keep = augment.box_ioa(mirrored.boxes(), boxes).max(1, initial=0) < 0.30
        pasted = mirrored.select(keep)
        if not len(pasted):
            return instances
        vertices = torch.from_numpy(np.concatenate(pasted.polygons))
        offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(p) for p in pasted.polygons])]), dtype=torch.int64)
        masks = rasterize_polygons(vertices, offsets, torch.zeros(len(pasted), dtype=torch.int64), 1, *image.shape[:2])
        region = masks[0].numpy().astype(bool)
        image[region] = cv2.flip(image, 1)[region]
        return Instances.concat([instances, pasted])

    # ---------------------------------------------------------------- samples

    def mosaic_active(self, epoch: int) -> bool:
        return self.hyp is not None and self.hyp.mosaic > 0 and epoch < self.epochs - self.hyp.close_mosaic

    def _augmented(self, index: int, epoch: int, rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
        if self.mosaic_active(epoch) and rng.random() < self.hyp.mosaic:
            return self._mosaic(index, rng)
        image, instances, _ = self._single(index, rng)
        return image, instances

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.images[index]
        ratio_pad = None
        if self.hyp is None:
            image, instances, _ = self._single(index, None)
            r = self.imgsz / max(item.height, item.width)
            ratio_pad = (r, (self.imgsz - item.width * r) / 2, (self.imgsz - item.height * r) / 2)
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            image, instances = self._augmented(index, epoch, rng)
            if self.hyp.mixup > 0 and rng.random() < self.hyp.mixup:
                other, other_instances = self._augmented(int(rng.integers(len(self))), epoch, rng)
                weight = rng.beta(32.0, 32.0)
                image = cv2.addWeighted(image, weight, other, 1 - weight, 0.0)
                instances = Instances.concat([instances, other_instances])
            if self.hyp.copy_paste > 0:
                instances = self._copy_paste(image, instances, rng)
            augment.hsv_jitter(image, rng, self.hyp.hsv_h, self.hyp.hsv_s, self.hyp.hsv_v)
            if rng.random() < self.hyp.fliplr:
                image = cv2.flip(image, 1)
                instances = augment.flip_instances(instances, self.imgsz, 0)
            if rng.random() < self.hyp.flipud:
                image = cv2.flip(image, 0)
                instances = augment.flip_instances(instances, self.imgsz, 1)
        return self._to_sample(image, instances, item, ratio_pad)

    @staticmethod
    def _to_sample(image: np.ndarray, instances: Instances, item: ImageLabels, ratio_pad) -> dict:
        lengths = [len(p) for p in instances.polygons]
        vertices = np.concatenate(instances.polygons) if lengths else np.zeros((0, 2), np.float32)
        rgb = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
        return {
            "image": torch.from_numpy(rgb),
            "vertices": torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)),
            "poly_offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
            "classes": torch.from_numpy(instances.classes.astype(np.int64)),
            "boxes": torch.from_numpy(instances.boxes()),
            "has_mask": torch.from_numpy(instances.has_mask.astype(bool)),
            "path": item.image,
            "orig_size": (item.height, item.width),
            "ratio_pad": ratio_pad,
        }
