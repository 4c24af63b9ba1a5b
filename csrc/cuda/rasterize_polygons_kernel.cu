// CUDA kernel of rasterize_polygons / rasterize_polygons_overlap.
//
// One block per polygon walks its rows in chunks. For each chunk it marks every edge crossing as
// one toggled bit (the first pixel whose centre is at or right of the crossing) in a shared-memory bit row, turns the
// toggles into the even-odd interior with a prefix XOR along the row, and ORs the set pixels into
// the mask: O(edges + pixels) per row. The crossing arithmetic is the reference's (double, no
// contraction: __dadd_rn and friends), so results are bit-identical to the CPU kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

#include "../ops/pixel_centres.h"
#include "../ops/rasterize_polygons.h"
#include "helpers.cuh"

namespace pyseg {
namespace {

constexpr int kRowsPerChunkMax = 32;
constexpr int kSharedWordsMax = 8192;  // 32 KiB of toggle bits per block

// Bit i of the result is the XOR of bits 0..i of v (bit 0 = leftmost pixel of the word).
__device__ inline uint32_t prefix_xor(uint32_t v) {
  v ^= v << 1;
  v ^= v << 2;
  v ^= v << 4;
  v ^= v << 8;
  v ^= v << 16;
  return v;
}

__device__ inline float warp_min(float v) {
  for (int o = 16; o > 0; o /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__global__ void fill_polygons_kernel(const float* __restrict__ xy, const int64_t* __restrict__ offsets,
                                     const int64_t* __restrict__ poly_to_mask, int64_t height, int64_t width,
                                     int rows_per_chunk, uint8_t* __restrict__ masks) {
  extern __shared__ uint32_t toggles[];  // [rows_per_chunk][words]
  __shared__ float bounds[4][32];        // per-warp x_min, x_max, y_min, y_max
  const int64_t poly = blockIdx.x;
  const int64_t first = offsets[poly], n = offsets[poly + 1] - first;
  if (n < 3) return;
  const float* v = xy + 2 * first;
  const int words = static_cast<int>(ceil_div<int64_t>(width, 32));

  float x_min = FLT_MAX, x_max = -FLT_MAX, y_min = FLT_MAX, y_max = -FLT_MAX;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    x_min = fminf(x_min, v[2 * i]);
    x_max = fmaxf(x_max, v[2 * i]);
    y_min = fminf(y_min, v[2 * i + 1]);
    y_max = fmaxf(y_max, v[2 * i + 1]);
  }
  x_min = warp_min(x_min);
  x_max = warp_max(x_max);
  y_min = warp_min(y_min);
  y_max = warp_max(y_max);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  if (lane == 0) {
    bounds[0][warp] = x_min;
    bounds[1][warp] = x_max;
    bounds[2][warp] = y_min;
    bounds[3][warp] = y_max;
  }
  __syncthreads();
  x_min = bounds[0][0];
  x_max = bounds[1][0];
  y_min = bounds[2][0];
  y_max = bounds[3][0];
  for (int i = 1; i < num_warps; ++i) {
    x_min = fminf(x_min, bounds[0][i]);
    x_max = fmaxf(x_max, bounds[1][i]);
    y_min = fminf(y_min, bounds[2][i]);
    y_max = fmaxf(y_max, bounds[3][i]);
  }

  const PixelRange rows = centres_in(y_min, y_max, height);
  if (rows.size() == 0) return;
  // Pixels left of x_min see no crossing and pixels right of x_max see all of them (an even number).
  const int64_t col_lo = max_of<int64_t>(0, static_cast<int64_t>(floor(static_cast<double>(x_min))) - 1);
  const int64_t col_hi = min_of<int64_t>(width, static_cast<int64_t>(ceil(static_cast<double>(x_max))) + 2);
  if (col_lo >= col_hi) return;
  uint8_t* mask = masks + poly_to_mask[poly] * height * width;

  for (int64_t row0 = rows.lo; row0 < rows.hi; row0 += rows_per_chunk) {
    const int chunk = static_cast<int>(min_of<int64_t>(rows_per_chunk, rows.hi - row0));
    for (int i = threadIdx.x; i < chunk * words; i += blockDim.x) toggles[i] = 0u;
    __syncthreads();

    for (int64_t pair = threadIdx.x; pair < n * chunk; pair += blockDim.x) {
      const int64_t e = pair / chunk;
      const int r = static_cast<int>(pair % chunk);
      const int64_t e1 = (e + 1 == n) ? 0 : e + 1;
      const double y0 = v[2 * e + 1], y1 = v[2 * e1 + 1];
      const double yc = static_cast<double>(row0 + r) + 0.5;
      if ((y0 <= yc) == (y1 <= yc)) continue;
      const double x0 = v[2 * e], x1 = v[2 * e1];
      const double num = __dmul_rn(__dsub_rn(yc, y0), __dsub_rn(x1, x0));
      const double x_cross = __dadd_rn(x0, __ddiv_rn(num, __dsub_rn(y1, y0)));
      const int64_t x_start = first_centre_at_or_after(x_cross, width);
      if (x_start < width) {
        atomicXor(&toggles[r * words + static_cast<int>(x_start / 32)], 1u << static_cast<int>(x_start % 32));
      }
    }
    __syncthreads();

    for (int r = threadIdx.x; r < chunk; r += blockDim.x) {
      uint32_t carry = 0u;
      for (int wd = 0; wd < words; ++wd) {
        const uint32_t t = toggles[r * words + wd];
        toggles[r * words + wd] = prefix_xor(t) ^ carry;
        carry ^= (__popc(t) & 1) ? 0xffffffffu : 0u;
      }
    }
    __syncthreads();

    const int64_t cols = col_hi - col_lo;
    for (int64_t i = threadIdx.x; i < chunk * cols; i += blockDim.x) {
      const int r = static_cast<int>(i / cols);
      const int64_t x = col_lo + i % cols;
      if ((toggles[r * words + static_cast<int>(x / 32)] >> (x % 32)) & 1u) {
        mask[(row0 + r) * width + x] = 1;
      }
    }
    __syncthreads();
  }
}

// map[b, p] = rank (1-based, within image b) of the smallest instance covering p; ties go to the later one.
__global__ void overlap_index_kernel(const uint8_t* __restrict__ masks, const int64_t* __restrict__ image_index,
                                     const int64_t* __restrict__ areas, int64_t num_masks, int64_t num_images,
                                     int64_t plane, int32_t* __restrict__ index_map) {
  PYSEG_CUDA_1D_LOOP(i, num_images * plane) {
    const int64_t b = i / plane, p = i % plane;
    int32_t rank = 0, best = 0;
    int64_t best_area = INT64_MAX;
    for (int64_t m = 0; m < num_masks; ++m) {
      if (image_index[m] != b) continue;
      ++rank;
      if (masks[m * plane + p] && areas[m] <= best_area) {
        best_area = areas[m];
        best = rank;
      }
    }
    index_map[i] = best;
  }
}

at::Tensor rasterize_polygons_cuda(const at::Tensor& vertices, const at::Tensor& poly_offsets,
                                   const at::Tensor& poly_to_mask, int64_t num_masks, int64_t height,
                                   int64_t width) {
  check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/true);
  TORCH_CHECK_VALUE(vertices.is_cuda(), "vertices must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK_VALUE(width <= 32 * kSharedWordsMax, "width must be <= ", 32 * kSharedWordsMax, " on CUDA, got ", width);
  const c10::cuda::CUDAGuard device_guard(vertices.device());
  at::Tensor masks = at::zeros({num_masks, height, width}, vertices.options().dtype(at::kByte));
  const int64_t num_polys = poly_offsets.size(0) - 1;
  if (num_masks == 0 || num_polys == 0 || height == 0 || width == 0) return masks;

  const at::Tensor xy = vertices.contiguous(), offsets = poly_offsets.contiguous(), owner = poly_to_mask.contiguous();
  const int words = static_cast<int>(ceil_div<int64_t>(width, 32));
  const int rows_per_chunk = std::max(1, std::min(kRowsPerChunkMax, kSharedWordsMax / words));
  const size_t shared_bytes = static_cast<size_t>(rows_per_chunk) * words * sizeof(uint32_t);
  TORCH_CHECK(num_polys <= INT32_MAX, "at most 2^31 - 1 polygons per call, got ", num_polys);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  fill_polygons_kernel<<<static_cast<unsigned int>(num_polys), kThreadsPerBlock, shared_bytes, stream>>>(
      xy.data_ptr<float>(), offsets.data_ptr<int64_t>(), owner.data_ptr<int64_t>(), height, width, rows_per_chunk,
      masks.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return masks;
}

std::tuple<at::Tensor, at::Tensor> rasterize_polygons_overlap_cuda(
    const at::Tensor& vertices, const at::Tensor& poly_offsets, const at::Tensor& poly_to_mask,
    const at::Tensor& image_index, int64_t num_images, int64_t height, int64_t width) {
  const int64_t num_masks = image_index.dim() == 1 ? image_index.size(0) : -1;
  check_image_index(image_index, num_masks, num_images, /*check_values=*/true);
  TORCH_CHECK_VALUE(image_index.device() == vertices.device(), "image_index must be on the device of vertices");
  const c10::cuda::CUDAGuard device_guard(vertices.device());
  const at::Tensor masks = rasterize_polygons_cuda(vertices, poly_offsets, poly_to_mask, num_masks, height, width);
  const at::Tensor areas = masks.sum({1, 2}, /*keepdim=*/false, at::kLong);
  at::Tensor index_map = at::zeros({num_images, height, width}, vertices.options().dtype(at::kInt));
  const int64_t plane = height * width;
  if (num_masks == 0 || num_images == 0 || plane == 0) return {index_map, areas};
  const at::Tensor image_of = image_index.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  overlap_index_kernel<<<blocks_for(num_images * plane), kThreadsPerBlock, 0, stream>>>(
      masks.data_ptr<uint8_t>(), image_of.data_ptr<int64_t>(), areas.data_ptr<int64_t>(), num_masks, num_images,
      plane, index_map.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index_map, areas};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) {
  m.impl("rasterize_polygons", &rasterize_polygons_cuda);
  m.impl("rasterize_polygons_overlap", &rasterize_polygons_overlap_cuda);
}

}  // namespace pyseg
