// CUDA kernel of assemble_masks.
//
// One pass writes every output element once. A small kernel first finds, per mask, the 32x32 tiles
// of output pixels that its box touches, and a prefix sum over those tile counts numbers the
// tiles of all masks (no host sync: the total is read on the device). The main kernel runs a
// persistent grid: its blocks first take the box tiles (phase 1), computing the logits of the
// proto cells a tile samples (its footprint plus a one-cell border) into shared memory, then
// resampling them (F.interpolate's align_corners=False rule), applying the sigmoid and storing
// four pixels per thread, zeros for the tile's pixels outside the box; then every warp zero-fills
// whole output rows outside the box tiles with 16-byte stores (phase 2). Nothing is written twice
// and no at::zeros pass precedes it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/assemble_masks.h"
#include "../ops/linear_tap.h"
#include "../ops/pixel_centres.h"
#include "device_errors.h"
#include "helpers.cuh"

namespace pyseg {
namespace {

constexpr int kTile = 32;           // output pixels per tile side
constexpr int kPixelsPerThread = 4;  // consecutive pixels of a row, stored together
constexpr int kBlockThreads = kTile * kTile / kPixelsPerThread;  // 256: one 4-pixel group each
constexpr int kRegionMax = 4608;    // proto cells cached per block

template <typename scalar_t, typename acc_t>
__device__ inline acc_t dot_at(const scalar_t* proto_b, const acc_t* coeff, int64_t channels, int64_t plane,
                               int64_t offset) {
  acc_t z = 0;
  for (int64_t k = 0; k < channels; ++k) z += coeff[k] * static_cast<acc_t>(proto_b[k * plane + offset]);
  return z;
}

template <typename acc_t, typename out_t>
__device__ inline out_t finish(acc_t logit, bool use_threshold, acc_t threshold) {
  const acc_t p = static_cast<acc_t>(1) / (static_cast<acc_t>(1) + exp(-logit));
  if (use_threshold) return static_cast<out_t>(p > threshold);
  return static_cast<out_t>(p);
}

// Four consecutive output elements, stored with one (or, for double, two) vector instruction.
template <typename out_t>
struct alignas(kPixelsPerThread * sizeof(out_t)) Pack4 {
  out_t v[kPixelsPerThread];
};

// Geometry shared by both kernels.
struct AssembleShape {
  int64_t num, channels, h, w, out_h, out_w;
  bool resize;
  float box_sx, box_sy;  // output pixels per proto cell, in float32 as the reference scales float32 boxes
};

// Output pixels of box n: centres in the (scaled) box, clipped to the output.
__device__ inline BoxPixels output_box(const float* box, const AssembleShape& s) {
  const float sx = s.resize ? s.box_sx : 1.0f, sy = s.resize ? s.box_sy : 1.0f;
  return BoxPixels{centres_in(box[0] * sx, box[2] * sx, s.out_w), centres_in(box[1] * sy, box[3] * sy, s.out_h)};
}

// Per mask: the tiles its box touches, [tx0, tx1) x [ty0, ty1) (tile units; empty when the box
// covers no pixel or its image index is out of range), and their count.
__global__ void box_tiles_kernel(const float* __restrict__ boxes, const int64_t* __restrict__ image_index,
                                 int64_t batch, AssembleShape s, int4* __restrict__ tiles, int64_t* __restrict__ counts,
                                 int32_t* __restrict__ error_flag) {
  PYSEG_CUDA_1D_LOOP(n, s.num) {
    const BoxPixels px = output_box(boxes + 4 * n, s);
    const int64_t b = image_index[n];
    const bool valid = b >= 0 && b < batch;
    if (!valid) atomicOr(error_flag, kErrorImageIndex);
    int4 t = make_int4(0, 0, 0, 0);
    if (valid && px.area() > 0) {
      t = make_int4(static_cast<int>(px.xs.lo / kTile), static_cast<int>(ceil_div<int64_t>(px.xs.hi, kTile)),
                    static_cast<int>(px.ys.lo / kTile), static_cast<int>(ceil_div<int64_t>(px.ys.hi, kTile)));
    }
    tiles[n] = t;
    counts[n] = static_cast<int64_t>(t.y - t.x) * (t.w - t.z);
  }
}

template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kBlockThreads)
    assemble_masks_kernel(const scalar_t* __restrict__ protos, const scalar_t* __restrict__ coeffs,
                          const int64_t* __restrict__ image_index, const float* __restrict__ boxes,
                          const int4* __restrict__ tiles, const int64_t* __restrict__ tile_end, AssembleShape s,
                          bool use_threshold, double threshold, bool vector_rows, out_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* coeff = reinterpret_cast<acc_t*>(shared_bytes);  // [channels]
  __shared__ acc_t region[kRegionMax];
  const int64_t plane = s.h * s.w, out_plane = s.out_h * s.out_w;
  const acc_t src_sx = static_cast<acc_t>(s.w) / static_cast<acc_t>(s.out_w);
  const acc_t src_sy = static_cast<acc_t>(s.h) / static_cast<acc_t>(s.out_h);
  const acc_t thr = static_cast<acc_t>(threshold);
  const int tid = threadIdx.x;
  const int group_x = kPixelsPerThread * (tid % (kTile / kPixelsPerThread)), group_y = tid / (kTile / kPixelsPerThread);

  // Phase 1: the tiles that boxes touch, numbered by the inclusive prefix sum tile_end.
  const int64_t total_tiles = tile_end[s.num - 1];
  for (int64_t work = blockIdx.x; work < total_tiles; work += gridDim.x) {
    int64_t lo = 0, hi = s.num - 1;  // first n with tile_end[n] > work
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (tile_end[mid] > work) hi = mid; else lo = mid + 1;
    }
    const int64_t n = lo;
    const int4 t = tiles[n];
    const int64_t local = work - (n > 0 ? tile_end[n - 1] : 0);
    const int64_t tiles_x = t.y - t.x;
    const int64_t tile_x0 = (t.x + local % tiles_x) * kTile, tile_y0 = (t.z + local / tiles_x) * kTile;
    const BoxPixels box = output_box(boxes + 4 * n, s);
    const PixelRange xs{max_of<int64_t>(box.xs.lo, tile_x0), min_of<int64_t>(box.xs.hi, tile_x0 + kTile)};
    const PixelRange ys{max_of<int64_t>(box.ys.lo, tile_y0), min_of<int64_t>(box.ys.hi, tile_y0 + kTile)};
    const scalar_t* proto_b = protos + image_index[n] * s.channels * plane;

    __syncthreads();  // the previous tile's readers are done with coeff and region
    for (int64_t k = tid; k < s.channels; k += blockDim.x) coeff[k] = static_cast<acc_t>(coeffs[n * s.channels + k]);
    __syncthreads();
    int64_t r_lo = 0, c_lo = 0, cols = 0;
    bool cached = false;
    if (s.resize && xs.size() > 0 && ys.size() > 0) {  // uniform across the block
      c_lo = linear_tap<acc_t>(xs.lo, src_sx, s.w).i0;
      r_lo = linear_tap<acc_t>(ys.lo, src_sy, s.h).i0;
      cols = linear_tap<acc_t>(xs.hi - 1, src_sx, s.w).i1 - c_lo + 1;
      const int64_t rows = linear_tap<acc_t>(ys.hi - 1, src_sy, s.h).i1 - r_lo + 1;
      cached = rows * cols <= kRegionMax;
      if (cached) {
        for (int64_t i = tid; i < rows * cols; i += blockDim.x) {
          region[i] = dot_at(proto_b, coeff, s.channels, plane, (r_lo + i / cols) * s.w + c_lo + i % cols);
        }
      }
      __syncthreads();
    }

    const int64_t y = tile_y0 + group_y, x0 = tile_x0 + group_x;
    if (y >= s.out_h || x0 >= s.out_w) continue;
    Pack4<out_t> pack;
    const bool row_inside = y >= ys.lo && y < ys.hi;
    LinearTap<acc_t> ty{};
    if (s.resize && row_inside) ty = linear_tap<acc_t>(y, src_sy, s.h);
#pragma unroll
    for (int j = 0; j < kPixelsPerThread; ++j) {
      const int64_t x = x0 + j;
      pack.v[j] = static_cast<out_t>(0);
      if (!row_inside || x < xs.lo || x >= xs.hi) continue;
      acc_t v;
      if (!s.resize) {
        v = dot_at(proto_b, coeff, s.channels, plane, y * s.w + x);
      } else {
        const LinearTap<acc_t> tx = linear_tap<acc_t>(x, src_sx, s.w);
        acc_t v00, v01, v10, v11;
        if (cached) {
          v00 = region[(ty.i0 - r_lo) * cols + tx.i0 - c_lo];
          v01 = region[(ty.i0 - r_lo) * cols + tx.i1 - c_lo];
          v10 = region[(ty.i1 - r_lo) * cols + tx.i0 - c_lo];
          v11 = region[(ty.i1 - r_lo) * cols + tx.i1 - c_lo];
        } else {
          v00 = dot_at(proto_b, coeff, s.channels, plane, ty.i0 * s.w + tx.i0);
          v01 = dot_at(proto_b, coeff, s.channels, plane, ty.i0 * s.w + tx.i1);
          v10 = dot_at(proto_b, coeff, s.channels, plane, ty.i1 * s.w + tx.i0);
          v11 = dot_at(proto_b, coeff, s.channels, plane, ty.i1 * s.w + tx.i1);
        }
        v = ty.w0 * (tx.w0 * v00 + tx.w1 * v01) + ty.w1 * (tx.w0 * v10 + tx.w1 * v11);
      }
      pack.v[j] = finish<acc_t, out_t>(v, use_threshold, thr);
    }
    out_t* dst = out + n * out_plane + y * s.out_w + x0;
    if (s.out_w % kPixelsPerThread == 0) {  // x0 is a multiple of 4 and rows start 4-element aligned
      *reinterpret_cast<Pack4<out_t>*>(dst) = pack;
    } else {
#pragma unroll
      for (int j = 0; j < kPixelsPerThread; ++j) {
        if (x0 + j < s.out_w) dst[j] = pack.v[j];  // unrolled: pack stays in registers
      }
    }
  }

