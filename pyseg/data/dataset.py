"""SegDataset: verified YOLO segmentation labels -> augmented samples of uint8 images and flat polygons."""

from __future__ import annotations

from collections import OrderedDict

import cv2
import numpy as np
import torch

from pyseg.config import TrainConfig
from pyseg.data import augment
from pyseg.data.augment import PAD_VALUE, Instances
from pyseg.data.images import read_image
from pyseg.data.labels import ImageLabels


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
        augment_config: TrainConfig | None = None,
        *,
        epochs: int = 1,
        seed: int = 0,
        cache_images: bool = False,
        buffer_mb: float = 0.0,
    ):
        if not images:
            raise ValueError("SegDataset needs at least one image")
        self.images = images
        self.imgsz = int(imgsz)
        self.hyp = augment_config  # its augmentation keys (hsv_h ... close_mosaic); None: validation (letterbox only)
        self.epochs = epochs
        self.seed = seed
        self._cache: dict[int, np.ndarray] | None = None
        self.buffer_bytes = int(buffer_mb * 2**20)
        self._buffer: OrderedDict[int, np.ndarray] = OrderedDict()  # recently decoded images, least recent first
        self._buffered_bytes = 0
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if cache_images:
            self._cache = {i: self._read(i) for i in range(len(images))}
            for image in self._cache.values():
                image.flags.writeable = False  # augmentation must never write into a cached image

    def __len__(self) -> int:
        return len(self.images)

    # ---------------------------------------------------------------- loading

    def _read(self, index: int) -> np.ndarray:
        """BGR uint8 image (read_image: oriented, 3 channels), a large JPEG decoded at a reduced size."""
        item = self.images[index]
        return read_image(item.image, fit_px=self.imgsz, known_size=(item.height, item.width))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # a spawned worker starts with an empty buffer, not a pickled copy
        state.update(_buffer=OrderedDict(), _buffered_bytes=0)
        return state

    def image(self, index: int) -> np.ndarray:
        """Decoded image (BGR uint8, read-only): from the RAM cache, the buffer of recent images, or the file.

        The buffer (buffer_mb per process, least recently used out first) keeps every image of a small dataset
        decoded after one epoch; on a larger one it saves about (images it holds / dataset size) of the decodes.
        """
        if self._cache is not None:
            return self._cache[index]
        image = self._buffer.get(index)
        if image is not None:
            self._buffer.move_to_end(index)
            return image
        image = self._read(index)
        if 0 < image.nbytes <= self.buffer_bytes:
            image.flags.writeable = False  # shared by later samples: augmentation must never write into it
            self._buffer[index] = image
            self._buffered_bytes += image.nbytes
            while self._buffered_bytes > self.buffer_bytes:
                self._buffered_bytes -= self._buffer.popitem(last=False)[1].nbytes
        return image

    def _instance_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points float32 [V, 2] normalized, lengths int64 [n], has_mask bool [n]) of an image, built once."""
        arrays = self._arrays.get(index)
        if arrays is None:
            item = self.images[index]
            polygons, has_mask = [], []
            for poly, (x0, y0, x1, y1) in zip(item.polygons, item.boxes, strict=True):
                has_mask.append(len(poly) > 0)
                polygons.append(poly if len(poly) else np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
            flat = Instances.from_polygons(item.classes, polygons, has_mask)
            arrays = self._arrays[index] = (flat.points, flat.lengths, flat.has_mask)
        return arrays

    def load(self, index: int) -> tuple[np.ndarray, Instances]:
        """Image (BGR uint8, as decoded) and its instances in that image's pixels."""
        image = self.image(index)
        h, w = image.shape[:2]
        points, lengths, has_mask = self._instance_arrays(index)
        classes = self.images[index].classes
        return image, Instances(classes, points * np.array([w, h], np.float32), lengths, has_mask)

    # ---------------------------------------------------------------- geometry

    def _random_affine(self, rng: np.random.Generator) -> np.ndarray:
        hyp = self.hyp
        return augment.random_affine(rng, self.imgsz, hyp.degrees, hyp.translate, hyp.scale, hyp.shear, hyp.perspective)

    def _single(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, Instances]:
        image, instances = self.load(index)
        h, w = image.shape[:2]
        matrix, _ = augment.letterbox(h, w, self.imgsz)
        if rng is not None:  # random affine about the output centre
            matrix = self._random_affine(rng) @ augment.translation(-self.imgsz / 2, -self.imgsz / 2) @ matrix
        out = np.full((self.imgsz, self.imgsz, 3), PAD_VALUE, np.uint8)
        # Validation letterboxes exactly (its ratio_pad maps predictions back); training may snap to whole pixels.
        drawn = augment.warp_into(out, image, matrix, snap=rng is not None)
        if drawn is None:
            return out, Instances.empty()
        matrix, visible = drawn
        return out, augment.transform_instances(instances, matrix, visible, out.shape[:2])

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
        """Four images around a random centre of a 2S x 2S canvas, each warped once into the S x S output."""
        s = self.imgsz
        indices = [index, *rng.integers(0, len(self), 3).tolist()]
        xc, yc = rng.uniform(0.5 * s, 1.5 * s, 2)
        canvas_to_out = self._random_affine(rng) @ augment.translation(-s, -s)
        out = np.full((s, s, 3), PAD_VALUE, np.uint8)
        parts = []
        for quadrant, i in enumerate(indices):
            item = self.images[i]
            r = s / max(item.height, item.width)
            tw, th = item.width * r, item.height * r
            left = xc - tw if quadrant in (0, 2) else xc
            top = yc - th if quadrant in (0, 1) else yc
            if not self._lands_in_output(canvas_to_out, left, top, tw, th):
                continue  # about 1 tile in 10 falls outside the output: not even decoded
            image, instances = self.load(i)
            h, w = image.shape[:2]
            r = s / max(h, w)
            # The tile's part on the canvas [0, 2S]^2, in the tile's own pixels.
            u0, v0 = max(0.0, -left) / r, max(0.0, -top) / r
            u1, v1 = min(w, (2 * s - left) / r), min(h, (2 * s - top) / r)
            if u1 <= u0 or v1 <= v0:
                continue
            matrix = canvas_to_out @ augment.translation(left, top) @ augment.scaling(r)
            drawn = augment.warp_into(out, image, matrix, (u0, v0, u1, v1), snap=True)
            if drawn is not None:
                parts.append(augment.transform_instances(instances, *drawn, (s, s)))
        return out, Instances.concat(parts)

    def _lands_in_output(self, canvas_to_out: np.ndarray, left: float, top: float, width: float, height: float) -> bool:
        """Whether a tile at (left, top, width, height) on the 2S canvas reaches the S x S output (conservative)."""
        s = self.imgsz
        x0, y0, x1, y1 = max(left, 0.0), max(top, 0.0), min(left + width, 2.0 * s), min(top + height, 2.0 * s)
        if x1 <= x0 or y1 <= y0:
            return False
        corners = augment.transform_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), canvas_to_out)
        # A pixel of slack: a tile decoded at a reduced size may differ from item's size by a rounding.
        return bool((corners.max(0) > -1).all() and (corners.min(0) < s + 1).all())

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
        vertices, offsets = torch.from_numpy(pasted.points), torch.from_numpy(pasted.offsets())
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
        return self._single(index, rng)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        item = self.images[index]
        ratio_pad = None
        if self.hyp is None:
            image, instances = self._single(index, None)
            ratio_pad = augment.letterbox(item.height, item.width, self.imgsz)[1]  # of the file's own pixels
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
        rgb = np.stack(cv2.split(image)[::-1])  # BGR [S, S, 3] -> RGB [3, S, S]; 3x faster than a strided copy
        return {
            "image": torch.from_numpy(rgb),
            "vertices": torch.from_numpy(np.ascontiguousarray(instances.points, dtype=np.float32)),
            "poly_offsets": torch.from_numpy(instances.offsets()),
            "classes": torch.from_numpy(instances.classes.astype(np.int64)),
            "boxes": torch.from_numpy(instances.boxes()),
            "has_mask": torch.from_numpy(instances.has_mask.astype(bool)),
            "path": item.image,
            "orig_size": (item.height, item.width),
            "ratio_pad": ratio_pad,
        }
