// CPU kernels of mask_loss and mask_loss_backward.
//
// Logits are computed a box row at a time into a row buffer and consumed at once: the forward
// pass keeps one running sum per instance, the backward pass accumulates dL/dcoeffs per instance
// and dL/dprotos per image. No [N, h, w] tensor is ever built. The backward pass is parallel over
// images, so each thread owns the proto gradient of its images (no atomics, deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../ops/mask_loss.h"
#include "../ops/pixel_centres.h"

namespace pyseg {
namespace {

// Logits of instance n on row y, columns [xs.lo, xs.hi), into z[0 : xs.size()].
template <typename scalar_t, typename acc_t>
inline void logits_row(const scalar_t* proto_b, const scalar_t* coeff_n, int64_t channels, int64_t h, int64_t w,
                       int64_t y, PixelRange xs, acc_t* z) {
  const int64_t cols = xs.size();
  for (int64_t x = 0; x < cols; ++x) z[x] = 0;
  for (int64_t k = 0; k < channels; ++k) {
    const acc_t c = static_cast<acc_t>(coeff_n[k]);
    const scalar_t* src = proto_b + (k * h + y) * w + xs.lo;
    for (int64_t x = 0; x < cols; ++x) z[x] += c * static_cast<acc_t>(src[x]);
  }
}

struct LossArgs {
  const at::Tensor& protos;
  const at::Tensor& coeffs;
  const int64_t* image_index;
  const at::Tensor& targets;
  const int64_t* gt_index;
  const float* boxes;
};

template <typename scalar_t, typename target_t>
void mask_loss_forward_impl(const LossArgs& a, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num = a.coeffs.size(0), channels = a.protos.size(1);
  const int64_t h = a.protos.size(2), w = a.protos.size(3);
  const scalar_t* protos = a.protos.data_ptr<scalar_t>();
  const scalar_t* coeffs = a.coeffs.data_ptr<scalar_t>();
  const target_t* targets = a.targets.data_ptr<target_t>();
  acc_t* loss_ptr = loss.data_ptr<acc_t>();
  constexpr bool kOverlap = std::is_same_v<target_t, int32_t>;

  at::parallel_for(0, num, 1, [&](int64_t n_begin, int64_t n_end) {
    std::vector<acc_t> z(w);
    for (int64_t n = n_begin; n < n_end; ++n) {
      const BoxPixels px = box_pixels(a.boxes + 4 * n, h, w);
      if (px.area() == 0) {
        loss_ptr[n] = 0;
        continue;
      }
      const scalar_t* proto_b = protos + a.image_index[n] * channels * h * w;
      const target_t* target_plane = targets + (kOverlap ? a.image_index[n] : a.gt_index[n]) * h * w;
      double total = 0;
      for (int64_t y = px.ys.lo; y < px.ys.hi; ++y) {
        logits_row(proto_b, coeffs + n * channels, channels, h, w, y, px.xs, z.data());
        const target_t* t_row = target_plane + y * w + px.xs.lo;
        for (int64_t x = 0; x < px.xs.size(); ++x) {
          const acc_t v = z[x];
          const acc_t t = target_value<acc_t>(t_row[x], a.gt_index[n]);
          total += std::max(v, acc_t(0)) - v * t + std::log1p(std::exp(-std::abs(v)));
        }
      }
      loss_ptr[n] = static_cast<acc_t>(total / static_cast<double>(px.area()));
    }
  });
}

template <typename scalar_t, typename target_t>
void mask_loss_backward_impl(const LossArgs& a, const at::Tensor& grad_loss, at::Tensor& grad_protos,
                             at::Tensor& grad_coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num = a.coeffs.size(0), batch = a.protos.size(0), channels = a.protos.size(1);
  const int64_t h = a.protos.size(2), w = a.protos.size(3);
  const scalar_t* protos = a.protos.data_ptr<scalar_t>();
  const scalar_t* coeffs = a.coeffs.data_ptr<scalar_t>();
  const target_t* targets = a.targets.data_ptr<target_t>();
  const acc_t* grad = grad_loss.data_ptr<acc_t>();
  acc_t* d_protos = grad_protos.data_ptr<acc_t>();
  acc_t* d_coeffs = grad_coeffs.data_ptr<acc_t>();
  constexpr bool kOverlap = std::is_same_v<target_t, int32_t>;

  // Instances of each image (CSR), so that one thread owns each image's proto gradient.
  std::vector<int64_t> begin(batch + 1, 0), order(num);
  for (int64_t n = 0; n < num; ++n) ++begin[a.image_index[n] + 1];
  for (int64_t b = 0; b < batch; ++b) begin[b + 1] += begin[b];
  std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);
  for (int64_t n = 0; n < num; ++n) order[cursor[a.image_index[n]]++] = n;

