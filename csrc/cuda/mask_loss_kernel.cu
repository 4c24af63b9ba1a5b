// CUDA kernels of mask_loss and mask_loss_backward.
//
// One block per instance walks the pixels of its box: the forward pass reduces the BCE sum in the
// block (deterministic); the backward pass recomputes each logit, adds g * coeff into the proto
// gradient with atomics (boxes of one image may overlap) and reduces g * proto per channel in
// shared memory. No [N, h, w] tensor is ever built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops/mask_loss.h"
#include "../ops/pixel_centres.h"
#include "helpers.cuh"

namespace pyseg {
namespace {

template <typename scalar_t, typename target_t>
__global__ void mask_loss_forward_kernel(const scalar_t* __restrict__ protos, const scalar_t* __restrict__ coeffs,
                                         const int64_t* __restrict__ image_index, const target_t* __restrict__ targets,
                                         const int64_t* __restrict__ gt_index, const float* __restrict__ boxes,
                                         int64_t num, int64_t channels, int64_t h, int64_t w,
                                         at::opmath_type<scalar_t>* __restrict__ loss) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kOverlap = std::is_same_v<target_t, int32_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* coeff = reinterpret_cast<acc_t*>(shared_bytes);
  __shared__ double warp_sums[32];
  const int64_t plane = h * w;
  for (int64_t n = blockIdx.x; n < num; n += gridDim.x) {
    const BoxPixels box = box_pixels(boxes + 4 * n, h, w);
    const int64_t cols = box.xs.size(), area = box.area();
    if (area == 0) {
      if (threadIdx.x == 0) loss[n] = 0;
      continue;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < channels; k += blockDim.x) coeff[k] = static_cast<acc_t>(coeffs[n * channels + k]);
    __syncthreads();
    const scalar_t* proto_b = protos + image_index[n] * channels * plane;
    const target_t* target_plane = targets + (kOverlap ? image_index[n] : gt_index[n]) * plane;
    const int64_t id = gt_index[n];
    double total = 0;
    for (int64_t i = threadIdx.x; i < area; i += blockDim.x) {
      const int64_t offset = (box.ys.lo + i / cols) * w + box.xs.lo + i % cols;
      acc_t z = 0;
      for (int64_t k = 0; k < channels; ++k) z += coeff[k] * static_cast<acc_t>(proto_b[k * plane + offset]);
      const acc_t t = target_value<acc_t>(target_plane[offset], id);
      total += static_cast<double>(max(z, acc_t(0)) - z * t + log1p(exp(-fabs(z))));
    }
    total = block_sum(total, warp_sums);
    if (threadIdx.x == 0) loss[n] = static_cast<acc_t>(total / static_cast<double>(area));
  }
}

template <typename scalar_t, typename target_t>
__global__ void mask_loss_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                          const scalar_t* __restrict__ protos, const scalar_t* __restrict__ coeffs,
                                          const int64_t* __restrict__ image_index,
                                          const target_t* __restrict__ targets, const int64_t* __restrict__ gt_index,
                                          const float* __restrict__ boxes, int64_t num, int64_t channels, int64_t h,
                                          int64_t w, at::opmath_type<scalar_t>* __restrict__ grad_protos,
                                          at::opmath_type<scalar_t>* __restrict__ grad_coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kOverlap = std::is_same_v<target_t, int32_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* coeff = reinterpret_cast<acc_t*>(shared_bytes);  // [channels]
  acc_t* d_coeff = coeff + channels;                      // [channels]
  const int64_t plane = h * w;
  for (int64_t n = blockIdx.x; n < num; n += gridDim.x) {
    const BoxPixels box = box_pixels(boxes + 4 * n, h, w);
    const int64_t cols = box.xs.size(), area = box.area();
    if (area == 0) {
      for (int64_t k = threadIdx.x; k < channels; k += blockDim.x) grad_coeffs[n * channels + k] = 0;
      continue;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < channels; k += blockDim.x) {
      coeff[k] = static_cast<acc_t>(coeffs[n * channels + k]);
      d_coeff[k] = 0;
    }
    __syncthreads();
    const int64_t b = image_index[n];
    const scalar_t* proto_b = protos + b * channels * plane;
    acc_t* grad_proto_b = grad_protos + b * channels * plane;
    const target_t* target_plane = targets + (kOverlap ? b : gt_index[n]) * plane;
    const int64_t id = gt_index[n];
    const acc_t scale = grad_loss[n] / static_cast<acc_t>(area);
    // Every thread runs the same number of iterations so that whole warps can reduce together.
    for (int64_t base = 0; base < area; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const bool active = i < area;
      const int64_t offset = active ? (box.ys.lo + i / cols) * w + box.xs.lo + i % cols : 0;
      acc_t g = 0;
      if (active) {
        acc_t z = 0;
        for (int64_t k = 0; k < channels; ++k) z += coeff[k] * static_cast<acc_t>(proto_b[k * plane + offset]);
        const acc_t sig = acc_t(1) / (acc_t(1) + exp(-z));
        g = (sig - target_value<acc_t>(target_plane[offset], id)) * scale;
      }
      for (int64_t k = 0; k < channels; ++k) {
        acc_t part = 0;
        if (active) {
          part = g * static_cast<acc_t>(proto_b[k * plane + offset]);
          atomicAdd(grad_proto_b + k * plane + offset, g * coeff[k]);
        }
        for (int o = 16; o > 0; o /= 2) part += __shfl_down_sync(0xffffffffu, part, o);
        if (threadIdx.x % 32 == 0) atomicAdd(d_coeff + k, part);
      }
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < channels; k += blockDim.x) grad_coeffs[n * channels + k] = d_coeff[k];
  }
}

