"""CPU inference latency of one architecture as eager pyseg, TorchScript, ONNX in onnxruntime and, where Ultralytics
is installed, Ultralytics' own ONNX export of the same architecture; and the exported files' sizes.

    python benchmarks/bench_export.py                       # yolo11n-seg (nc=80), 640 px, batch 1 and 8
    python benchmarks/bench_export.py --model pyseg-n --imgsz 320 --repeats 5

Every runtime gets the same input (random images in [0, 1]) and the same number of CPU threads (--threads, default
all cores); each file is exported at its batch size (static shapes, as a deployment would). Latency is the median
of --repeats timed calls after two warm-up calls, per image: the model's forward pass and, for pyseg's raw outputs,
the box decoding inside it (no NMS anywhere). Ratios are against eager pyseg measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ULTRALYTICS_EXPORT = """
import json, sys
from ultralytics import YOLO
model, imgsz, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
path = YOLO(model + ".yaml").export(format="onnx", imgsz=imgsz, batch=batch, opset=17, simplify=False, dynamic=False)
print(json.dumps({"path": str(path)}))
"""


def median_ms(call, repeats: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def onnx_runner(path: Path, images, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    array = images.numpy()
    return lambda: session.run(None, {name: array})


def ultralytics_onnx(model: str, imgsz: int, batch: int, folder: Path) -> Path | None:
    """Ultralytics' ONNX export of `model` (from its own config, random weights) in a subprocess; None (and why,
    printed) where Ultralytics is missing or its export fails."""
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:
        print("ultralytics: not installed (requirements-peer.txt); its row is left out")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "YOLO_CONFIG_DIR": str(folder), "YOLO_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", ULTRALYTICS_EXPORT, model, str(imgsz), str(batch), str(folder)],
        capture_output=True, text=True, cwd=folder, env=env, timeout=900,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"ultralytics export failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-400:]}")
        return None
    path = Path(json.loads(lines[-1])["path"])
    return path if path.is_absolute() else folder / path  # Ultralytics answers relative to its working folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo11n-seg")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    import torch

    from pyseg.config import make_config
    from pyseg.engine.checkpoint import save_checkpoint
    from pyseg.engine.export import ExportOptions, RawOutputs, export_model
    from pyseg.models.seg_model import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 80).eval()
    eager = RawOutputs(model).eval()
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory(prefix="pyseg-bench-export-") as tmp:
        folder = Path(tmp)
        weights = folder / "model.pt"
        state = model.state_dict()
        config = make_config({"model": args.model, "imgsz": args.imgsz}).to_dict()
        names = [f"class{i}" for i in range(80)]
        save_checkpoint(weights, {"model": state, "ema": state, "config": config, "names": names})
        for batch in args.batches:
            images = torch.rand(batch, 3, args.imgsz, args.imgsz)
            onnx_path = export_model(
                weights, ExportOptions("onnx", batch=batch, device="cpu"), str(folder / f"b{batch}.onnx")
            )
            script_path = export_model(
                weights, ExportOptions("torchscript", batch=batch, device="cpu"), str(folder / f"b{batch}.torchscript")
            )
            scripted = torch.jit.load(str(script_path))
            with torch.no_grad():
                timed = {
                    "eager pyseg": median_ms(lambda x=images: eager(x), args.repeats),
                    "TorchScript": median_ms(lambda f=scripted, x=images: f(x), args.repeats),
                }
            timed["ONNX (onnxruntime)"] = median_ms(onnx_runner(onnx_path, images, args.threads), args.repeats)
            sizes["ONNX (onnxruntime)"] = onnx_path.stat().st_size
            sizes["TorchScript"] = script_path.stat().st_size
            theirs = ultralytics_onnx(args.model, args.imgsz, batch, folder / f"ultralytics{batch}")
            if theirs is not None:
                timed["Ultralytics ONNX (onnxruntime)"] = median_ms(
                    onnx_runner(theirs, images, args.threads), args.repeats
                )
                sizes["Ultralytics ONNX (onnxruntime)"] = theirs.stat().st_size
            for runtime, ms in timed.items():
                rows.append((runtime, batch, ms / batch, timed["eager pyseg"] / ms))
    print(f"\n{args.model} at {args.imgsz} px, {args.threads} CPU threads, median of {args.repeats} calls")
    print("| runtime | batch | ms per image | speed vs eager pyseg |\n|---|---|---|---|")
    for runtime, batch, per_image, ratio in rows:
        print(f"| {runtime} | {batch} | {per_image:.1f} | {ratio:.2f}x |")
    print("\n| file | size (MB) |\n|---|---|")
    for runtime, size in sizes.items():
        print(f"| {runtime} | {size / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
