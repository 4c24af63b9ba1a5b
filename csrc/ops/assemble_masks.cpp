// Schema of assemble_masks and the checks both backends share.
#include "assemble_masks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace pyseg {

void check_index_range(const at::Tensor& index, int64_t upper, const char* name, const char* upper_name) {
  if (index.numel() == 0) return;
  const auto [low, high] = at::aminmax(index);
  const at::Tensor bounds = at::stack({low, high}).cpu();
  const int64_t* b = bounds.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(b[0] >= 0 && b[1] < upper, name, " values must lie in [0, ", upper_name, " = ", upper,
                    "), got values from ", b[0], " to ", b[1]);
}

void check_mask_head_inputs(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                            const at::Tensor& boxes, bool check_values) {
  TORCH_CHECK_VALUE(protos.dim() == 4, "protos must have shape [B, K, h, w], got ", protos.sizes());
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(1) == protos.size(1),
                    "coeffs must have shape [N, K] with K = ", protos.size(1), " (protos.shape[1]), got ",
                    coeffs.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(protos.scalar_type()), "protos must be a floating dtype, got ",
                    protos.scalar_type());
  TORCH_CHECK_VALUE(coeffs.scalar_type() == protos.scalar_type(), "coeffs must have the dtype of protos (",
                    protos.scalar_type(), "), got ", coeffs.scalar_type());
  const int64_t n = coeffs.size(0);
  TORCH_CHECK_VALUE(image_index.dim() == 1 && image_index.size(0) == n,
                    "image_index must have shape [N] = [", n, "], got ", image_index.sizes());
  TORCH_CHECK_VALUE(image_index.scalar_type() == at::kLong, "image_index must be int64, got ",
                    image_index.scalar_type());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(0) == n && boxes.size(1) == 4,
                    "boxes must have shape [N, 4] = [", n, ", 4] (x1, y1, x2, y2 in proto pixels), got ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(boxes.scalar_type() == at::kFloat, "boxes must be float32, got ", boxes.scalar_type());
  for (const at::Tensor* t : {&coeffs, &image_index, &boxes}) {
    TORCH_CHECK_VALUE(t->device() == protos.device(), "all inputs must be on the device of protos (",
                      protos.device(), "), got one on ", t->device());
  }
  if (check_values) check_index_range(image_index, protos.size(0), "image_index", "B");
}

std::pair<int64_t, int64_t> assembled_size(const at::Tensor& protos, at::OptionalIntArrayRef out_size) {
  if (!out_size.has_value()) return {protos.size(2), protos.size(3)};
  const auto size = *out_size;
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] >= 0 && size[1] >= 0,
                    "out_size must be (H, W) with H, W >= 0, got ", size);
  return {size[0], size[1]};
}

}  // namespace pyseg

TORCH_LIBRARY_FRAGMENT(pyseg, m) {
  m.def(
      "assemble_masks(Tensor protos, Tensor coeffs, Tensor image_index, Tensor boxes, "
      "int[]? out_size=None, float? threshold=None) -> Tensor");
}