at::Tensor mask_loss_cuda(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                          const at::Tensor& gt_masks, const at::Tensor& gt_index, const at::Tensor& boxes,
                          bool overlap) {
  check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap);
  TORCH_CHECK_VALUE(protos.is_cuda(), "protos must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard device_guard(protos.device());
  const at::ScalarType acc_dtype = protos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num = coeffs.size(0);
  at::Tensor loss = at::zeros({num}, protos.options().dtype(acc_dtype));
  if (num == 0) return loss;
  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous(), idx = image_index.contiguous();
  const at::Tensor targets = kernel_targets(gt_masks, overlap), gidx = gt_index.contiguous(), b = boxes.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(num, 65535));
  dispatch_mask_loss_types(protos, targets, [&](auto scalar, auto target) {
    using scalar_t = decltype(scalar);
    using target_t = decltype(target);
    using acc_t = at::opmath_type<scalar_t>;
    mask_loss_forward_kernel<scalar_t, target_t><<<blocks, kThreadsPerBlock, protos.size(1) * sizeof(acc_t), stream>>>(
        p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), targets.data_ptr<target_t>(),
        gidx.data_ptr<int64_t>(), b.data_ptr<float>(), num, protos.size(1), protos.size(2), protos.size(3),
        loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> mask_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& protos,
                                                           const at::Tensor& coeffs, const at::Tensor& image_index,
                                                           const at::Tensor& gt_masks, const at::Tensor& gt_index,
                                                           const at::Tensor& boxes, bool overlap) {
  check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == coeffs.size(0),
                    "grad_loss must have shape [N] = [", coeffs.size(0), "], got ", grad_loss.sizes());
  const c10::cuda::CUDAGuard device_guard(protos.device());
  const at::ScalarType acc_dtype = protos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_protos = at::zeros(protos.sizes(), protos.options().dtype(acc_dtype));
  at::Tensor grad_coeffs = at::zeros(coeffs.sizes(), coeffs.options().dtype(acc_dtype));
  const int64_t num = coeffs.size(0);
  if (num > 0) {
    const at::Tensor g = grad_loss.to(acc_dtype).contiguous();
    const at::Tensor p = protos.contiguous(), c = coeffs.contiguous(), idx = image_index.contiguous();
    const at::Tensor targets = kernel_targets(gt_masks, overlap), gidx = gt_index.contiguous(), b = boxes.contiguous();
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(num, 65535));
    dispatch_mask_loss_types(protos, targets, [&](auto scalar, auto target) {
      using scalar_t = decltype(scalar);
      using target_t = decltype(target);
      using acc_t = at::opmath_type<scalar_t>;
      mask_loss_backward_kernel<scalar_t, target_t>
          <<<blocks, kThreadsPerBlock, 2 * protos.size(1) * sizeof(acc_t), stream>>>(
              g.data_ptr<acc_t>(), p.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
              targets.data_ptr<target_t>(), gidx.data_ptr<int64_t>(), b.data_ptr<float>(), num, protos.size(1),
              protos.size(2), protos.size(3), grad_protos.data_ptr<acc_t>(), grad_coeffs.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_protos.to(protos.scalar_type()), grad_coeffs.to(coeffs.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) {
  m.impl("mask_loss", &mask_loss_cuda);
  m.impl("mask_loss_backward", &mask_loss_backward_cuda);
}

}  // namespace pyseg
