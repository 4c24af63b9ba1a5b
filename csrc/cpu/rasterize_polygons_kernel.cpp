// CPU kernel of rasterize_polygons / rasterize_polygons_overlap.
//
// Per polygon: one pass over its edges bins each edge's row crossings (an edge covers the rows
// whose centres lie in [min y, max y)), a second pass stores the first pixel whose centre is at
// or right of each crossing, and each row's crossings, sorted, pair up into spans of inside
// pixels. Work is O(edges + crossings + pixels set); the crossing arithmetic matches
// pyseg/ops/reference.py bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../ops/pixel_centres.h"
#include "../ops/rasterize_polygons.h"

namespace pyseg {
namespace {

struct RowScratch {
  std::vector<int64_t> row_begin;  // CSR offsets of crossings per row, size rows + 1
  std::vector<int64_t> fill;       // write cursor per row
  std::vector<int32_t> x_start;    // first pixel with centre >= each crossing, grouped by row
  std::vector<PixelRange> edge_rows;  // rows each edge crosses
};

// Calls on_span(y, x0, x1) for every run [x0, x1) of pixels of row y inside one closed polygon
// (n vertices, x/y interleaved, pixels) under the even-odd rule; the runs of a row are disjoint.
template <typename OnSpan>
void for_each_span(const float* xy, int64_t n, int64_t height, int64_t width, RowScratch& s, OnSpan&& on_span) {
  if (n < 3 || height == 0 || width == 0) return;
  float y_min = xy[1], y_max = xy[1];
  for (int64_t i = 1; i < n; ++i) {
    y_min = std::min(y_min, xy[2 * i + 1]);
    y_max = std::max(y_max, xy[2 * i + 1]);
  }
  const PixelRange rows = centres_in(y_min, y_max, height);
  const int64_t num_rows = rows.size();
  if (num_rows == 0) return;

  s.row_begin.assign(num_rows + 1, 0);
  s.edge_rows.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = (i + 1 == n) ? 0 : i + 1;
    const float y0 = xy[2 * i + 1], y1 = xy[2 * j + 1];
    const PixelRange r = y0 == y1 ? PixelRange{0, 0} : centres_in(std::min(y0, y1), std::max(y0, y1), height);
    s.edge_rows[i] = r;
    for (int64_t y = r.lo; y < r.hi; ++y) ++s.row_begin[y - rows.lo + 1];
  }
  for (int64_t r = 0; r < num_rows; ++r) s.row_begin[r + 1] += s.row_begin[r];
  s.fill.assign(s.row_begin.begin(), s.row_begin.end() - 1);
  s.x_start.resize(s.row_begin[num_rows]);

  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = (i + 1 == n) ? 0 : i + 1;
    const double x0 = xy[2 * i], y0 = xy[2 * i + 1];
    const double x1 = xy[2 * j], y1 = xy[2 * j + 1];
    const PixelRange r = s.edge_rows[i];
    const double dx = x1 - x0, dy = y1 - y0;
    for (int64_t y = r.lo; y < r.hi; ++y) {
      const double yc = static_cast<double>(y) + 0.5;
      const double t = yc - y0;
      const double num = t * dx;
      const double x_cross = x0 + num / dy;
      s.x_start[s.fill[y - rows.lo]++] = static_cast<int32_t>(first_centre_at_or_after(x_cross, width));
    }
  }

  for (int64_t r = 0; r < num_rows; ++r) {
    int32_t* first = s.x_start.data() + s.row_begin[r];
    int32_t* last = s.x_start.data() + s.row_begin[r + 1];
    // Rows hold few crossings (2 for a convex polygon): insertion sort beats std::sort here.
    for (int32_t* c = first + 1; c < last; ++c) {
      const int32_t value = *c;
      int32_t* d = c;
      for (; d > first && d[-1] > value; --d) *d = d[-1];
      *d = value;
    }
    // A closed polygon crosses every row an even number of times; pixels between the
    // (2k)-th and (2k+1)-th crossing are inside.
    for (int32_t* c = first; c + 1 < last; c += 2) {
      if (c[1] > c[0]) on_span(rows.lo + r, c[0], c[1]);
    }
  }
}

