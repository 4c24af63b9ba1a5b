// The device error flag: how CUDA kernels report bad input values without a host sync.
//
// A kernel that meets a value that would make it read or write out of bounds (or a NaN vertex)
// skips that item and ORs one of the bits below into a per-device int32 flag. The host reads and
// clears the flag once, when it chooses (pyseg._C.device_error_flag gives it to Python;
// pyseg.ops.check_device_errors raises the ValueError that names the input).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace pyseg {

constexpr int32_t kErrorPolygonOffsets = 1;  // poly_offsets not non-decreasing from 0 to V
constexpr int32_t kErrorMaskIndex = 2;       // poly_to_mask outside [0, num_masks)
constexpr int32_t kErrorImageIndex = 4;      // image_index outside [0, B)
constexpr int32_t kErrorNonFinite = 8;       // a NaN or inf vertex
constexpr int32_t kErrorTargetIndex = 16;    // gt_index outside the rows of gt_masks

// The flag of a CUDA device (allocated on first use, never freed).
int32_t* device_error_flag(const c10::Device& device);

// The flag of CUDA device device_index as an int32 tensor of shape [1] (for Python).
at::Tensor device_error_flag_tensor(int64_t device_index);

}  // namespace pyseg
