// CPU kernel of assemble_masks.
//
// Per mask: the logits coeffs_n . protos_b are computed only on the proto cells that the box's
// output pixels sample (the box plus a one-cell border), then each output pixel inside the box is
// bilinearly resampled (F.interpolate's align_corners=False rule), passed through a sigmoid and
// optionally thresholded. Pixels outside the box are never computed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../ops/assemble_masks.h"
#include "../ops/linear_tap.h"
#include "../ops/pixel_centres.h"

namespace pyseg {
namespace {

template <typename scalar_t, typename out_t>
void assemble_masks_impl(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                         const at::Tensor& boxes, at::Tensor& out, bool resize, std::optional<double> threshold) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num = coeffs.size(0), channels = protos.size(1);
  const int64_t h = protos.size(2), w = protos.size(3);
  const int64_t out_h = out.size(1), out_w = out.size(2);
  const scalar_t* proto_ptr = protos.data_ptr<scalar_t>();
  const scalar_t* coeff_ptr = coeffs.data_ptr<scalar_t>();
  const int64_t* img = image_index.data_ptr<int64_t>();
  const float* box_ptr = boxes.data_ptr<float>();
  out_t* out_ptr = out.data_ptr<out_t>();
  // Box scale (output pixels per proto cell) in float32, as the reference multiplies float32 boxes.
  const float box_sx = static_cast<float>(static_cast<double>(out_w) / static_cast<double>(w));
  const float box_sy = static_cast<float>(static_cast<double>(out_h) / static_cast<double>(h));
  const acc_t src_sx = static_cast<acc_t>(w) / static_cast<acc_t>(out_w);
  const acc_t src_sy = static_cast<acc_t>(h) / static_cast<acc_t>(out_h);
  const acc_t thr = static_cast<acc_t>(threshold.value_or(0.0));

  at::parallel_for(0, num, 1, [&](int64_t n_begin, int64_t n_end) {
    std::vector<acc_t> logits;
    std::vector<LinearTap<acc_t>> taps_x;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const float* box = box_ptr + 4 * n;
      const PixelRange xs = centres_in(resize ? box[0] * box_sx : box[0], resize ? box[2] * box_sx : box[2], out_w);
      const PixelRange ys = centres_in(resize ? box[1] * box_sy : box[1], resize ? box[3] * box_sy : box[3], out_h);
      if (xs.size() == 0 || ys.size() == 0) continue;

      // Proto cells read by the box: [c_lo, c_hi] x [r_lo, r_hi].
      int64_t c_lo = xs.lo, c_hi = xs.hi - 1, r_lo = ys.lo, r_hi = ys.hi - 1;
      if (resize) {
        taps_x.resize(xs.size());
        for (int64_t x = xs.lo; x < xs.hi; ++x) taps_x[x - xs.lo] = linear_tap<acc_t>(x, src_sx, w);
        c_lo = taps_x.front().i0;
        c_hi = taps_x.back().i1;
        r_lo = linear_tap<acc_t>(ys.lo, src_sy, h).i0;
        r_hi = linear_tap<acc_t>(ys.hi - 1, src_sy, h).i1;
      }
      const int64_t cols = c_hi - c_lo + 1, rows = r_hi - r_lo + 1;
      logits.assign(rows * cols, 0);
      const scalar_t* proto_b = proto_ptr + img[n] * channels * h * w;
      const scalar_t* coeff_n = coeff_ptr + n * channels;
      for (int64_t k = 0; k < channels; ++k) {
        const acc_t c = static_cast<acc_t>(coeff_n[k]);
        const scalar_t* plane = proto_b + k * h * w;
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* src = plane + (r_lo + r) * w + c_lo;
          acc_t* dst = logits.data() + r * cols;
          for (int64_t c2 = 0; c2 < cols; ++c2) dst[c2] += c * static_cast<acc_t>(src[c2]);
        }
      }

      out_t* out_n = out_ptr + n * out_h * out_w;
      for (int64_t y = ys.lo; y < ys.hi; ++y) {
        out_t* out_row = out_n + y * out_w;
        if (!resize) {
          const acc_t* row = logits.data() + (y - r_lo) * cols - c_lo;
          for (int64_t x = xs.lo; x < xs.hi; ++x) {
            const acc_t p = static_cast<acc_t>(1) / (static_cast<acc_t>(1) + std::exp(-row[x]));
            out_row[x] = threshold.has_value() ? static_cast<out_t>(p > thr) : static_cast<out_t>(p);
          }
          continue;
        }
        const LinearTap<acc_t> ty = linear_tap<acc_t>(y, src_sy, h);
        const acc_t* row0 = logits.data() + (ty.i0 - r_lo) * cols - c_lo;
        const acc_t* row1 = logits.data() + (ty.i1 - r_lo) * cols - c_lo;
        for (int64_t x = xs.lo; x < xs.hi; ++x) {
          const LinearTap<acc_t>& tx = taps_x[x - xs.lo];
          const acc_t v = ty.w0 * (tx.w0 * row0[tx.i0] + tx.w1 * row0[tx.i1]) +
                          ty.w1 * (tx.w0 * row1[tx.i0] + tx.w1 * row1[tx.i1]);
          const acc_t p = static_cast<acc_t>(1) / (static_cast<acc_t>(1) + std::exp(-v));
          out_row[x] = threshold.has_value() ? static_cast<out_t>(p > thr) : static_cast<out_t>(p);
        }
      }
    }
  });
}

at::Tensor assemble_masks_cpu(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                              const at::Tensor& boxes, at::OptionalIntArrayRef out_size,
                              std::optional<double> threshold) {
  check_mask_head_inputs(protos, coeffs, image_index, boxes, /*check_values=*/true);
  const auto [out_h, out_w] = assembled_size(protos, out_size);
  const int64_t num = coeffs.size(0);
  const bool resize = out_h != protos.size(2) || out_w != protos.size(3);
  const at::ScalarType out_dtype = threshold.has_value() ? at::kBool : protos.scalar_type();
  at::Tensor out = at::zeros({num, out_h, out_w}, protos.options().dtype(out_dtype));
  if (num == 0 || out_h == 0 || out_w == 0 || protos.size(2) == 0 || protos.size(3) == 0) return out;

  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous();
  const at::Tensor idx = image_index.contiguous(), b = boxes.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, protos.scalar_type(), "assemble_masks_cpu", [&] {
    if (threshold.has_value()) {
      assemble_masks_impl<scalar_t, bool>(p, c, idx, b, out, resize, threshold);
    } else {
      assemble_masks_impl<scalar_t, scalar_t>(p, c, idx, b, out, resize, threshold);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CPU, m) { m.impl("assemble_masks", &assemble_masks_cpu); }

}  // namespace pyseg
