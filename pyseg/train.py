"""python -m pyseg.train: train a segmentation model (single process).

Examples:
    python -m pyseg.train                                   # pyseg-n on the built-in shapes-seg
    python -m pyseg.train --data coco128-seg.yaml --epochs 3 --imgsz 320 --batch 16 --device cpu
    python -m pyseg.train --resume --name train             # continue runs/train from weights/last.pt
    python -m pyseg.train --cfg runs/train/args.yaml --epochs 50
"""

from __future__ import annotations

import argparse
import sys

from pyseg.config import add_config_arguments, config_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pyseg.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        print(f"pyseg.train: {error}", file=sys.stderr)
        return 2
    from pyseg.engine.trainer import Trainer

    run_dir = Trainer(cfg).fit()
    print(f"results in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