  // Phase 2: one warp per output row zero-fills the row outside its mask's box tiles.
  const int lane = tid % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  constexpr int64_t kVector = 16 / sizeof(out_t) > 0 ? 16 / sizeof(out_t) : 1;  // elements per 16-byte store
  const int64_t step = vector_rows ? kVector : 1;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + tid / 32; row < s.num * s.out_h;
       row += warps) {
    const int64_t n = row / s.out_h, y = row - n * s.out_h;
    const int4 t = tiles[n];
    const bool row_in_tiles = y >= static_cast<int64_t>(t.z) * kTile && y < static_cast<int64_t>(t.w) * kTile;
    const int64_t skip_lo = row_in_tiles ? static_cast<int64_t>(t.x) * kTile : 0;
    const int64_t skip_hi = row_in_tiles ? static_cast<int64_t>(t.y) * kTile : 0;
    out_t* dst = out + row * s.out_w;
    for (int64_t x = lane * step; x < s.out_w; x += 32 * step) {
      if (x >= skip_lo && x < skip_hi) continue;  // a 16-byte vector never straddles a tile edge
      if (vector_rows) {
        *reinterpret_cast<uint4*>(dst + x) = make_uint4(0u, 0u, 0u, 0u);
      } else {
        dst[x] = static_cast<out_t>(0);
      }
    }
  }
}

