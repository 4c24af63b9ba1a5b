// Small CUDA helpers shared by pyseg's kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <utility>

namespace pyseg {

constexpr int kThreadsPerBlock = 256;

template <typename T>
__host__ __device__ inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ inline T min_of(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
__host__ __device__ inline T max_of(T a, T b) {
  return a < b ? b : a;
}

// Grid-stride loop over [0, n).
#define PYSEG_CUDA_1D_LOOP(i, n)                                                                  \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);          \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Blocks for a grid-stride loop over n items, capped so that huge inputs loop instead.
inline unsigned int blocks_for(int64_t n, int threads = kThreadsPerBlock) {
  const int64_t blocks = ceil_div<int64_t>(n, threads);
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
template <typename T>
__device__ inline T block_sum(T v, T* shared_warp_sums) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared_warp_sums[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += shared_warp_sums[i];
  }
  __syncthreads();
  return total;
}

// CSR grouping on the device (no host sync): order sorts keys stably, and the items of group g are
// order[begin[g] : begin[g + 1]]. Keys outside [0, groups) fall outside every group. Returns {order, begin}.
inline std::pair<at::Tensor, at::Tensor> group_by_key(const at::Tensor& keys, int64_t groups) {
  const auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor bounds = at::arange(groups + 1, keys.options());
  return {order.contiguous(), at::searchsorted(sorted, bounds).contiguous()};
}

}  // namespace pyseg