  at::parallel_for(0, batch, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> z(w);
    std::vector<acc_t> d_coeff(channels);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const scalar_t* proto_b = protos + b * channels * h * w;
      acc_t* d_proto_b = d_protos + b * channels * h * w;
      for (int64_t j = begin[b]; j < begin[b + 1]; ++j) {
        const int64_t n = order[j];
        const BoxPixels px = box_pixels(a.boxes + 4 * n, h, w);
        if (px.area() == 0) continue;
        const acc_t scale = grad[n] / static_cast<acc_t>(px.area());
        const scalar_t* coeff_n = coeffs + n * channels;
        const target_t* target_plane = targets + (kOverlap ? b : a.gt_index[n]) * h * w;
        std::fill(d_coeff.begin(), d_coeff.end(), acc_t(0));
        for (int64_t y = px.ys.lo; y < px.ys.hi; ++y) {
          logits_row(proto_b, coeff_n, channels, h, w, y, px.xs, z.data());
          const target_t* t_row = target_plane + y * w + px.xs.lo;
          const int64_t cols = px.xs.size();
          for (int64_t x = 0; x < cols; ++x) {  // z becomes dL/dz
            const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-z[x]));
            z[x] = (sig - target_value<acc_t>(t_row[x], a.gt_index[n])) * scale;
          }
          for (int64_t k = 0; k < channels; ++k) {
            const int64_t offset = (k * h + y) * w + px.xs.lo;
            const scalar_t* p_row = proto_b + offset;
            acc_t* dp_row = d_proto_b + offset;
            const acc_t c = static_cast<acc_t>(coeff_n[k]);
            acc_t dc = 0;
            for (int64_t x = 0; x < cols; ++x) {
              dc += z[x] * static_cast<acc_t>(p_row[x]);
              dp_row[x] += z[x] * c;
            }
            d_coeff[k] += dc;
          }
        }
        for (int64_t k = 0; k < channels; ++k) d_coeffs[n * channels + k] = d_coeff[k];
      }
    }
  });
}

at::Tensor mask_loss_cpu(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                         const at::Tensor& gt_masks, const at::Tensor& gt_index, const at::Tensor& boxes,
                         bool overlap) {
  check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap, /*check_values=*/true);
  const at::ScalarType acc_dtype = protos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::zeros({coeffs.size(0)}, protos.options().dtype(acc_dtype));
  if (coeffs.size(0) == 0) return loss;
  const at::Tensor p = protos.contiguous(), c = coeffs.contiguous(), idx = image_index.contiguous();
  const at::Tensor targets = kernel_targets(gt_masks, overlap), gidx = gt_index.contiguous();
  const at::Tensor b = boxes.contiguous();
  const LossArgs args{p, c, idx.data_ptr<int64_t>(), targets, gidx.data_ptr<int64_t>(), b.data_ptr<float>()};
  dispatch_mask_loss_types(protos, targets, [&](auto scalar, auto target) {
    mask_loss_forward_impl<decltype(scalar), decltype(target)>(args, loss);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> mask_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& protos,
                                                          const at::Tensor& coeffs, const at::Tensor& image_index,
                                                          const at::Tensor& gt_masks, const at::Tensor& gt_index,
                                                          const at::Tensor& boxes, bool overlap) {
  check_mask_loss_inputs(protos, coeffs, image_index, gt_masks, gt_index, boxes, overlap, /*check_values=*/true);
  const at::ScalarType acc_dtype = protos.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_grad_loss(grad_loss, protos, coeffs);
  at::Tensor grad_protos = at::zeros(protos.sizes(), protos.options().dtype(acc_dtype));
  at::Tensor grad_coeffs = at::zeros(coeffs.sizes(), coeffs.options().dtype(acc_dtype));
  if (coeffs.size(0) > 0) {
    const at::Tensor g = grad_loss.to(acc_dtype).contiguous();
    const at::Tensor p = protos.contiguous(), c = coeffs.contiguous(), idx = image_index.contiguous();
    const at::Tensor targets = kernel_targets(gt_masks, overlap), gidx = gt_index.contiguous();
    const at::Tensor b = boxes.contiguous();
    const LossArgs args{p, c, idx.data_ptr<int64_t>(), targets, gidx.data_ptr<int64_t>(), b.data_ptr<float>()};
    dispatch_mask_loss_types(protos, targets, [&](auto scalar, auto target) {
      mask_loss_backward_impl<decltype(scalar), decltype(target)>(args, g, grad_protos, grad_coeffs);
    });
  }
  return {grad_protos.to(protos.scalar_type()), grad_coeffs.to(coeffs.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CPU, m) {
  m.impl("mask_loss", &mask_loss_cpu);
  m.impl("mask_loss_backward", &mask_loss_backward_cpu);
}

}  // namespace pyseg