// Polygon ids grouped by mask (CSR): polygons of mask m are order[begin[m] : begin[m + 1]].
void group_polygons_by_mask(const int64_t* poly_to_mask, int64_t num_polys, int64_t num_masks,
                            std::vector<int64_t>& begin, std::vector<int64_t>& order) {
  begin.assign(num_masks + 1, 0);
  for (int64_t p = 0; p < num_polys; ++p) ++begin[poly_to_mask[p] + 1];
  for (int64_t m = 0; m < num_masks; ++m) begin[m + 1] += begin[m];
  std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);
  order.resize(num_polys);
  for (int64_t p = 0; p < num_polys; ++p) order[cursor[poly_to_mask[p]]++] = p;
}

at::Tensor rasterize_polygons_cpu(const at::Tensor& vertices, const at::Tensor& poly_offsets,
                                  const at::Tensor& poly_to_mask, int64_t num_masks, int64_t height,
                                  int64_t width) {
  check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/true);
  TORCH_CHECK_VALUE(vertices.device().is_cpu(), "vertices must be on the CPU for the CPU kernel");
  // Each worker zeroes and fills its own masks, so every byte is written while it is in cache.
  at::Tensor masks = at::empty({num_masks, height, width}, vertices.options().dtype(at::kByte));
  if (num_masks == 0 || height == 0 || width == 0) return masks;

  const at::Tensor xy = vertices.contiguous();
  const at::Tensor offsets = poly_offsets.contiguous();
  const at::Tensor owner = poly_to_mask.contiguous();
  const float* xy_ptr = xy.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  uint8_t* out = masks.data_ptr<uint8_t>();

  std::vector<int64_t> begin, order;
  group_polygons_by_mask(owner.data_ptr<int64_t>(), owner.numel(), num_masks, begin, order);

  const int64_t plane = height * width;
  at::parallel_for(0, num_masks, 1, [&](int64_t m_begin, int64_t m_end) {
    RowScratch scratch;
    for (int64_t m = m_begin; m < m_end; ++m) {
      uint8_t* mask = out + m * plane;
      std::memset(mask, 0, static_cast<size_t>(plane));
      for (int64_t k = begin[m]; k < begin[m + 1]; ++k) {
        const int64_t p = order[k];
        for_each_span(xy_ptr + 2 * off[p], off[p + 1] - off[p], height, width, scratch,
                      [&](int64_t y, int32_t x0, int32_t x1) { std::memset(mask + y * width + x0, 1, x1 - x0); });
      }
    }
  });
  return masks;
}

struct Span {
  int64_t y;
  int32_t x0, x1;
};

// Pixel count of the union of spans (sorted in place).
int64_t union_area(std::vector<Span>::iterator first, std::vector<Span>::iterator last) {
  std::sort(first, last, [](const Span& a, const Span& b) { return a.y != b.y ? a.y < b.y : a.x0 < b.x0; });
  int64_t area = 0, row = -1;
  int32_t covered_to = 0;
  for (auto it = first; it != last; ++it) {
    if (it->y != row) {
      row = it->y;
      covered_to = it->x0;
    }
    const int32_t start = std::max(it->x0, covered_to);
    if (it->x1 > start) {
      area += it->x1 - start;
      covered_to = it->x1;
    }
  }
  return area;
}

