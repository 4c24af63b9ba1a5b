"""Benchmarks of pyseg's native ops, each against a baseline measured in the same run.

    python benchmarks/bench_ops.py            # full table (CPU; GPU rows too when CUDA is available)
    python benchmarks/bench_ops.py --quick    # fewer sizes and repeats
    python benchmarks/bench_ops.py --gpu --json bench.json   # GPU only: agreement asserted, GPU rows, JSON

--gpu (benchmarks/gpu_check.sh bench runs it) first compares every CUDA kernel with the CPU kernel on the same
inputs and exits 1 when they disagree: rasterization must be bit-identical (COCO128-Seg at 160 and 640, per-instance
masks and overlap maps), assemble_masks and mask_loss (float32) within AGREEMENT_TOLERANCE. Then the GPU rows, and
the bandwidth ratio of assemble_masks: (bytes written + bytes read) / time over the device-to-device copy bandwidth
measured in the same run. Without a CUDA device, or with a pyseg._C built without CUDA, it exits 2.

Rows (speedup = baseline time / our time; memory ratio = our peak / baseline peak):
  rasterize  every COCO128-Seg instance at mask ratio 4 (640 -> 160), one call per batch of 16 images,
             single thread, vs cv2.fillPoly at 640 + cv2.resize per instance and vs cv2.fillPoly at 160.
             Without ../shared/datasets/coco128-seg, synthetic star polygons stand in (said in the output).
  assemble   assemble_masks, K=32, 160x160 protos -> 640x640, threshold 0.5, vs the unfused torch chain
             (matmul -> interpolate -> sigmoid -> crop -> threshold).
  mask_loss  forward + backward, K=32, 16 images of 160x160 protos, vs the unfused torch loss; peak memory
             is what the step adds on top of its inputs (CPU: peak RSS growth in a fresh process;
             GPU: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyseg.ops as ops  # noqa: E402
from pyseg.ops import reference  # noqa: E402

COCO128_LABELS = Path(os.environ.get("PYSEG_COCO128_SEG", ROOT.parent / "shared/datasets/coco128-seg")) / "labels"


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median seconds of fn() over repeats calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --------------------------------------------------------------------------- rasterization


def load_polygons() -> tuple[list[list[np.ndarray]], str]:
    """Per image, its polygons in normalized xy; COCO128-Seg when present, else synthetic stars."""
    if COCO128_LABELS.is_dir():
        images = []
        for path in sorted(COCO128_LABELS.rglob("*.txt")):
            polys = []
            for line in path.read_text().splitlines():
                values = line.split()
                if len(values) >= 7 and len(values) % 2 == 1:
                    polys.append(np.asarray(values[1:], dtype=np.float32).reshape(-1, 2))
            images.append(polys)
        return images, f"COCO128-Seg ({COCO128_LABELS.parent})"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(128):
        polys = []
        for _ in range(int(rng.integers(1, 15))):
            n = int(rng.integers(8, 60))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radius = rng.uniform(0.02, 0.3) * rng.uniform(0.5, 1.0, n)
            centre = rng.uniform(0.1, 0.9, 2)
            polys.append(np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1))
        images.append([p.astype(np.float32) for p in polys])
    return images, "synthetic stars (COCO128-Seg not found)"


def bench_rasterize(repeats: int) -> list[tuple]:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images, source = load_polygons()
    imgsz, ratio = 640, 4
    size = imgsz // ratio
    batches = []
    for start in range(0, len(images), 16):
        polys, image_index = [], []
        for b, image in enumerate(images[start : start + 16]):
            for poly in image:
                polys.append(poly * imgsz)
                image_index.append(b)
        lengths = [len(p) for p in polys]
        vertices = torch.from_numpy(np.concatenate(polys) / ratio).float()
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
        batches.append((polys, vertices, offsets, torch.arange(len(polys)), torch.tensor(image_index), 16))
    num_images = len(images)
    num_instances = sum(len(b[0]) for b in batches)

    def ours_masks():
        for _, v, off, owner, _, _ in batches:
            ops.rasterize_polygons(v, off, owner, len(owner), size, size)

    def ours_overlap():
        for _, v, off, owner, image_index, n in batches:
            ops.rasterize_polygons_overlap(v, off, owner, image_index, n, size, size)

    def cv2_full_resize():
        for polys, *_ in batches:
            for poly in polys:
                mask = np.zeros((imgsz, imgsz), np.uint8)
                cv2.fillPoly(mask, [poly.astype(np.int32)], 1)
                cv2.resize(mask, (size, size))

    def cv2_direct():
        for polys, *_ in batches:
            for poly in polys:
                mask = np.zeros((size, size), np.uint8)
                cv2.fillPoly(mask, [(poly / ratio).astype(np.int32)], 1)

    t_ours = timed(ours_masks, repeats)
    t_overlap = timed(ours_overlap, repeats)
    t_full = timed(cv2_full_resize, repeats)
    t_direct = timed(cv2_direct, repeats)
    torch.set_num_threads(os.cpu_count() or 1)
    per_image = 1e6 / num_images
    note = f"{source}: {num_images} images, {num_instances} instances, 1 thread"
    return [
        (
            "rasterize 640->160",
            "cv2.fillPoly@640 + resize",
            t_full * per_image,
            t_ours * per_image,
            t_full / t_ours,
            None,
            note + ", per-instance masks",
        ),
        (
            "rasterize 640->160",
            "cv2.fillPoly@160",
            t_direct * per_image,
            t_ours * per_image,
            t_direct / t_ours,
            None,
            "per-instance masks",
        ),
        (
            "rasterize overlap 640->160",
            "cv2.fillPoly@640 + resize",
            t_full * per_image,
            t_overlap * per_image,
            t_full / t_overlap,
            None,
            "overlap index maps + areas",
        ),
        (
            "rasterize overlap 640->160",
            "cv2.fillPoly@160",
            t_direct * per_image,
            t_overlap * per_image,
            t_direct / t_overlap,
            None,
            "overlap index maps + areas",
        ),
    ]


# --------------------------------------------------------------------------- assemble_masks


def assemble_inputs(num: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((1, 32, 160, 160), generator=g)
    coeffs = torch.randn((num, 32), generator=g)
    xy = torch.rand((num, 2), generator=g) * 120
    wh = torch.rand((num, 2), generator=g) * 60 + 4  # boxes of 4..64 proto pixels (16..256 image pixels)
    boxes = torch.cat([xy, (xy + wh).clamp(max=160)], 1)
    return [t.to(device) for t in (protos, coeffs, torch.zeros(num, dtype=torch.int64), boxes)]


def assemble_unfused(protos, coeffs, image_index, boxes, out_size, threshold):
    """The unfused chain on full frames: logits -> bilinear resize -> sigmoid -> crop -> threshold."""
    _, channels, h, w = protos.shape
    logits = (coeffs @ protos[0].reshape(channels, h * w)).reshape(-1, h, w)
    logits = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
    scale = torch.tensor([out_size[1] / w, out_size[0] / h] * 2, device=boxes.device)
    probs = logits.sigmoid() * reference.box_crop(boxes * scale, *out_size)
    return probs > threshold


def bench_assemble(sizes, repeats: int, device: str) -> list[tuple]:
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for num in sizes:
        args = assemble_inputs(num, device)
        ours = timed(lambda args=args: ops.assemble_masks(*args, (640, 640), 0.5), repeats, sync=sync)
        base = timed(lambda args=args: assemble_unfused(*args, (640, 640), 0.5), repeats, sync=sync)
        agree = (ops.assemble_masks(*args, (640, 640), 0.5) == assemble_unfused(*args, (640, 640), 0.5)).float().mean()
        rows.append(
            (
                f"assemble_masks N={num} ({device})",
                "unfused torch",
                base * 1e3,
                ours * 1e3,
                base / ours,
                None,
                f"ms per call; pixels agreeing {float(agree):.6f}",
            )
        )
    return rows


# --------------------------------------------------------------------------- mask_loss


def loss_inputs(num: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = 16
    protos = torch.randn((batch, 32, 160, 160), generator=g)
    coeffs = torch.randn((num, 32), generator=g)
    image_index = torch.randint(0, batch, (num,), generator=g)
    gt_masks = torch.randint(0, 6, (batch, 160, 160), generator=g, dtype=torch.int32)
    gt_index = torch.randint(1, 6, (num,), generator=g)
    xy = torch.rand((num, 2), generator=g) * 120
    boxes = torch.cat([xy, (xy + torch.rand((num, 2), generator=g) * 60 + 4).clamp(max=160)], 1)
    return [t.to(device) for t in (protos, coeffs, image_index, gt_masks, gt_index, boxes)]


def loss_unfused(protos, coeffs, image_index, gt_masks, gt_index, boxes):
    """The usual torch mask loss: per-image logits, BCE on full frames, crop, mean over the box."""
    _, channels, h, w = protos.shape
    total = []
    for b in range(protos.shape[0]):
        sel = image_index == b
        logits = (coeffs[sel] @ protos[b].reshape(channels, h * w)).reshape(-1, h, w)
        target = (gt_masks[b][None] == gt_index[sel][:, None, None]).float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        crop = reference.box_crop(boxes[sel], h, w)
        total.append((bce * crop).sum((1, 2)) / crop.sum((1, 2)).clamp(min=1))
    return torch.cat(total)


def loss_step(variant: str, num: int, device: str):
    """A forward + backward of the loss (gradients returned, not accumulated)."""
    args = loss_inputs(num, device)
    protos, coeffs = args[0].requires_grad_(), args[1].requires_grad_()
    fn = ops.mask_loss if variant == "ours" else loss_unfused

    def step():
        return torch.autograd.grad(fn(protos, coeffs, *args[2:]).sum(), (protos, coeffs))

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _peak_rss_child(variant: str, num: int, queue) -> None:
    loss_step(variant, 4, "cpu")()  # initialise torch's lazy state on a tiny problem
    step = loss_step(variant, num, "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_bytes()
    step()
    queue.put(_peak_rss_bytes() - before)


def peak_memory(variant: str, num: int, device: str) -> int:
    """Peak bytes a loss forward + backward adds on top of its inputs.

    GPU: torch.cuda.max_memory_allocated. CPU: growth of the peak RSS (VmHWM, reset through
    /proc/self/clear_refs) over the RSS before the step, in a fresh process warmed up on a tiny problem.
    """
    if device == "cuda":
        step = loss_step(variant, num, device)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(variant, num, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return max(result, 0)


def bench_mask_loss(sizes, repeats: int, device: str) -> list[tuple]:
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for num in sizes:
        ours = timed(loss_step("ours", num, device), repeats, sync=sync)
        base = timed(loss_step("unfused", num, device), repeats, sync=sync)
        mem_ours, mem_base = peak_memory("ours", num, device), peak_memory("unfused", num, device)
        rows.append(
            (
                f"mask_loss fwd+bwd N={num} ({device})",
                "unfused torch",
                base * 1e3,
                ours * 1e3,
                base / ours,
                mem_ours / max(mem_base, 1),
                f"ms per step; peak +{mem_ours / 2**20:.1f} MiB vs +{mem_base / 2**20:.1f} MiB",
            )
        )
    return rows


# --------------------------------------------------------------------------- GPU bandwidth


def bench_bandwidth(repeats: int, assemble: dict | None = None) -> list[tuple]:
    """Achieved bytes/s of the CUDA kernels as a fraction of a device-to-device copy (assemble: assemble_bandwidth's
    figures when already measured)."""
    sync = torch.cuda.synchronize
    assemble = assemble or assemble_bandwidth(repeats)
    copy_bw = assemble["copy_GBps"] * 1e9
    rows = [
        (
            "assemble_masks N=300 bandwidth",
            "d2d copy",
            assemble["copy_GBps"],
            assemble["achieved_GBps"],
            assemble["ratio_to_copy"],
            None,
            "GB/s (baseline column: copy), ratio = fraction of copy bandwidth",
        )
    ]
    images, _ = load_polygons()
    polys = [p * 160 for image in images for p in image]
    v = torch.from_numpy(np.concatenate(polys)).float().cuda()
    off = torch.tensor(np.concatenate([[0], np.cumsum([len(p) for p in polys])]), dtype=torch.int64).cuda()
    owner = torch.arange(len(polys), device="cuda")
    t = timed(lambda: ops.rasterize_polygons(v, off, owner, len(polys), 160, 160), repeats, sync=sync)
    moved = len(polys) * 160 * 160 * 2 + v.numel() * 4  # zero-fill + writes of the masks, vertices read
    rows.append(
        (
            "rasterize 160x160 bandwidth",
            "d2d copy",
            copy_bw / 1e9,
            moved / t / 1e9,
            moved / t / copy_bw,
            None,
            "GB/s; an upper bound on bytes (every mask byte counted as written)",
        )
    )
    return rows


# --------------------------------------------------------------------------- GPU agreement (--gpu)

# CUDA kernel vs CPU kernel, float32: the largest |gpu - cpu| of assemble_masks' probabilities, and of mask_loss the
# relative error ||gpu - cpu|| / ||cpu|| of the losses and of each gradient. Thresholded masks must agree on every
# pixel whose probability lies farther than AMBIGUOUS from the threshold; rasterization must agree bit for bit.
AGREEMENT_TOLERANCE = {"assemble_masks": 1e-5, "mask_loss": 1e-4}
AMBIGUOUS = 1e-3


def rasterize_agreement() -> dict:
    """Per-instance masks at 160 and 640 and overlap maps (16 images a batch), CUDA vs CPU: differing pixels."""
    images, source = load_polygons()
    differing = pixels = 0
    for size in (160, 640):
        polys, image_index, start_of = [], [], []
        for index, image in enumerate(images):
            start_of.append(len(polys))
            for poly in image:
                polys.append(poly * size)
                image_index.append(index)
        lengths = [len(p) for p in polys]
        vertices = torch.from_numpy(np.concatenate(polys)).float()
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
        owner = torch.arange(len(polys))
        cpu = ops.rasterize_polygons(vertices, offsets, owner, len(polys), size, size)
        gpu = ops.rasterize_polygons(vertices.cuda(), offsets.cuda(), owner.cuda(), len(polys), size, size).cpu()
        differing += int((cpu != gpu).sum())
        pixels += cpu.numel()
        for first in range(0, len(images), 16):  # overlap maps, one batch of 16 images at a time
            last = min(first + 16, len(images))
            lo, hi = start_of[first], start_of[last] if last < len(images) else len(polys)
            if lo == hi:
                continue
            v = vertices[offsets[lo] : offsets[hi]]
            off = offsets[lo : hi + 1] - offsets[lo]
            own = torch.arange(hi - lo)
            index = torch.tensor(image_index[lo:hi]) - first
            cpu_map, cpu_areas = ops.rasterize_polygons_overlap(v, off, own, index, last - first, size, size)
            gpu_map, gpu_areas = ops.rasterize_polygons_overlap(
                v.cuda(), off.cuda(), own.cuda(), index.cuda(), last - first, size, size
            )
            differing += int((cpu_map != gpu_map.cpu()).sum()) + int((cpu_areas != gpu_areas.cpu()).sum())
            pixels += cpu_map.numel()
    return {"source": source, "pixels": pixels, "pixels_differing": differing, "ok": differing == 0}


def assemble_agreement() -> dict:
    """assemble_masks, 300 instances, 160x160 protos at proto size and resized to 640x640, CUDA vs CPU."""
    args = assemble_inputs(300, "cpu", seed=1)
    cuda_args = [t.cuda() for t in args]
    max_abs, decided_agree, all_agree = 0.0, 1.0, 1.0
    for out_size in (None, (640, 640)):
        cpu = ops.assemble_masks(*args, out_size)
        gpu = ops.assemble_masks(*cuda_args, out_size).cpu()
        max_abs = max(max_abs, float((cpu - gpu).abs().max()))
        cpu_bool, gpu_bool = cpu > 0.5, ops.assemble_masks(*cuda_args, out_size, 0.5).cpu()
        decided = (cpu - 0.5).abs() > AMBIGUOUS
        decided_agree = min(decided_agree, float((cpu_bool == gpu_bool)[decided].float().mean()))
        all_agree = min(all_agree, float((cpu_bool == gpu_bool).float().mean()))
    ok = max_abs <= AGREEMENT_TOLERANCE["assemble_masks"] and decided_agree == 1.0
    return {
        "max_abs_diff": max_abs,
        "tolerance": AGREEMENT_TOLERANCE["assemble_masks"],
        "threshold_agreement": all_agree,
        "threshold_agreement_decided": decided_agree,
        "ok": ok,
    }


def mask_loss_agreement() -> dict:
    """mask_loss forward + backward, 1024 instances over 16 images of 160x160 protos, CUDA vs CPU."""
    results = []
    for device in ("cpu", "cuda"):
        args = loss_inputs(1024, device, seed=2)
        protos, coeffs = args[0].requires_grad_(), args[1].requires_grad_()
        loss = ops.mask_loss(protos, coeffs, *args[2:])
        weights = torch.linspace(0.5, 1.5, loss.numel(), device=device)
        (loss * weights).sum().backward()
        results.append([t.detach().cpu().double() for t in (loss, protos.grad, coeffs.grad)])
    errors = {}
    for name, cpu, gpu in zip(("loss", "grad_protos", "grad_coeffs"), *results, strict=True):
        errors[name] = float((gpu - cpu).norm() / cpu.norm().clamp(min=1e-30))
    ok = all(math.isfinite(e) and e <= AGREEMENT_TOLERANCE["mask_loss"] for e in errors.values())
    return {"relative_error": errors, "tolerance": AGREEMENT_TOLERANCE["mask_loss"], "ok": ok}


def assemble_bandwidth(repeats: int) -> dict:
    """assemble_masks N=300, 160x160 protos -> 640x640 bool: (bytes written + bytes read) / time, and that over the
    bandwidth of a 1 GiB device-to-device copy (bytes read + written) measured now."""
    sync = torch.cuda.synchronize
    src = torch.randn(2**28, device="cuda")  # 1 GiB of float32, random (never time on zeros)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), repeats, warmup=2, sync=sync)
    copy_bandwidth = 2 * src.numel() * src.element_size() / copy_s
    protos, coeffs, image_index, boxes = assemble_inputs(300, "cuda")
    seconds = timed(lambda: ops.assemble_masks(protos, coeffs, image_index, boxes, (640, 640), 0.5), repeats, sync=sync)
    written = 300 * 640 * 640  # bool masks
    read = sum(t.numel() * t.element_size() for t in (protos, coeffs, image_index, boxes))
    achieved = (written + read) / seconds
    return {
        "instances": 300,
        "out_size": [640, 640],
        "bytes_written": written,
        "bytes_read": read,
        "seconds": seconds,
        "achieved_GBps": achieved / 1e9,
        "copy_GBps": copy_bandwidth / 1e9,
        "ratio_to_copy": achieved / copy_bandwidth,
    }


def star_polygon(rng: np.random.Generator, vertices: int, centre, radius: float) -> np.ndarray:
    """A star-shaped polygon of `vertices` vertices around centre (pixels)."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    radii = radius * rng.uniform(0.4, 1.0, vertices)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1).astype(np.float32)


