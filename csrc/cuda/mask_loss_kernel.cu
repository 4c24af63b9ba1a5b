// CUDA kernels of mask_loss and mask_loss_backward. Both are deterministic: no floating-point atomics.
//
// A first kernel turns each box into its proto pixels (empty, and reported through the device
// error flag, when the instance's image or target index is out of range). Forward: one block per
// instance reduces the BCE sum of its box in a fixed order. Backward, two kernels:
//   - dL/dcoeffs: each box is split into up to kStripes row stripes, one block each (so that a few
//     large boxes still fill the device); each thread keeps its own partial sums per channel in
//     shared memory, summed in a fixed order into one partial per stripe; the stripes are summed by
//     a reduction over that dimension.
//   - dL/dprotos: gathered, not scattered. A block owns a run of pixels of one image; each thread
//     walks the instances of that image (grouped by image on the device) whose box covers its
//     pixel, recomputes the logit and adds g * coeff into its own per-channel sums; the sums are
//     written once. No atomics, and the order of additions is the instance order.
// No [N, h, w] tensor is ever built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops/mask_loss.h"
#include "../ops/pixel_centres.h"
#include "device_errors.h"
#include "helpers.cuh"

namespace pyseg {
namespace {

constexpr int kStripes = 16;            // blocks per instance for dL/dcoeffs, at most
constexpr int kGradThreads = 128;       // threads per block of the backward kernels
constexpr size_t kSharedBudget = 40 * 1024;  // bytes of per-thread channel sums per block

// Proto pixels of instance n's box as {xs.lo, xs.hi, ys.lo, ys.hi}; empty for an invalid instance.
__global__ void instance_boxes_kernel(const float* __restrict__ boxes, const int64_t* __restrict__ image_index,
                                      const int64_t* __restrict__ gt_index, int64_t num, int64_t batch,
                                      int64_t target_rows, int64_t h, int64_t w, int4* __restrict__ pixels,
                                      int32_t* __restrict__ error_flag) {
  PYSEG_CUDA_1D_LOOP(n, num) {
    const int64_t b = image_index[n];
    bool valid = true;
    if (b < 0 || b >= batch) {
      atomicOr(error_flag, kErrorImageIndex);
      valid = false;
    }
    if (target_rows >= 0 && (gt_index[n] < 0 || gt_index[n] >= target_rows)) {
      atomicOr(error_flag, kErrorTargetIndex);
      valid = false;
    }
    const BoxPixels px = box_pixels(boxes + 4 * n, h, w);
    pixels[n] = valid && px.area() > 0 ? make_int4(static_cast<int>(px.xs.lo), static_cast<int>(px.xs.hi),
                                                   static_cast<int>(px.ys.lo), static_cast<int>(px.ys.hi))
                                       : make_int4(0, 0, 0, 0);
  }
}

__device__ inline int64_t box_area(int4 px) { return static_cast<int64_t>(px.y - px.x) * (px.w - px.z); }

// Where one instance reads its logit inputs and target.
template <typename scalar_t, typename target_t>
struct InstanceView {
  const scalar_t* proto_b;
  const target_t* target_plane;
  int64_t id;
};

template <typename scalar_t, typename target_t>
__device__ inline InstanceView<scalar_t, target_t> instance_view(const scalar_t* protos, const target_t* targets,
                                                                 const int64_t* image_index,
                                                                 const int64_t* gt_index, int64_t n,
                                                                 int64_t channels, int64_t plane) {
  constexpr bool kOverlap = std::is_same_v<target_t, int32_t>;
  const int64_t b = image_index[n];
  return {protos + b * channels * plane, targets + (kOverlap ? b : gt_index[n]) * plane, gt_index[n]};
}

template <typename scalar_t, typename target_t>
__global__ void mask_loss_forward_kernel(const scalar_t* __restrict__ protos, const scalar_t* __restrict__ coeffs,
                                         const int64_t* __restrict__ image_index, const target_t* __restrict__ targets,
                                         const int64_t* __restrict__ gt_index, const int4* __restrict__ pixels,
                                         int64_t num, int64_t channels, int64_t h, int64_t w,
                                         at::opmath_type<scalar_t>* __restrict__ loss) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* coeff = reinterpret_cast<acc_t*>(shared_bytes);
  __shared__ double warp_sums[32];
  const int64_t plane = h * w;
  for (int64_t n = blockIdx.x; n < num; n += gridDim.x) {
    const int4 px = pixels[n];
    const int64_t cols = px.y - px.x, area = box_area(px);
    if (area == 0) {
      if (threadIdx.x == 0) loss[n] = 0;
      continue;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < channels; k += blockDim.x) coeff[k] = static_cast<acc_t>(coeffs[n * channels + k]);
    __syncthreads();
    const auto in = instance_view(protos, targets, image_index, gt_index, n, channels, plane);
    double total = 0;
    for (int64_t i = threadIdx.x; i < area; i += blockDim.x) {
      const int64_t offset = (px.z + i / cols) * w + px.x + i % cols;
      acc_t z = 0;
      for (int64_t k = 0; k < channels; ++k) z += coeff[k] * static_cast<acc_t>(in.proto_b[k * plane + offset]);
      const acc_t t = target_value<acc_t>(in.target_plane[offset], in.id);
      total += static_cast<double>(max(z, acc_t(0)) - z * t + log1p(exp(-fabs(z))));
    }
    total = block_sum(total, warp_sums);
    if (threadIdx.x == 0) loss[n] = static_cast<acc_t>(total / static_cast<double>(area));
  }
}

// dL/dz of one pixel: (sigmoid(z) - target) * grad_loss[n] / area.
template <typename acc_t>
__device__ inline acc_t logit_grad(acc_t z, acc_t target, acc_t scale) {
  return (acc_t(1) / (acc_t(1) + exp(-z)) - target) * scale;
}

// partial[n, s, k] = sum over the pixels of stripe s of box n of dL/dz * protos[b, k]. Grid: (kStripes, N).
template <typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kGradThreads)
    coeff_grad_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss, const scalar_t* __restrict__ protos,
                      const scalar_t* __restrict__ coeffs, const int64_t* __restrict__ image_index,
                      const target_t* __restrict__ targets, const int64_t* __restrict__ gt_index,
                      const int4* __restrict__ pixels, int64_t num, int64_t channels, int64_t h, int64_t w,
                      at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* coeff = reinterpret_cast<acc_t*>(shared_bytes);  // [channels]
  acc_t* sums = coeff + channels;                         // [channels][blockDim.x + 1]
  const int64_t plane = h * w, pitch = blockDim.x + 1;    // +1: thread k's column sum avoids bank conflicts
  const int tid = threadIdx.x;
  for (int64_t n = blockIdx.y; n < num; n += gridDim.y) {
    acc_t* out = partial + (n * kStripes + blockIdx.x) * channels;
    const int4 px = pixels[n];
    const int64_t rows = px.w - px.z, cols = px.y - px.x;
    const int64_t stripes = min_of<int64_t>(kStripes, rows);
    if (box_area(px) == 0 || blockIdx.x >= stripes) {  // uniform across the block
      for (int64_t k = tid; k < channels; k += blockDim.x) out[k] = 0;
      continue;
    }
    const int64_t row_lo = px.z + rows * blockIdx.x / stripes, row_hi = px.z + rows * (blockIdx.x + 1) / stripes;
    __syncthreads();  // the previous instance's readers are done
    for (int64_t k = tid; k < channels; k += blockDim.x) coeff[k] = static_cast<acc_t>(coeffs[n * channels + k]);
    for (int64_t k = 0; k < channels; ++k) sums[k * pitch + tid] = 0;
    __syncthreads();
    const auto in = instance_view(protos, targets, image_index, gt_index, n, channels, plane);
    const acc_t scale = grad_loss[n] / static_cast<acc_t>(box_area(px));
    for (int64_t i = tid; i < (row_hi - row_lo) * cols; i += blockDim.x) {
      const int64_t offset = (row_lo + i / cols) * w + px.x + i % cols;
      acc_t z = 0;
      for (int64_t k = 0; k < channels; ++k) z += coeff[k] * static_cast<acc_t>(in.proto_b[k * plane + offset]);
      const acc_t g = logit_grad(z, target_value<acc_t>(in.target_plane[offset], in.id), scale);
      for (int64_t k = 0; k < channels; ++k) sums[k * pitch + tid] += g * static_cast<acc_t>(in.proto_b[k * plane + offset]);
    }
    __syncthreads();
    for (int64_t k = tid; k < channels; k += blockDim.x) {  // fixed order: thread 0's sum first
      acc_t total = 0;
      for (int64_t j = 0; j < blockDim.x; ++j) total += sums[k * pitch + j];
      out[k] = total;
    }
  }
}

