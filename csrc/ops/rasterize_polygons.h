// Input checks shared by the CPU and CUDA rasterization kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyseg {

// Checks shapes, dtypes and devices of a polygon batch; raises ValueError naming the argument.
// With check_values, also checks that vertices are finite and offsets/indices are in range
// (this reads the data, so on CUDA it copies the small index tensors to the host).
void check_polygon_inputs(
    const at::Tensor& vertices,
    const at::Tensor& poly_offsets,
    const at::Tensor& poly_to_mask,
    int64_t num_masks,
    int64_t height,
    int64_t width,
    bool check_values);

// Checks image_index [M] of rasterize_polygons_overlap against num_images.
void check_image_index(const at::Tensor& image_index, int64_t num_masks, int64_t num_images, bool check_values);

}  // namespace pyseg
