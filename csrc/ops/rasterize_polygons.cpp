// Schemas of the rasterization ops and the checks both backends share.
#include "rasterize_polygons.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace pyseg {

void check_polygon_inputs(
    const at::Tensor& vertices,
    const at::Tensor& poly_offsets,
    const at::Tensor& poly_to_mask,
    int64_t num_masks,
    int64_t height,
    int64_t width,
    bool check_values) {
  TORCH_CHECK_VALUE(vertices.dim() == 2 && vertices.size(1) == 2,
                    "vertices must have shape [V, 2], got ", vertices.sizes());
  TORCH_CHECK_VALUE(vertices.scalar_type() == at::kFloat,
                    "vertices must be float32 (pixels), got ", vertices.scalar_type());
  TORCH_CHECK_VALUE(poly_offsets.dim() == 1 && poly_offsets.size(0) >= 1,
                    "poly_offsets must have shape [P + 1], got ", poly_offsets.sizes());
  TORCH_CHECK_VALUE(poly_offsets.scalar_type() == at::kLong,
                    "poly_offsets must be int64, got ", poly_offsets.scalar_type());
  TORCH_CHECK_VALUE(poly_to_mask.dim() == 1 && poly_to_mask.size(0) == poly_offsets.size(0) - 1,
                    "poly_to_mask must have shape [P] = [", poly_offsets.size(0) - 1, "], got ",
                    poly_to_mask.sizes());
  TORCH_CHECK_VALUE(poly_to_mask.scalar_type() == at::kLong,
                    "poly_to_mask must be int64, got ", poly_to_mask.scalar_type());
  TORCH_CHECK_VALUE(num_masks >= 0, "num_masks must be >= 0, got ", num_masks);
  TORCH_CHECK_VALUE(height >= 0 && width >= 0, "height and width must be >= 0, got ", height, "x", width);
  TORCH_CHECK_VALUE(vertices.device() == poly_offsets.device() && vertices.device() == poly_to_mask.device(),
                    "vertices, poly_offsets and poly_to_mask must be on one device, got ", vertices.device(), ", ",
                    poly_offsets.device(), ", ", poly_to_mask.device());
  if (!check_values) return;
  // Data checks: plain loops on the CPU (no per-call tensor ops); small host copies for CUDA.
  if (vertices.device().is_cpu()) {
    const at::Tensor xy = vertices.contiguous();
    const float* v = xy.data_ptr<float>();
    for (int64_t i = 0; i < xy.numel(); ++i) {
      TORCH_CHECK_VALUE(std::isfinite(v[i]), "vertices must be finite: vertex ", i / 2, " has ", i % 2 ? "y" : "x",
                        " = ", v[i], "; drop or repair that polygon first");
    }
  } else {
    TORCH_CHECK_VALUE(at::isfinite(vertices).all().item<bool>(),
                      "vertices must be finite: found NaN or inf; drop or repair those polygons first");
  }
  const at::Tensor offsets = poly_offsets.cpu().contiguous();
  const at::Tensor owners = poly_to_mask.cpu().contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* owner = owners.data_ptr<int64_t>();
  const int64_t num_polys = offsets.numel() - 1;
  TORCH_CHECK_VALUE(off[0] == 0, "poly_offsets[0] must be 0, got ", off[0]);
  TORCH_CHECK_VALUE(off[num_polys] == vertices.size(0), "poly_offsets[-1] must equal the number of vertices ",
                    vertices.size(0), ", got ", off[num_polys]);
  for (int64_t p = 0; p < num_polys; ++p) {
    TORCH_CHECK_VALUE(off[p] <= off[p + 1], "poly_offsets must be non-decreasing, but poly_offsets[", p,
                      "] = ", off[p], " > poly_offsets[", p + 1, "] = ", off[p + 1]);
    TORCH_CHECK_VALUE(owner[p] >= 0 && owner[p] < num_masks, "poly_to_mask values must lie in [0, num_masks = ",
                      num_masks, "), got poly_to_mask[", p, "] = ", owner[p]);
  }
}

void check_image_index(const at::Tensor& image_index, int64_t num_masks, int64_t num_images, bool check_values) {
  TORCH_CHECK_VALUE(image_index.dim() == 1 && image_index.size(0) == num_masks,
                    "image_index must have shape [M] with M = number of masks, got ", image_index.sizes());
  TORCH_CHECK_VALUE(image_index.scalar_type() == at::kLong, "image_index must be int64, got ",
                    image_index.scalar_type());
  TORCH_CHECK_VALUE(num_images >= 0, "num_images must be >= 0, got ", num_images);
  if (!check_values) return;
  const at::Tensor images = image_index.cpu().contiguous();
  const int64_t* image = images.data_ptr<int64_t>();
  for (int64_t m = 0; m < num_masks; ++m) {
    TORCH_CHECK_VALUE(image[m] >= 0 && image[m] < num_images, "image_index values must lie in [0, num_images = ",
                      num_images, "), got image_index[", m, "] = ", image[m]);
  }
}

}  // namespace pyseg

TORCH_LIBRARY_FRAGMENT(pyseg, m) {
  m.def(
      "rasterize_polygons(Tensor vertices, Tensor poly_offsets, Tensor poly_to_mask, int num_masks, "
      "int height, int width) -> Tensor");
  m.def(
      "rasterize_polygons_overlap(Tensor vertices, Tensor poly_offsets, Tensor poly_to_mask, "
      "Tensor image_index, int num_images, int height, int width) -> (Tensor, Tensor)");
}
