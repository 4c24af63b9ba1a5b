"""Batches: collate samples into flat polygon batches (masks made by pyseg.ops), samplers and the DataLoader."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pyseg.ops import rasterize_polygons, rasterize_polygons_overlap

MASK_RATIO = 4  # ground-truth masks at imgsz / 4: the model's prototypes have stride 4, so this is its only value


def polygon_masks(batch: dict, mask_ratio: int, overlap: bool) -> dict:
    """Ground-truth masks at mask resolution (S / mask_ratio), rasterized straight from the batch's polygons.

    overlap: {"masks": Tensor[B, h, w] int32 index map (k = the image's k-th instance), "mask_areas": int64 [N]}
    else:    {"masks": Tensor[N, h, w] uint8 per-instance masks}
    Works on the device of batch["vertices"] (call it after moving the batch to the GPU).
    """
    _, _, height, width = batch["images"].shape
    h, w = height // mask_ratio, width // mask_ratio
    vertices = batch["vertices"] / mask_ratio
    num = batch["classes"].shape[0]
    owner = torch.arange(num, device=vertices.device)
    offsets, has_mask = batch["poly_offsets"], batch["has_mask"]
    # Box-only instances get an empty mask: their vertices collapse onto (0, 0), a polygon that covers no
    # pixel centre. (Computed for every batch: output_size is known, so there is no host sync on a GPU.)
    keep = torch.repeat_interleave(has_mask, offsets[1:] - offsets[:-1], output_size=vertices.shape[0])
    vertices = vertices * keep[:, None]
    if overlap:
        index_map, areas = rasterize_polygons_overlap(
            vertices, offsets, owner, batch["image_index"], batch["images"].shape[0], h, w
        )
        return {"masks": index_map, "mask_areas": areas}
    return {"masks": rasterize_polygons(vertices, offsets, owner, num, h, w)}


def _stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, straight into shared memory inside a loader worker (saves the copy the queue would make)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new(storage).view(first.dtype)[: len(tensors) * first.numel()].view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class SegCollate:
    """Concatenates samples into one batch; makes masks here unless make_masks is False (GPU training).

    Batch: images uint8 [B, 3, S, S], vertices float32 [V, 2] px, poly_offsets int64 [N + 1], classes int64 [N],
    boxes float32 [N, 4] xyxy px, has_mask bool [N], image_index int64 [N], max_instances (int: the most instances
    of one image, known here so that the loss need not ask the GPU), paths, orig_sizes, ratio_pads, and masks (see
    polygon_masks) when made.
    """

    def __init__(self, mask_ratio: int = MASK_RATIO, overlap_mask: bool = True, make_masks: bool = True):
        self.mask_ratio, self.overlap_mask, self.make_masks = mask_ratio, overlap_mask, make_masks

    def __call__(self, samples: list[dict]) -> dict:
        counts = [s["classes"].shape[0] for s in samples]
        vertex_counts = torch.tensor([s["vertices"].shape[0] for s in samples])
        vertex_base = torch.cat([torch.zeros(1, dtype=torch.int64), vertex_counts.cumsum(0)[:-1]])
        offsets = [s["poly_offsets"][:-1] + base for s, base in zip(samples, vertex_base.tolist(), strict=True)]
        batch = {
            "images": _stack_shared([s["image"] for s in samples]),
            "vertices": torch.cat([s["vertices"] for s in samples]),
            "poly_offsets": torch.cat([*offsets, vertex_counts.sum().reshape(1)]),
            "classes": torch.cat([s["classes"] for s in samples]),
            "boxes": torch.cat([s["boxes"] for s in samples]),
            "has_mask": torch.cat([s["has_mask"] for s in samples]),
            "image_index": torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
            "max_instances": max(counts, default=0),
            "paths": [s["path"] for s in samples],
            "orig_sizes": [s["orig_size"] for s in samples],
            "ratio_pads": [s["ratio_pad"] for s in samples],
        }
        if self.make_masks:
            batch.update(polygon_masks(batch, self.mask_ratio, self.overlap_mask))
        return batch


class EpochSampler(Sampler):
    """Yields (index, epoch) pairs, so that samples draw their randomness from the epoch even in persistent workers.

    Shuffles with (seed, epoch); with world_size > 1, rank r takes every world_size-th index of the shuffled order
    (the dataset padded by repetition to a multiple of world_size, as DistributedSampler does).
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size = {world_size}), got {rank}")
        self.size, self.shuffle, self.seed, self.rank, self.world_size = size, shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def pairs(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's (index, epoch) pairs of an epoch, in order."""
        order = np.arange(self.size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        total = len(self) * self.world_size
        order = np.concatenate([order, order[: total - self.size]]) if total > self.size else order
        return [(index, epoch) for index in order[self.rank :: self.world_size].tolist()]

    def __iter__(self):
        return iter(self.pairs(self.epoch))


class EpochBatches(Sampler):
    """Batches of an EpochSampler for epochs start_epoch, start_epoch + 1, ... without end: one stream, so the
    loader's workers run on into the next epoch instead of idling at every epoch boundary."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool = False):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.start_epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self):
        epoch = self.start_epoch
        while True:
            pairs = self.sampler.pairs(epoch)
            for k in range(len(self)):
                yield pairs[k * self.batch_size : (k + 1) * self.batch_size]
            epoch += 1


class SegLoader:
    """A DataLoader whose workers stream batches across epoch boundaries (as a DataLoader, minus the stall).

    Use it as a DataLoader: loader.sampler.set_epoch(epoch), then `for batch in loader` gives that epoch's
    len(loader) batches. Reading epochs e, e + 1, ... in order, each to its end, reads one continuous stream;
    anything else (another epoch, an epoch left half read) restarts the stream at the epoch asked for.
    """

    def __init__(self, loader: DataLoader, sampler: EpochSampler, batches: EpochBatches):
        self.loader, self.sampler, self.batches = loader, sampler, batches
        self.dataset = loader.dataset
        self._stream = None
        self._next: tuple[int, int] | None = None  # (epoch, batch) the stream yields next

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch = self.sampler.epoch
        if self._stream is None or self._next != (epoch, 0):
            self.batches.start_epoch = epoch
            self._stream = iter(self.loader)  # persistent workers: the old stream's batches in flight are dropped
        for k in range(len(self)):
            batch = next(self._stream)
            self._next = (epoch, k + 1)
            yield batch
        self._next = (epoch + 1, 0)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)
    # Loader workers must not fight the training threads (or each other) for the cores.
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)


def build_dataloader(
    dataset,
    batch_size: int,
    *,
    workers: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    collate: SegCollate | None = None,
    pin_memory: bool | None = None,
    drop_last: bool = False,
) -> DataLoader | SegLoader:
    """A loader over dataset with an EpochSampler (call loader.sampler.set_epoch(epoch) each epoch).

    A shuffled (training) loader with workers is a SegLoader: its workers start the next epoch's batches while
    this one's last batches are used. Others are plain DataLoaders (a validation pass runs once per epoch and
    must not take the cores from training in between).
    """
    workers = max(0, min(workers, os.cpu_count() or 1))
    if workers > 0:
        import cv2

        # OpenCV's thread pool does not survive fork: a worker forked after this process ran a parallel cv2
        # call deadlocks in its first one. One cv2 thread here (workers do the image work anyway) avoids it.
        cv2.setNumThreads(1)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    continuous = shuffle and workers > 0
    batches = EpochBatches(sampler, batch_size, drop_last) if continuous else None
    generator = torch.Generator().manual_seed(seed + rank)
    loader = DataLoader(
        dataset,
        batch_size=1 if continuous else batch_size,  # 1: the batch sampler makes the batches
        sampler=None if continuous else sampler,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate or SegCollate(),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_seed_worker,
        generator=generator,
        drop_last=drop_last if not continuous else False,
    )
    return SegLoader(loader, sampler, batches) if continuous else loader