def rasterize_gpu_rows(repeats: int) -> list[tuple]:
    """The issue's rasterization targets on the GPU: overlap maps of 16 images x 50 instances at 160x160 (< 0.1 ms),
    and polygons of 1500 vertices at 640x640 against 100-vertex ones of the same size (no O(vertices x rows) blow-up).
    """
    sync = torch.cuda.synchronize
    rng = np.random.default_rng(3)
    polys, image_index = [], []
    for image in range(16):
        for _ in range(50):
            polys.append(star_polygon(rng, int(rng.integers(8, 40)), rng.uniform(0, 160, 2), rng.uniform(4, 40)))
            image_index.append(image)
    v = torch.from_numpy(np.concatenate(polys)).cuda()
    off = torch.tensor(np.concatenate([[0], np.cumsum([len(p) for p in polys])]), dtype=torch.int64).cuda()
    owner, index = torch.arange(len(polys), device="cuda"), torch.tensor(image_index, device="cuda")
    overlap = timed(lambda: ops.rasterize_polygons_overlap(v, off, owner, index, 16, 160, 160), repeats, sync=sync)
    rows = [
        (
            "rasterize overlap 16x50 @160",
            "target",
            0.1,
            overlap * 1e3,
            0.1 / (overlap * 1e3),
            None,
            "ms; target < 0.1 ms",
        )
    ]
    times = {}
    for vertices in (100, 1500):
        big = [star_polygon(rng, vertices, (320, 320), 300) for _ in range(32)]
        bv = torch.from_numpy(np.concatenate(big)).cuda()
        boff = torch.tensor(np.arange(0, vertices * 33, vertices), dtype=torch.int64).cuda()
        bown = torch.arange(32, device="cuda")
        args = (bv, boff, bown, 32, 640, 640)
        times[vertices] = timed(lambda args=args: ops.rasterize_polygons(*args), repeats, sync=sync)
    rows.append(
        (
            "rasterize 32 polygons @640, 1500 vs 100 vertices",
            "100 vertices",
            times[100] * 1e3,
            times[1500] * 1e3,
            times[100] / times[1500],
            None,
            "ms; 15x the vertices should cost far less than 15x the time",
        )
    )
    return rows


