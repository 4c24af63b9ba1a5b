// CUDA kernels of rasterize_polygons / rasterize_polygons_overlap.
//
// Polygons are grouped by mask and masks by image on the device (stable sort + searchsorted: CSR,
// as the CPU kernel does; no host sync). A block owns a chunk of rows of one mask (or one image)
// and builds the mask's interior on those rows as bits in shared memory: every edge is culled by
// its row range first (two compares, no division), then each crossing toggles the bit of the
// first pixel whose centre is at or right of it, and a prefix XOR along the row turns toggles
// into the even-odd interior (OR-ed over the mask's polygons). Work per polygon and chunk is
// O(edges + crossings + row words). The crossing arithmetic is the reference's (double, no
// contraction: __dadd_rn and friends), so results are bit-identical to the CPU kernel.
//
// rasterize_polygons writes every byte of its rows (zeros included: no separate fill);
// rasterize_polygons_overlap counts each mask's area in one pass, then paints each image's rows
// straight into the index map (no [M, h, w] intermediate). Inputs that would read or write out of
// bounds are skipped and reported through the device error flag (see device_errors.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/pixel_centres.h"
#include "../ops/rasterize_polygons.h"
#include "device_errors.h"
#include "helpers.cuh"

namespace pyseg {
namespace {

constexpr int kRowsPerChunkMax = 32;
constexpr int kBufferWordsMax = 4096;  // 16 KiB per bit buffer; two buffers per block

// Bit i of the result is the XOR of bits 0..i of v (bit 0 = leftmost pixel of the word).
__device__ inline uint32_t prefix_xor(uint32_t v) {
  v ^= v << 1;
  v ^= v << 2;
  v ^= v << 4;
  v ^= v << 8;
  v ^= v << 16;
  return v;
}

// Where the polygons of one call live, and their CSR grouping by mask.
struct PolygonBatch {
  const float* xy;            // [V, 2]
  const int64_t* offsets;     // [P + 1]
  const int64_t* poly_order;  // [P]: polygon ids sorted by mask
  const int64_t* poly_begin;  // [M + 1]: polygons of mask m are poly_order[poly_begin[m] : poly_begin[m + 1]]
  int64_t num_vertices, num_polys, num_masks, height, width;
  int words;                  // 32-bit words per row
  int32_t* error_flag;
};

// Reports, from one thread of the grid, inputs that the CSR grouping silently dropped.
__device__ inline void check_batch_once(const PolygonBatch& in) {
  if (blockIdx.x != 0 || blockIdx.y != 0 || threadIdx.x != 0) return;
  if (in.offsets[0] != 0 || in.offsets[in.num_polys] != in.num_vertices) {
    atomicOr(in.error_flag, kErrorPolygonOffsets);
  }
  if (in.poly_begin[0] != 0 || in.poly_begin[in.num_masks] != in.num_polys) {
    atomicOr(in.error_flag, kErrorMaskIndex);
  }
}

// Interior bits of mask m on rows [row0, row0 + chunk): bits[r * words + x / 32] bit x % 32 is pixel
// (x, row0 + r); bits past the width are 0. toggles is scratch of the same size. Called by every
// thread of the block; the bits are ready for every thread when it returns.
__device__ void mask_row_bits(const PolygonBatch& in, int64_t m, int64_t row0, int chunk, uint32_t* toggles,
                              uint32_t* bits) {
  const int words = in.words, total_words = chunk * words;
  const uint32_t last_word_mask = (in.width % 32) ? (1u << (in.width % 32)) - 1u : 0xffffffffu;
  __syncthreads();  // earlier readers of bits are done
  for (int i = threadIdx.x; i < total_words; i += blockDim.x) bits[i] = 0u;
  for (int64_t k = in.poly_begin[m]; k < in.poly_begin[m + 1]; ++k) {
    const int64_t p = in.poly_order[k];
    const int64_t first = in.offsets[p], last = in.offsets[p + 1];
    if (first < 0 || last > in.num_vertices || first > last) {  // uniform across the block
      if (threadIdx.x == 0) atomicOr(in.error_flag, kErrorPolygonOffsets);
      continue;
    }
    const int64_t n = last - first;
    if (n < 3) {  // draws nothing, but a NaN there is still bad input (as on the CPU)
      for (int64_t i = threadIdx.x; i < 2 * n; i += blockDim.x) {
        if (!isfinite(in.xy[2 * first + i])) atomicOr(in.error_flag, kErrorNonFinite);
      }
      continue;
    }
    for (int i = threadIdx.x; i < total_words; i += blockDim.x) toggles[i] = 0u;
    __syncthreads();
    const float* v = in.xy + 2 * first;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const int64_t e1 = (e + 1 == n) ? 0 : e + 1;
      const float fx0 = v[2 * e], fy0 = v[2 * e + 1], fy1 = v[2 * e1 + 1];
      if (!isfinite(fx0) || !isfinite(fy0)) atomicOr(in.error_flag, kErrorNonFinite);
      if (!(fy0 != fy1)) continue;  // horizontal (or NaN) edges cross no row centre
      // Rows whose centre yc has min(y) <= yc < max(y): exactly those the edge crosses.
      const PixelRange rows = centres_in(fminf(fy0, fy1), fmaxf(fy0, fy1), in.height);
      const int64_t lo = max_of<int64_t>(rows.lo, row0), hi = min_of<int64_t>(rows.hi, row0 + chunk);
      if (lo >= hi) continue;
      const double x0 = fx0, y0 = fy0, x1 = v[2 * e1], y1 = fy1;
      const double dx = __dsub_rn(x1, x0), dy = __dsub_rn(y1, y0);
      for (int64_t y = lo; y < hi; ++y) {
        const double yc = __dadd_rn(static_cast<double>(y), 0.5);
        const double x_cross = __dadd_rn(x0, __ddiv_rn(__dmul_rn(__dsub_rn(yc, y0), dx), dy));
        const int64_t x_start = first_centre_at_or_after(x_cross, in.width);
        if (x_start < in.width) {
          const int word = static_cast<int>(y - row0) * words + static_cast<int>(x_start >> 5);
          atomicXor(&toggles[word], 1u << static_cast<int>(x_start & 31));
        }
      }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < chunk; r += blockDim.x) {
      uint32_t carry = 0u;
      for (int wd = 0; wd < words; ++wd) {
        const uint32_t t = toggles[r * words + wd];
        uint32_t inside = prefix_xor(t) ^ carry;
        if (wd == words - 1) inside &= last_word_mask;
        bits[r * words + wd] |= inside;
        carry ^= (__popc(t) & 1) ? 0xffffffffu : 0u;
      }
    }
    __syncthreads();
  }
  __syncthreads();
}

// Rows handled per block: enough blocks for the device, at most what two bit buffers hold.
int rows_per_chunk(int64_t height, int64_t width, int64_t units) {
  const int words = static_cast<int>(ceil_div<int64_t>(width, 32));
  const int fit = std::max(1, std::min(kRowsPerChunkMax, kBufferWordsMax / words));
  const int64_t target_blocks = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t rows = ceil_div<int64_t>(height * std::max<int64_t>(units, 1), target_blocks);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(fit, rows)));
}

