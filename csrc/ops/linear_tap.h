// Bilinear resampling rule of F.interpolate(mode="bilinear", align_corners=False), shared by the
// CPU and CUDA assemble_masks kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace pyseg {

// The two source cells of one output coordinate and their weights.
template <typename acc_t>
struct LinearTap {
  int64_t i0, i1;
  acc_t w0, w1;
};

// Output coordinate dst of an axis resized from in_size cells; scale = in_size / out_size.
template <typename acc_t>
C10_HOST_DEVICE inline LinearTap<acc_t> linear_tap(int64_t dst, acc_t scale, int64_t in_size) {
  acc_t src = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (src < 0) src = 0;
  const int64_t i0 = static_cast<int64_t>(src);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const acc_t w1 = src - static_cast<acc_t>(i0);
  return {i0, i1, static_cast<acc_t>(1) - w1, w1};
}

}  // namespace pyseg