at::Tensor assemble_masks_cuda(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                               const at::Tensor& boxes, at::OptionalIntArrayRef out_size,
                               std::optional<double> threshold) {
  // image_index is range-checked by the kernel (device error flag): no host sync.
  check_mask_head_inputs(protos, coeffs, image_index, boxes, /*check_values=*/false);
  TORCH_CHECK_VALUE(protos.is_cuda(), "protos must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard device_guard(protos.device());
  const auto [out_h, out_w] = assembled_size(protos, out_size);
  const int64_t num = coeffs.size(0);
  const at::ScalarType out_dtype = threshold.has_value() ? at::kBool : protos.scalar_type();
  if (num == 0 || out_h == 0 || out_w == 0 || protos.size(2) == 0 || protos.size(3) == 0) {
    check_mask_head_inputs(protos, coeffs, image_index, boxes, /*check_values=*/true);  // no kernel: on the host
    return at::zeros({num, out_h, out_w}, protos.options().dtype(out_dtype));
  }
  TORCH_CHECK_VALUE(ceil_div<int64_t>(out_w, kTile) < INT32_MAX && ceil_div<int64_t>(out_h, kTile) < INT32_MAX,
                    "out_size too large for the CUDA kernel: ", out_h, "x", out_w);
  at::Tensor out = at::empty({num, out_h, out_w}, protos.options().dtype(out_dtype));
  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous();
  const at::Tensor idx = image_index.contiguous(), b = boxes.contiguous();
  AssembleShape shape{num, protos.size(1), protos.size(2), protos.size(3), out_h, out_w,
                      out_h != protos.size(2) || out_w != protos.size(3),
                      static_cast<float>(static_cast<double>(out_w) / static_cast<double>(protos.size(3))),
                      static_cast<float>(static_cast<double>(out_h) / static_cast<double>(protos.size(2)))};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor tiles = at::empty({num, 4}, protos.options().dtype(at::kInt));
  at::Tensor counts = at::empty({num}, protos.options().dtype(at::kLong));
  box_tiles_kernel<<<blocks_for(num), kThreadsPerBlock, 0, stream>>>(
      b.data_ptr<float>(), idx.data_ptr<int64_t>(), protos.size(0), shape,
      reinterpret_cast<int4*>(tiles.data_ptr<int32_t>()), counts.data_ptr<int64_t>(),
      device_error_flag(protos.device()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor tile_end = at::cumsum(counts, 0);

  // A persistent grid: a few blocks per SM loop over the tiles, then over the rows.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t row_blocks = ceil_div<int64_t>(num * out_h, kBlockThreads / 32);
  const int64_t most_tiles = num * ceil_div<int64_t>(out_h, kTile) * ceil_div<int64_t>(out_w, kTile);
  const unsigned int blocks =
      static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(8 * sms, std::max(row_blocks, most_tiles))));
  const double thr = threshold.value_or(0.0);  // narrowed to the accumulation type in the kernel, as on the CPU
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "assemble_masks_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t shared = static_cast<size_t>(protos.size(1)) * sizeof(acc_t);
    TORCH_CHECK_VALUE(shared + kRegionMax * sizeof(acc_t) <= 48 * 1024, "assemble_masks on CUDA supports at most ",
                      (48 * 1024 - kRegionMax * sizeof(acc_t)) / sizeof(acc_t), " prototype channels for ",
                      protos.scalar_type(), ", got ", protos.size(1));
    const int4* tile_ptr = reinterpret_cast<const int4*>(tiles.data_ptr<int32_t>());
    if (threshold.has_value()) {
      const bool vector_rows = (out_w * sizeof(bool)) % 16 == 0;
      assemble_masks_kernel<scalar_t, bool><<<blocks, kBlockThreads, shared, stream>>>(
          p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), b.data_ptr<float>(), tile_ptr,
          tile_end.data_ptr<int64_t>(), shape, true, thr, vector_rows, out.data_ptr<bool>());
    } else {
      const bool vector_rows = (out_w * sizeof(scalar_t)) % 16 == 0;
      assemble_masks_kernel<scalar_t, scalar_t><<<blocks, kBlockThreads, shared, stream>>>(
          p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), b.data_ptr<float>(), tile_ptr,
          tile_end.data_ptr<int64_t>(), shape, false, thr, vector_rows, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) { m.impl("assemble_masks", &assemble_masks_cuda); }

}  // namespace pyseg