// masks[m, row0 : row0 + chunk, :] in {0, 1}, every byte written. Grid: (row chunks, masks).
__global__ void rasterize_rows_kernel(PolygonBatch in, int rows_per_chunk, uint8_t* __restrict__ masks) {
  extern __shared__ uint32_t shared_words[];
  uint32_t* toggles = shared_words;
  uint32_t* bits = shared_words + rows_per_chunk * in.words;
  check_batch_once(in);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int chunk = static_cast<int>(min_of<int64_t>(rows_per_chunk, in.height - row0));
  const int64_t width = in.width;
  for (int64_t m = blockIdx.y; m < in.num_masks; m += gridDim.y) {
    mask_row_bits(in, m, row0, chunk, toggles, bits);
    uint8_t* out = masks + (m * in.height + row0) * width;
    if (width % 4 == 0) {  // four pixels per 32-bit store (rows start 4-byte aligned)
      const int quads = static_cast<int>(width / 4);
      uint32_t* out4 = reinterpret_cast<uint32_t*>(out);
      for (int i = threadIdx.x; i < chunk * quads; i += blockDim.x) {
        const int r = i / quads, x = 4 * (i - r * quads);
        const uint32_t nibble = (bits[r * in.words + (x >> 5)] >> (x & 31)) & 0xfu;
        out4[i] = (nibble & 1u) | ((nibble >> 1) & 1u) << 8 | ((nibble >> 2) & 1u) << 16 | ((nibble >> 3) & 1u) << 24;
      }
    } else {
      const int width32 = static_cast<int>(width);  // < 2^17: capped by the bit buffers
      for (int i = threadIdx.x; i < chunk * width32; i += blockDim.x) {
        const int r = i / width32, x = i - r * width32;
        out[i] = static_cast<uint8_t>((bits[r * in.words + (x >> 5)] >> (x & 31)) & 1u);
      }
    }
  }
}

