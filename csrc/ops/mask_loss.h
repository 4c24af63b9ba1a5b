// Input checks and target access shared by the CPU and CUDA mask_loss kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace pyseg {

// Checks the mask_loss inputs (see mask_loss.cpp); raises ValueError naming the argument. With
// check_values (the CPU kernels), also the values of image_index and gt_index; the CUDA kernels
// check those on the device.
void check_mask_loss_inputs(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                            const at::Tensor& gt_masks, const at::Tensor& gt_index, const at::Tensor& boxes,
                            bool overlap, bool check_values);

// Checks grad_loss of mask_loss_backward: shape [N], on the device of protos.
void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& protos, const at::Tensor& coeffs);

// gt_masks in the dtype the kernels read: int32 for an overlap index map, uint8 for binary
// per-instance masks (bool or uint8), float32 for soft per-instance masks (any float dtype).
at::Tensor kernel_targets(const at::Tensor& gt_masks, bool overlap);

// Target of one pixel: an overlap map (int32) holds instance ids compared with the instance's id;
// binary and soft masks hold the target itself.
template <typename acc_t, typename target_t>
C10_HOST_DEVICE inline acc_t target_value(target_t v, int64_t id) {
  if constexpr (std::is_same_v<target_t, int32_t>) {
    return v == id ? acc_t(1) : acc_t(0);
  } else {
    return static_cast<acc_t>(v);
  }
}

// Calls fn(scalar_t(), target_t()) for the dtype of protos (float, double, half, bfloat16) and of
// the kernel targets (int32_t overlap map, uint8_t binary masks, float soft masks).
template <typename Fn>
void dispatch_mask_loss_types(const at::Tensor& protos, const at::Tensor& targets, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "mask_loss", [&] {
    switch (targets.scalar_type()) {
      case at::kInt:
        fn(scalar_t(), int32_t());
        break;
      case at::kByte:
        fn(scalar_t(), uint8_t());
        break;
      default:
        fn(scalar_t(), float());
    }
  });
}

}  // namespace pyseg
