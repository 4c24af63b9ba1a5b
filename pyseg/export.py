"""python -m pyseg.export: a checkpoint as ONNX or TorchScript, for onnxruntime, TensorRT or torch.jit.load.

    python -m pyseg.export --weights runs/train/weights/best.pt --format onnx|torchscript [--imgsz 640]
        [--batch 1] [--dynamic] [--half] [--end2end [--conf 0.25] [--iou 0.7] [--max-det 300]] [--out FILE]

Raw outputs (the default), for images (B, 3, H, W) float RGB in [0, 1]: boxes (B, A, 4) xyxy input pixels, scores
(B, A, nc), mask_coeffs (B, A, 32), protos (B, 32, H/4, W/4). --end2end puts the rest in the graph, for one image:
boxes (N, 4), scores (N,), classes (N,), masks (N, H, W) uint8 at the input size. The file goes beside the weights
(best.onnx, best.torchscript) unless --out names another; class names, image size, strides and pyseg's version go
inside it (ONNX metadata_props; TorchScript extra file pyseg.json).
"""

from __future__ import annotations

import argparse
import sys

from pyseg.errors import CommandParser, run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pyseg.engine.export import FORMATS

    parser = CommandParser("python -m pyseg.export", __doc__)
    parser.add_argument(
        "--weights", required=True, help="a pyseg checkpoint (runs/NAME/weights/best.pt) or an Ultralytics -seg .pt"
    )
    parser.add_argument("--format", default="onnx", help=f"{' or '.join(FORMATS)} (default onnx)")
    parser.add_argument(
        "--imgsz", type=int, default=None, help="input size, a multiple of 32 (default: the checkpoint's)"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1; --dynamic makes it free)")
    parser.add_argument("--dynamic", action="store_true", help="any batch size and image size (multiples of 32)")
    parser.add_argument("--half", action="store_true", help="float16 weights and inputs (needs a CUDA device)")
    parser.add_argument("--end2end", action="store_true", help="NMS and masks inside the graph (one image per call)")
    parser.add_argument("--conf", type=float, default=0.25, help="--end2end: score threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.7, help="--end2end: NMS IoU threshold (default 0.7)")
    parser.add_argument("--max-det", type=int, default=300, help="--end2end: detections per image (default 300)")
    parser.add_argument("--device", default="", help="cpu, 0, cuda:0 (default: a GPU when there is one)")
    parser.add_argument("--out", default=None, help="the file to write (default: beside the weights)")
    return parser.parse_args(argv)


def export_command(argv: list[str] | None) -> int:
    from pyseg.engine.export import ExportOptions, export_model

    args = parse_args(argv)
    options = ExportOptions(
        format=args.format.lower(),
        imgsz=args.imgsz,
        batch=args.batch,
        dynamic=args.dynamic,
        half=args.half,
        end2end=args.end2end,
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        device=args.device,
    )
    path = export_model(args.weights, options, args.out)
    size_mb = path.stat().st_size / 1e6
    kind = "end to end" if args.end2end else "raw outputs"
    print(f"exported {args.weights} -> {path} ({options.format}, {kind}, {size_mb:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: exit code 0, or 2 with one line for a user error."""
    return run_command("pyseg.export", export_command, argv)


if __name__ == "__main__":
    sys.exit(main())