def gpu_main(args) -> int:
    """--gpu: agreement (asserted), the GPU rows and the bandwidth ratio; JSON to args.json. 0, 1 (disagreement)
    or 2 (no CUDA device or no CUDA kernels)."""
    if not torch.cuda.is_available():
        print(
            f"bench_ops --gpu: torch {torch.__version__} sees no CUDA device; run it on a GPU machine", file=sys.stderr
        )
        return 2
    info = ops.build_info()
    if not info["cuda"]:
        why = info.get("error") or "built without CUDA kernels"
        print(f"bench_ops --gpu: pyseg._C has no CUDA kernels ({why}); build with FORCE_CUDA=1", file=sys.stderr)
        return 2
    repeats = args.repeats or (5 if args.quick else 20)
    device = torch.cuda.get_device_name()
    print(f"pyseg bench_ops --gpu: {device}, torch {torch.__version__}, build {info}")
    agreement = {
        "rasterize": rasterize_agreement(),
        "assemble_masks": assemble_agreement(),
        "mask_loss": mask_loss_agreement(),
    }
    for name, figures in agreement.items():
        print(f"agreement {name}: {'ok' if figures['ok'] else 'DISAGREES'} {figures}")
    bandwidth = assemble_bandwidth(repeats)
    rows = bench_assemble([10, 100, 300], repeats, "cuda")
    rows += bench_mask_loss([128] if args.quick else [128, 1024], repeats, "cuda")
    rows += bench_bandwidth(repeats, bandwidth)
    rows += rasterize_gpu_rows(repeats)
    print("assemble/mask_loss columns: milliseconds per call")
    print_table(rows)
    print(
        f"assemble_masks bandwidth: {bandwidth['achieved_GBps']:.1f} GB/s against a device-to-device copy's "
        f"{bandwidth['copy_GBps']:.1f} GB/s: ratio {bandwidth['ratio_to_copy']:.3f}"
    )
    ok = all(figures["ok"] for figures in agreement.values())
    if args.json:
        columns = ("op", "baseline_name", "baseline", "ours", "speedup", "memory_ratio", "notes")
        report = {
            "device": device,
            "torch": torch.__version__,
            "build_info": info,
            "repeats": repeats,
            "agreement": agreement,
            "assemble_bandwidth": bandwidth,
            "rows": [dict(zip(columns, row, strict=True)) for row in rows],
            "ok": ok,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not ok:
        failed = [name for name, figures in agreement.items() if not figures["ok"]]
        print(f"bench_ops --gpu: the CUDA kernels disagree with the CPU kernels: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def print_table(rows: list[tuple]) -> None:
    header = ("op", "baseline", "baseline", "ours", "speedup", "mem ratio", "notes")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, base_name, base, ours, speedup, mem, note in rows:
        mem_text = "" if mem is None else f"{mem:.3f}"
        print(f"| {name} | {base_name} | {base:.2f} | {ours:.2f} | {speedup:.2f}x | {mem_text} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    parser.add_argument("--gpu", action="store_true", help="GPU only: agreement with the CPU kernels, GPU rows")
    parser.add_argument("--json", default=None, help="with --gpu: write every figure to this JSON file")
    args = parser.parse_args()
    if args.json and not args.gpu:
        parser.error("--json goes with --gpu")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not ops.has_ops():
        print(f"bench_ops: pyseg._C is not built ({ops.build_info()['error']})", file=sys.stderr)
        sys.exit(2)
    if args.gpu:
        sys.exit(gpu_main(args))
    repeats = args.repeats or (3 if args.quick else 7)
    print(f"pyseg bench_ops: torch {torch.__version__}, {torch.get_num_threads()} threads, build {ops.build_info()}")
    rows = bench_rasterize(repeats)
    rows += bench_assemble([10, 100] if args.quick else [10, 100, 300], repeats, "cpu")
    rows += bench_mask_loss([128] if args.quick else [128, 1024], repeats, "cpu")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        rows += bench_assemble([10, 100, 300], repeats * 3, "cuda")
        rows += bench_mask_loss([128, 1024], repeats * 3, "cuda")
        rows += bench_bandwidth(repeats * 3)
    print("rasterize columns: microseconds per image; assemble/mask_loss columns: milliseconds per call")
    print_table(rows)


if __name__ == "__main__":
    main()