// areas[m] += pixels of mask m on this block's rows. Grid: (row chunks, masks).
__global__ void mask_area_kernel(PolygonBatch in, int rows_per_chunk, unsigned long long* __restrict__ areas) {
  extern __shared__ uint32_t shared_words[];
  __shared__ unsigned long long warp_sums[32];
  uint32_t* toggles = shared_words;
  uint32_t* bits = shared_words + rows_per_chunk * in.words;
  check_batch_once(in);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int chunk = static_cast<int>(min_of<int64_t>(rows_per_chunk, in.height - row0));
  for (int64_t m = blockIdx.y; m < in.num_masks; m += gridDim.y) {
    mask_row_bits(in, m, row0, chunk, toggles, bits);
    unsigned long long count = 0;
    for (int i = threadIdx.x; i < chunk * in.words; i += blockDim.x) count += __popc(bits[i]);
    count = block_sum(count, warp_sums);
    if (threadIdx.x == 0 && count > 0) atomicAdd(areas + m, count);
  }
}

// Masks of each image, in their given order (CSR), for the painter.
struct ImageGroups {
  const int64_t* mask_order;  // [M]: mask ids sorted by image (stable)
  const int64_t* mask_begin;  // [B + 1]
  int64_t num_images;
};

// index_map[b, row0 : row0 + chunk, :]: per pixel the rank (1-based, within image b, in the given
// order) of the smallest mask covering it, later ones winning ties; 0 where none does. Each
// thread owns the same pixels for every mask, so its own earlier writes are the state it compares
// with. Grid: (row chunks, images).
__global__ void paint_index_map_kernel(PolygonBatch in, ImageGroups groups, const int64_t* __restrict__ areas,
                                       int rows_per_chunk, int32_t* __restrict__ index_map) {
  extern __shared__ uint32_t shared_words[];
  uint32_t* toggles = shared_words;
  uint32_t* bits = shared_words + rows_per_chunk * in.words;
  check_batch_once(in);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 &&
      (groups.mask_begin[0] != 0 || groups.mask_begin[groups.num_images] != in.num_masks)) {
    atomicOr(in.error_flag, kErrorImageIndex);
  }
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int chunk = static_cast<int>(min_of<int64_t>(rows_per_chunk, in.height - row0));
  const int64_t width = in.width;
  const int words = in.words;
  for (int64_t b = blockIdx.y; b < groups.num_images; b += gridDim.y) {
    int32_t* map = index_map + (b * in.height + row0) * width;
    const int pixels = chunk * static_cast<int>(width);  // < 2^22: widths are capped by the bit buffers
    const int width32 = static_cast<int>(width);
    for (int i = threadIdx.x; i < pixels; i += blockDim.x) map[i] = 0;
    const int64_t first = groups.mask_begin[b], end = groups.mask_begin[b + 1];
    for (int64_t k = first; k < end; ++k) {
      const int64_t m = groups.mask_order[k];
      const int32_t rank = static_cast<int32_t>(k - first + 1);
      const int64_t area = areas[m];
      mask_row_bits(in, m, row0, chunk, toggles, bits);
      // Pixel i = r * width + x is owned by thread i % blockDim.x, as in the zero fill above.
      for (int i = threadIdx.x; i < pixels; i += blockDim.x) {
        const int r = i / width32, x = i - r * width32;
        if (!((bits[r * words + (x >> 5)] >> (x & 31)) & 1u)) continue;
        const int32_t current = map[i];
        if (current == 0 || area <= areas[groups.mask_order[first + current - 1]]) map[i] = rank;
      }
    }
  }
}

PolygonBatch polygon_batch(const at::Tensor& xy, const at::Tensor& offsets, const at::Tensor& poly_order,
                           const at::Tensor& poly_begin, int64_t num_masks, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(width <= 32 * kBufferWordsMax, "width must be <= ", 32 * kBufferWordsMax, " on CUDA, got ",
                    width);
  return PolygonBatch{xy.data_ptr<float>(),
                      offsets.data_ptr<int64_t>(),
                      poly_order.data_ptr<int64_t>(),
                      poly_begin.data_ptr<int64_t>(),
                      xy.size(0),
                      offsets.size(0) - 1,
                      num_masks,
                      height,
                      width,
                      static_cast<int>(ceil_div<int64_t>(width, 32)),
                      device_error_flag(xy.device())};
}