// Per image: the spans of each instance and its area, then the spans painted largest instance
// first. No per-instance mask is ever built.
std::tuple<at::Tensor, at::Tensor> rasterize_polygons_overlap_cpu(
    const at::Tensor& vertices, const at::Tensor& poly_offsets, const at::Tensor& poly_to_mask,
    const at::Tensor& image_index, int64_t num_images, int64_t height, int64_t width) {
  const int64_t num_masks = image_index.dim() == 1 ? image_index.size(0) : -1;
  check_image_index(image_index, num_masks, num_images, /*check_values=*/true);
  check_polygon_inputs(vertices, poly_offsets, poly_to_mask, num_masks, height, width, /*check_values=*/true);
  TORCH_CHECK_VALUE(vertices.device().is_cpu() && image_index.device().is_cpu(),
                    "vertices and image_index must be on the CPU for the CPU kernel");
  at::Tensor index_map = at::zeros({num_images, height, width}, vertices.options().dtype(at::kInt));
  at::Tensor areas = at::zeros({num_masks}, vertices.options().dtype(at::kLong));
  if (num_masks == 0 || height == 0 || width == 0) return {index_map, areas};

  const at::Tensor xy = vertices.contiguous(), offsets = poly_offsets.contiguous();
  const at::Tensor owner = poly_to_mask.contiguous(), image_of = image_index.contiguous();
  const float* xy_ptr = xy.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* area = areas.data_ptr<int64_t>();
  int32_t* map_ptr = index_map.data_ptr<int32_t>();

  std::vector<int64_t> poly_begin, poly_order, mask_begin, mask_order;
  group_polygons_by_mask(owner.data_ptr<int64_t>(), owner.numel(), num_masks, poly_begin, poly_order);
  // Instances of each image in their given order; their 1-based rank is their id in the map.
  group_polygons_by_mask(image_of.data_ptr<int64_t>(), num_masks, num_images, mask_begin, mask_order);

  const int64_t plane = height * width;
  at::parallel_for(0, num_images, 1, [&](int64_t b_begin, int64_t b_end) {
    RowScratch scratch;
    std::vector<Span> spans;
    std::vector<int64_t> span_begin, draw;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t first = mask_begin[b], count = mask_begin[b + 1] - first;
      spans.clear();
      span_begin.assign(1, 0);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t m = mask_order[first + r];
        for (int64_t k = poly_begin[m]; k < poly_begin[m + 1]; ++k) {
          const int64_t p = poly_order[k];
          for_each_span(xy_ptr + 2 * off[p], off[p + 1] - off[p], height, width, scratch,
                        [&](int64_t y, int32_t x0, int32_t x1) { spans.push_back({y, x0, x1}); });
        }
        span_begin.push_back(static_cast<int64_t>(spans.size()));
        if (poly_begin[m + 1] - poly_begin[m] == 1) {  // spans of one polygon are disjoint
          int64_t total = 0;
          for (int64_t i = span_begin[r]; i < span_begin[r + 1]; ++i) total += spans[i].x1 - spans[i].x0;
          area[m] = total;
        } else {
          area[m] = union_area(spans.begin() + span_begin[r], spans.begin() + span_begin[r + 1]);
        }
      }
      draw.resize(count);
      for (int64_t r = 0; r < count; ++r) draw[r] = r;
      // Larger instances first, so smaller ones drawn later stay visible; ties keep their order.
      std::stable_sort(draw.begin(), draw.end(), [&](int64_t a, int64_t c) {
        return area[mask_order[first + a]] > area[mask_order[first + c]];
      });
      int32_t* map_b = map_ptr + b * plane;
      for (int64_t r : draw) {
        const int32_t id = static_cast<int32_t>(r + 1);
        for (int64_t i = span_begin[r]; i < span_begin[r + 1]; ++i) {
          std::fill(map_b + spans[i].y * width + spans[i].x0, map_b + spans[i].y * width + spans[i].x1, id);
        }
      }
    }
  });
  return {index_map, areas};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CPU, m) {
  m.impl("rasterize_polygons", &rasterize_polygons_cpu);
  m.impl("rasterize_polygons_overlap", &rasterize_polygons_overlap_cpu);
}

}  // namespace pyseg
