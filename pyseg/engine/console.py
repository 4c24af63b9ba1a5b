"""What pyseg.train prints per epoch: a header once, then one aligned row per epoch.

    epoch    box    cls    dfl   mask | box mAP50  mAP50-95 | mask mAP50  mAP50-95 |  img/s   time
     1/15  7.131  5.160  4.172  9.401 |     0.000     0.000 |      0.000     0.000 |  110.8   1.2s

The four losses are the epoch's training means; the mAP columns are COCO's on the val split, `-` in an epoch
without validation. img/s and time are of the training half of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyseg.engine.run_files import BOX_MAP, BOX_MAP50, MASK_MAP, MASK_MAP50


@dataclass(frozen=True)
class Column:
    title: str
    key: str  # results.csv column
    width: int
    kind: str  # "loss", "map", "rate" or "seconds"


LOSSES = tuple(Column(name, f"train/{name}", 6, "loss") for name in ("box", "cls", "dfl", "mask"))
BOX_MAPS = (Column("box mAP50", BOX_MAP50, 9, "map"), Column("mAP50-95", BOX_MAP, 9, "map"))
MASK_MAPS = (Column("mask mAP50", MASK_MAP50, 10, "map"), Column("mAP50-95", MASK_MAP, 9, "map"))
SPEED = (Column("img/s", "images_per_s", 6, "rate"), Column("time", "epoch_seconds", 6, "seconds"))
GROUPS = (LOSSES, BOX_MAPS, MASK_MAPS, SPEED)
SEPARATOR = " | "


class EpochTable:
    """Formats the epoch rows of a run of `epochs` epochs (results.csv rows: pyseg.engine.trainer's row dict)."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.epoch_width = max(len("epoch"), 2 * len(str(epochs)) + 1)

    def header(self) -> str:
        cells = [" ".join(f"{c.title:>{c.width}}" for c in group) for group in GROUPS]
        return f"{'epoch':>{self.epoch_width}}  " + SEPARATOR.join(cells)

    def row(self, row: dict) -> str:
        epoch = f"{row['epoch']}/{self.epochs}"
        cells = [" ".join(_cell(c, row.get(c.key)) for c in group) for group in GROUPS]
        return f"{epoch:>{self.epoch_width}}  " + SEPARATOR.join(cells)


def _cell(column: Column, value) -> str:
    if value is None:
        text = "-"
    elif column.kind in ("loss", "map"):
        text = f"{value:.3f}"
    elif column.kind == "rate":
        text = f"{value:.1f}"
    else:
        text = f"{value:.1f}s" if value < 600 else f"{value / 60:.1f}m"
    return f"{text:>{column.width}}"