// grad_protos[b, :, p] for the pixels p of this block: sum over the instances n of image b whose box
// covers p (in their order) of dL/dz_n(p) * coeffs[n]. Grid: (pixel runs, images).
template <typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kGradThreads)
    proto_grad_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss, const scalar_t* __restrict__ protos,
                      const scalar_t* __restrict__ coeffs, const int64_t* __restrict__ image_index,
                      const target_t* __restrict__ targets, const int64_t* __restrict__ gt_index,
                      const int4* __restrict__ pixels, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ begin, int64_t batch, int64_t channels, int64_t h, int64_t w,
                      at::opmath_type<scalar_t>* __restrict__ grad_protos) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* sums = reinterpret_cast<acc_t*>(shared_bytes);  // [channels][blockDim.x]
  const int64_t plane = h * w;
  const int tid = threadIdx.x;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  const int64_t block_row_lo = static_cast<int64_t>(blockIdx.x) * blockDim.x / w;
  const int64_t block_row_hi = min_of<int64_t>(plane - 1, static_cast<int64_t>(blockIdx.x + 1) * blockDim.x - 1) / w;
  const int64_t y = p / w, x = p - y * w;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t k = 0; k < channels; ++k) sums[k * blockDim.x + tid] = 0;
    for (int64_t j = begin[b]; j < begin[b + 1]; ++j) {
      const int64_t n = order[j];
      const int4 px = pixels[n];
      if (px.w <= block_row_lo || px.z > block_row_hi || box_area(px) == 0) continue;  // uniform: no row in common
      if (p >= plane || x < px.x || x >= px.y || y < px.z || y >= px.w) continue;
      const auto in = instance_view(protos, targets, image_index, gt_index, n, channels, plane);
      const scalar_t* coeff = coeffs + n * channels;
      acc_t z = 0;
      for (int64_t k = 0; k < channels; ++k) z += static_cast<acc_t>(coeff[k]) * static_cast<acc_t>(in.proto_b[k * plane + p]);
      const acc_t g = logit_grad(z, target_value<acc_t>(in.target_plane[p], in.id),
                                 grad_loss[n] / static_cast<acc_t>(box_area(px)));
      for (int64_t k = 0; k < channels; ++k) sums[k * blockDim.x + tid] += g * static_cast<acc_t>(coeff[k]);
    }
    if (p < plane) {
      for (int64_t k = 0; k < channels; ++k) grad_protos[(b * channels + k) * plane + p] = sums[k * blockDim.x + tid];
    }
  }
}

