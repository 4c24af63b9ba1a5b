// CUDA kernel of assemble_masks.
//
// One block per (mask, 32x32 tile of output pixels); tiles outside the mask's box exit at once.
// With resizing, the block first computes the logits of the proto cells its tile samples (the
// tile's footprint plus a one-cell border) into shared memory, then every thread resamples its
// pixels from there (F.interpolate's align_corners=False rule), applies the sigmoid and writes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/assemble_masks.h"
#include "../ops/linear_tap.h"
#include "../ops/pixel_centres.h"
#include "helpers.cuh"

namespace pyseg {
namespace {

constexpr int kTile = 32;         // output pixels per tile side
constexpr int kRowsPerThread = 4;  // block is kTile x (kTile / kRowsPerThread) threads
constexpr int kRegionMax = 4608;  // proto cells cached per block

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

template <typename scalar_t, typename out_t>
__global__ void assemble_masks_kernel(const scalar_t* __restrict__ protos, const scalar_t* __restrict__ coeffs,
                                      const int64_t* __restrict__ image_index, const float* __restrict__ boxes,
                                      int64_t num, int64_t channels, int64_t h, int64_t w, int64_t out_h,
                                      int64_t out_w, bool resize, bool use_threshold, float threshold,
                                      out_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* coeff = reinterpret_cast<acc_t*>(shared_bytes);  // [channels]
  __shared__ acc_t region[kRegionMax];
  const int64_t plane = h * w;
  const float box_sx = static_cast<float>(static_cast<double>(out_w) / static_cast<double>(w));
  const float box_sy = static_cast<float>(static_cast<double>(out_h) / static_cast<double>(h));
  const acc_t src_sx = static_cast<acc_t>(w) / static_cast<acc_t>(out_w);
  const acc_t src_sy = static_cast<acc_t>(h) / static_cast<acc_t>(out_h);
  const acc_t thr = static_cast<acc_t>(threshold);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;

  for (int64_t n = blockIdx.z; n < num; n += gridDim.z) {
    const float* box = boxes + 4 * n;
    const PixelRange bx = centres_in(resize ? box[0] * box_sx : box[0], resize ? box[2] * box_sx : box[2], out_w);
    const PixelRange by = centres_in(resize ? box[1] * box_sy : box[1], resize ? box[3] * box_sy : box[3], out_h);
    const PixelRange xs{max_of<int64_t>(bx.lo, blockIdx.x * kTile), min_of<int64_t>(bx.hi, (blockIdx.x + 1) * kTile)};
    const PixelRange ys{max_of<int64_t>(by.lo, blockIdx.y * kTile), min_of<int64_t>(by.hi, (blockIdx.y + 1) * kTile)};
    if (xs.size() == 0 || ys.size() == 0) continue;  // uniform across the block

    const scalar_t* proto_b = protos + image_index[n] * channels * plane;
    __syncthreads();  // the previous mask's readers are done with coeff and region
    for (int64_t k = tid; k < channels; k += nthreads) coeff[k] = static_cast<acc_t>(coeffs[n * channels + k]);
    __syncthreads();

    out_t* out_n = out + n * out_h * out_w;
    const int64_t x = xs.lo + threadIdx.x;
    if (!resize) {
      for (int64_t y = ys.lo + threadIdx.y; y < ys.hi; y += blockDim.y) {
        if (x < xs.hi) {
          out_n[y * out_w + x] =
              finish<acc_t, out_t>(dot_at(proto_b, coeff, channels, plane, y * w + x), use_threshold, thr);
        }
      }
      continue;
    }

    const int64_t c_lo = linear_tap<acc_t>(xs.lo, src_sx, w).i0, c_hi = linear_tap<acc_t>(xs.hi - 1, src_sx, w).i1;
    const int64_t r_lo = linear_tap<acc_t>(ys.lo, src_sy, h).i0, r_hi = linear_tap<acc_t>(ys.hi - 1, src_sy, h).i1;
    const int64_t cols = c_hi - c_lo + 1, rows = r_hi - r_lo + 1;
    const bool cached = rows * cols <= kRegionMax;
    if (cached) {
      for (int64_t i = tid; i < rows * cols; i += nthreads) {
        region[i] = dot_at(proto_b, coeff, channels, plane, (r_lo + i / cols) * w + c_lo + i % cols);
      }
    }
    __syncthreads();
    if (x >= xs.hi) continue;
    const LinearTap<acc_t> tx = linear_tap<acc_t>(x, src_sx, w);
    for (int64_t y = ys.lo + threadIdx.y; y < ys.hi; y += blockDim.y) {
      const LinearTap<acc_t> ty = linear_tap<acc_t>(y, src_sy, h);
      acc_t v00, v01, v10, v11;
      if (cached) {
        v00 = region[(ty.i0 - r_lo) * cols + tx.i0 - c_lo];
        v01 = region[(ty.i0 - r_lo) * cols + tx.i1 - c_lo];
        v10 = region[(ty.i1 - r_lo) * cols + tx.i0 - c_lo];
        v11 = region[(ty.i1 - r_lo) * cols + tx.i1 - c_lo];
      } else {
        v00 = dot_at(proto_b, coeff, channels, plane, ty.i0 * w + tx.i0);
        v01 = dot_at(proto_b, coeff, channels, plane, ty.i0 * w + tx.i1);
        v10 = dot_at(proto_b, coeff, channels, plane, ty.i1 * w + tx.i0);
        v11 = dot_at(proto_b, coeff, channels, plane, ty.i1 * w + tx.i1);
      }
      const acc_t v = ty.w0 * (tx.w0 * v00 + tx.w1 * v01) + ty.w1 * (tx.w0 * v10 + tx.w1 * v11);
      out_n[y * out_w + x] = finish<acc_t, out_t>(v, use_threshold, thr);
    }
  }
}

at::Tensor assemble_masks_cuda(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                               const at::Tensor& boxes, at::OptionalIntArrayRef out_size,
                               std::optional<double> threshold) {
  check_mask_head_inputs(protos, coeffs, image_index, boxes);
  TORCH_CHECK_VALUE(protos.is_cuda(), "protos must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard device_guard(protos.device());
  const auto [out_h, out_w] = assembled_size(protos, out_size);
  const int64_t num = coeffs.size(0);
  const bool resize = out_h != protos.size(2) || out_w != protos.size(3);
  const at::ScalarType out_dtype = threshold.has_value() ? at::kBool : protos.scalar_type();
  at::Tensor out = at::zeros({num, out_h, out_w}, protos.options().dtype(out_dtype));
  if (num == 0 || out_h == 0 || out_w == 0 || protos.size(2) == 0 || protos.size(3) == 0) return out;

  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous();
  const at::Tensor idx = image_index.contiguous(), b = boxes.contiguous();
  const dim3 block(kTile, kTile / kRowsPerThread);
  const dim3 grid(static_cast<unsigned int>(ceil_div<int64_t>(out_w, kTile)),
                  static_cast<unsigned int>(ceil_div<int64_t>(out_h, kTile)),
                  static_cast<unsigned int>(std::min<int64_t>(num, 65535)));
  TORCH_CHECK_VALUE(grid.x <= 65535u * 32u && grid.y <= 65535u, "out_size too large for the CUDA kernel: ", out_h,
                    "x", out_w);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float thr = static_cast<float>(threshold.value_or(0.0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "assemble_masks_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t shared = static_cast<size_t>(protos.size(1)) * sizeof(acc_t);
    if (threshold.has_value()) {
      assemble_masks_kernel<scalar_t, bool><<<grid, block, shared, stream>>>(
          p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), b.data_ptr<float>(), num,
          protos.size(1), protos.size(2), protos.size(3), out_h, out_w, resize, true, thr, out.data_ptr<bool>());
    } else {
      assemble_masks_kernel<scalar_t, scalar_t><<<grid, block, shared, stream>>>(
          p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), b.data_ptr<float>(), num,
          protos.size(1), protos.size(2), protos.size(3), out_h, out_w, resize, false, thr, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) { m.impl("assemble_masks", &assemble_masks_cuda); }

}  // namespace pyseg
