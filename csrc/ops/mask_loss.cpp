// Schemas of mask_loss and its backward, and the checks both backends share.
//
// mask_loss(protos [B,K,h,w], coeffs [N,K], image_index [N], gt_masks, gt_index [N], boxes [N,4], overlap)
//   -> loss [N]: mean over the pixels of box i of BCEWithLogits(coeffs_i . protos_b(i), target_i), where
//   target_i = (gt_masks[image_index[i]] == gt_index[i]) when overlap (gt_masks [B,h,w] integer map),
//   else gt_masks[gt_index[i]] (gt_masks [G,h,w] binary or soft masks).
#include "mask_loss.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "assemble_masks.h"

namespace pyseg {

void check_mask_loss_inputs(const at::Tensor& protos, const at::Tensor& coeffs, const at::Tensor& image_index,
                            const at::Tensor& gt_masks, const at::Tensor& gt_index, const at::Tensor& boxes,
                            bool overlap, bool check_values) {
  check_mask_head_inputs(protos, coeffs, image_index, boxes, check_values);
  TORCH_CHECK_VALUE(gt_masks.dim() == 3 && gt_masks.size(1) == protos.size(2) && gt_masks.size(2) == protos.size(3),
                    "gt_masks must have shape [", overlap ? "B" : "G", ", h, w] = [*, ", protos.size(2), ", ",
                    protos.size(3), "] (the proto grid), got ", gt_masks.sizes());
  if (overlap) {
    TORCH_CHECK_VALUE(gt_masks.size(0) == protos.size(0), "gt_masks as an overlap index map must have one map per "
                      "image: shape [", protos.size(0), ", h, w], got ", gt_masks.sizes());
    TORCH_CHECK_VALUE(at::isIntegralType(gt_masks.scalar_type(), /*includeBool=*/false),
                      "gt_masks as an overlap index map must be an integer dtype, got ", gt_masks.scalar_type());
  }
  TORCH_CHECK_VALUE(gt_index.dim() == 1 && gt_index.size(0) == coeffs.size(0),
                    "gt_index must have shape [N] = [", coeffs.size(0), "], got ", gt_index.sizes());
  TORCH_CHECK_VALUE(gt_index.scalar_type() == at::kLong, "gt_index must be int64, got ", gt_index.scalar_type());
  TORCH_CHECK_VALUE(gt_masks.device() == protos.device() && gt_index.device() == protos.device(),
                    "gt_masks and gt_index must be on the device of protos (", protos.device(), ")");
  if (!overlap && check_values) check_index_range(gt_index, gt_masks.size(0), "gt_index", "G (rows of gt_masks)");
}

void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& protos, const at::Tensor& coeffs) {
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == coeffs.size(0),
                    "grad_loss must have shape [N] = [", coeffs.size(0), "], got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad_loss.scalar_type()), "grad_loss must be a floating dtype, got ",
                    grad_loss.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.device() == protos.device(), "grad_loss must be on the device of protos (",
                    protos.device(), "), got ", grad_loss.device());
}

at::Tensor kernel_targets(const at::Tensor& gt_masks, bool overlap) {
  if (overlap) return gt_masks.to(at::kInt).contiguous();
  if (gt_masks.scalar_type() == at::kBool) return gt_masks.contiguous().view(at::kByte);
  if (gt_masks.scalar_type() == at::kByte) return gt_masks.contiguous();
  return gt_masks.to(at::kFloat).contiguous();
}

}  // namespace pyseg

TORCH_LIBRARY_FRAGMENT(pyseg, m) {
  m.def(
      "mask_loss(Tensor protos, Tensor coeffs, Tensor image_index, Tensor gt_masks, Tensor gt_index, "
      "Tensor boxes, bool overlap) -> Tensor");
  m.def(
      "mask_loss_backward(Tensor grad_loss, Tensor protos, Tensor coeffs, Tensor image_index, Tensor gt_masks, "
      "Tensor gt_index, Tensor boxes, bool overlap) -> (Tensor, Tensor)");
}