// Threads per backward block such that per-thread channel sums fit the shared budget.
int grad_threads(int64_t channels, size_t acc_size) {
  int threads = kGradThreads;
  while (threads > 32 && static_cast<size_t>(channels) * (threads + 1) * acc_size + channels * acc_size > kSharedBudget) {
    threads /= 2;
  }
  TORCH_CHECK_VALUE(static_cast<size_t>(channels) * 34 * acc_size <= kSharedBudget, "mask_loss on CUDA supports at most ",
                    kSharedBudget / (34 * acc_size), " prototype channels for this dtype, got ", channels);
  return threads;
}

// Proto pixels of every box (Tensor[N, 4] int32), validating image_index and gt_index on the device.
at::Tensor instance_pixels(const at::Tensor& boxes, const at::Tensor& image_index, const at::Tensor& gt_index,
                           const at::Tensor& protos, int64_t target_rows, cudaStream_t stream) {
  const int64_t num = boxes.size(0);
  at::Tensor pixels = at::empty({num, 4}, boxes.options().dtype(at::kInt));
  instance_boxes_kernel<<<blocks_for(num), kThreadsPerBlock, 0, stream>>>(
      boxes.data_ptr<float>(), image_index.data_ptr<int64_t>(), gt_index.data_ptr<int64_t>(), num, protos.size(0),
      target_rows, protos.size(2), protos.size(3), reinterpret_cast<int4*>(pixels.data_ptr<int32_t>()),
      device_error_flag(protos.device()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pixels;
}

at::Tensor mask_loss_cuda(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                          const at::Tensor& gt_masks, const at::Tensor& gt_index, const at::Tensor& boxes,
                          bool overlap) {
  // Index values are checked on the device (instance_boxes_kernel): no host sync.
  check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap, /*check_values=*/false);
  TORCH_CHECK_VALUE(protos.is_cuda(), "protos must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard device_guard(protos.device());
  const at::ScalarType acc_dtype = protos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num = coeffs.size(0);
  at::Tensor loss = at::empty({num}, protos.options().dtype(acc_dtype));
  if (num == 0) return loss;
  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous(), idx = image_index.contiguous();
  const at::Tensor targets = kernel_targets(gt_masks, overlap), gidx = gt_index.contiguous(), b = boxes.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor pixels = instance_pixels(b, idx, gidx, protos, overlap ? -1 : gt_masks.size(0), stream);
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(num, 65535));
  dispatch_mask_loss_types(protos, targets, [&](auto scalar, auto target) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(target);
    using acc_t = at::opmath_type<scalar_t>;
    grad_threads(protos.size(1), sizeof(acc_t));  // one channel limit for the forward and the backward
    mask_loss_forward_kernel<scalar_t, target_t><<<blocks, kThreadsPerBlock, protos.size(1) * sizeof(acc_t), stream>>>(
        p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), targets.data_ptr<target_t>(),
        gidx.data_ptr<int64_t>(), reinterpret_cast<const int4*>(pixels.data_ptr<int32_t>()), num, protos.size(1),
        protos.size(2), protos.size(3), loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> mask_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& protos,
                                                           const at::Tensor& coeffs, const at::Tensor& image_index,
                                                           const at::Tensor& gt_masks, const at::Tensor& gt_index,
                                                           const at::Tensor& boxes, bool overlap) {
  check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap, /*check_values=*/false);
  check_grad_loss(grad_loss, protos, coeffs);
  const c10::cuda::CUDAGuard device_guard(protos.device());
  const at::ScalarType acc_dtype = protos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num = coeffs.size(0), batch = protos.size(0), channels = protos.size(1);
  const int64_t plane = protos.size(2) * protos.size(3);
  if (num == 0 || plane == 0) {  // no kernel runs: check the values on the host, as the CPU does
    check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap, /*check_values=*/true);
    return {at::zeros(protos.sizes(), protos.options()), at::zeros(coeffs.sizes(), coeffs.options())};
  }
  at::Tensor grad_protos = at::empty(protos.sizes(), protos.options().dtype(acc_dtype));
  at::Tensor partial = at::empty({num, kStripes, channels}, protos.options().dtype(acc_dtype));
  const at::Tensor g = grad_loss.to(acc_dtype).contiguous();
  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous(), idx = image_index.contiguous();
  const at::Tensor targets = kernel_targets(gt_masks, overlap), gidx = gt_index.contiguous(), b = boxes.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor pixels = instance_pixels(b, idx, gidx, protos, overlap ? -1 : gt_masks.size(0), stream);
  const auto [order, begin] = group_by_key(idx, batch);
  dispatch_mask_loss_types(protos, targets, [&](auto scalar, auto target) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(target);
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = grad_threads(channels, sizeof(acc_t));
    const int4* px = reinterpret_cast<const int4*>(pixels.data_ptr<int32_t>());
    const dim3 coeff_grid(kStripes, static_cast<unsigned int>(std::min<int64_t>(num, 65535)));
    coeff_grad_kernel<scalar_t, target_t>
        <<<coeff_grid, threads, channels * (threads + 2) * sizeof(acc_t), stream>>>(
            g.data_ptr<acc_t>(), p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
            targets.data_ptr<target_t>(), gidx.data_ptr<int64_t>(), px, num, channels, protos.size(2),
            protos.size(3), partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (batch > 0) {  // no image: grad_protos is empty (every image_index is out of range, flagged above)
      const dim3 proto_grid(static_cast<unsigned int>(ceil_div<int64_t>(plane, threads)),
                            static_cast<unsigned int>(std::min<int64_t>(batch, 65535)));
      TORCH_CHECK_VALUE(ceil_div<int64_t>(plane, threads) <= INT32_MAX, "proto grid too large for CUDA: ", plane);
      proto_grad_kernel<scalar_t, target_t><<<proto_grid, threads, channels * threads * sizeof(acc_t), stream>>>(
          g.data_ptr<acc_t>(), p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          targets.data_ptr<target_t>(), gidx.data_ptr<int64_t>(), px, order.data_ptr<int64_t>(),
          begin.data_ptr<int64_t>(), batch, channels, protos.size(2), protos.size(3), grad_protos.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // Stripes summed by a reduction along one dimension: a fixed order, so run-to-run identical.
  const at::Tensor grad_coeffs = partial.sum(1);
  return {grad_protos.to(protos.scalar_type()), grad_coeffs.to(coeffs.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) {
  m.impl("mask_loss", &mask_loss_cuda);
  m.impl("mask_loss_backward", &mask_loss_backward_cuda);
}

}  // namespace pyseg