dim3 row_grid(int64_t height, int rows, int64_t units) {
  return dim3(static_cast<unsigned int>(ceil_div<int64_t>(height, rows)),
              static_cast<unsigned int>(std::min<int64_t>(units, 65535)));
}

size_t buffer_bytes(const PolygonBatch& in, int rows) {
  return 2 * static_cast<size_t>(rows) * in.words * sizeof(uint32_t);
}

at::Tensor rasterize_polygons_cuda(const at::Tensor& vertices, const at::Tensor& poly_offsets,
                                   const at::Tensor& poly_to_mask, int64_t num_masks, int64_t height,
                                   int64_t width) {
  // Value checks (offsets, mask indices, finite vertices) run in the kernel: no host sync.
  check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/false);
  TORCH_CHECK_VALUE(vertices.is_cuda(), "vertices must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard device_guard(vertices.device());
  if (num_masks == 0 || height == 0 || width == 0) {  // no kernel runs: check the values on the host, as the CPU does
    check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/true);
    return at::zeros({num_masks, height, width}, vertices.options().dtype(at::kByte));
  }
  at::Tensor masks = at::empty({num_masks, height, width}, vertices.options().dtype(at::kByte));
  const at::Tensor xy = vertices.contiguous(), offsets = poly_offsets.contiguous();
  const auto [poly_order, poly_begin] = group_by_key(poly_to_mask, num_masks);
  const PolygonBatch in = polygon_batch(xy, offsets, poly_order, poly_begin, num_masks, height, width);
  const int rows = rows_per_chunk(height, width, num_masks);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  rasterize_rows_kernel<<<row_grid(height, rows, num_masks), kThreadsPerBlock, buffer_bytes(in, rows), stream>>>(
      in, rows, masks.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return masks;
}

std::tuple<at::Tensor, at::Tensor> rasterize_polygons_overlap_cuda(
    const at::Tensor& vertices, const at::Tensor& poly_offsets, const at::Tensor& poly_to_mask,
    const at::Tensor& image_index, int64_t num_images, int64_t height, int64_t width) {
  const int64_t num_masks = image_index.dim() == 1 ? image_index.size(0) : -1;
  check_image_index(image_index, num_masks, num_images, /*check_values=*/false);
  check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/false);
  TORCH_CHECK_VALUE(vertices.is_cuda(), "vertices must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK_VALUE(image_index.device() == vertices.device(), "image_index must be on the device of vertices");
  const c10::cuda::CUDAGuard device_guard(vertices.device());
  at::Tensor areas = at::zeros({num_masks}, vertices.options().dtype(at::kLong));
  if (num_images == 0 || height == 0 || width == 0) {  // no kernel runs: check the values on the host, as the CPU does
    check_image_index(image_index, num_masks, num_images, /*check_values=*/true);
    check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/true);
    return {at::zeros({num_images, height, width}, vertices.options().dtype(at::kInt)), areas};
  }
  at::Tensor index_map = at::empty({num_images, height, width}, vertices.options().dtype(at::kInt));
  const at::Tensor xy = vertices.contiguous(), offsets = poly_offsets.contiguous();
  const auto [poly_order, poly_begin] = group_by_key(poly_to_mask, num_masks);
  const auto [mask_order, mask_begin] = group_by_key(image_index, num_images);
  const PolygonBatch in = polygon_batch(xy, offsets, poly_order, poly_begin, num_masks, height, width);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (num_masks > 0) {
    const int rows = rows_per_chunk(height, width, num_masks);
    mask_area_kernel<<<row_grid(height, rows, num_masks), kThreadsPerBlock, buffer_bytes(in, rows), stream>>>(
        in, rows, reinterpret_cast<unsigned long long*>(areas.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const ImageGroups groups{mask_order.data_ptr<int64_t>(), mask_begin.data_ptr<int64_t>(), num_images};
  const int rows = rows_per_chunk(height, width, num_images);
  paint_index_map_kernel<<<row_grid(height, rows, num_images), kThreadsPerBlock, buffer_bytes(in, rows), stream>>>(
      in, groups, areas.data_ptr<int64_t>(), rows, index_map.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index_map, areas};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) {
  m.impl("rasterize_polygons", &rasterize_polygons_cuda);
  m.impl("rasterize_polygons_overlap", &rasterize_polygons_overlap_cuda);
}

}  // namespace pyseg
