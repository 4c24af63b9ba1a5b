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
// scale * (dst + 0.5) - 0.5 rounded after each operation: nvcc would otherwise fuse it into an FMA and
// move a source coordinate by an ulp against the CPU kernel.
C10_HOST_DEVICE inline float source_coordinate(int64_t dst, float scale) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(__fmul_rn(scale, __fadd_rn(static_cast<float>(dst), 0.5f)), 0.5f);
#else
  return scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
#endif
}
C10_HOST_DEVICE inline double source_coordinate(int64_t dst, double scale) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(__dmul_rn(scale, __dadd_rn(static_cast<double>(dst), 0.5)), 0.5);
#else
  return scale * (static_cast<double>(dst) + 0.5) - 0.5;
#endif
}

template <typename acc_t>
C10_HOST_DEVICE inline LinearTap<acc_t> linear_tap(int64_t dst, acc_t scale, int64_t in_size) {
  acc_t src = source_coordinate(dst, scale);
  if (src < 0) src = 0;
  const int64_t i0 = static_cast<int64_t>(src);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const acc_t w1 = src - static_cast<acc_t>(i0);
  return {i0, i1, static_cast<acc_t>(1) - w1, w1};
}

}  // namespace pyseg
