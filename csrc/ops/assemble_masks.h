// Input checks shared by the CPU and CUDA assemble_masks kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace pyseg {

// Checks that every value of index lies in [0, upper); one small host copy (a sync on CUDA).
void check_index_range(const at::Tensor& index, int64_t upper, const char* name, const char* upper_name);

// Checks protos [B, K, h, w], coeffs [N, K], image_index [N] (values in [0, B)) and boxes [N, 4];
// raises ValueError naming the argument. Shared by assemble_masks and mask_loss. With check_values
// (the CPU kernels), also checks the values of image_index; the CUDA kernels check them on the device.
void check_mask_head_inputs(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                            const at::Tensor& boxes, bool check_values);

// Output size (H, W) of assemble_masks: out_size when given, else the proto grid.
std::pair<int64_t, int64_t> assembled_size(const at::Tensor& protos, at::OptionalIntArrayRef out_size);

}  // namespace pyseg
