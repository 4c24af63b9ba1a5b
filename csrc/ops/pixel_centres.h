// Pixel-centre rules shared by every kernel (CPU and CUDA).
//
// Pixel i covers [i, i + 1); its centre is i + 0.5. All ops decide coverage by
// comparing that centre with a coordinate, so the helpers below return exact
// integer bounds for those comparisons (no rounding of the coordinate itself).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace pyseg {

// Smallest i in [0, n] with i + 0.5 >= v (n when no pixel qualifies).
C10_HOST_DEVICE inline int64_t first_centre_at_or_after(double v, int64_t n) {
  if (!(v > 0.5)) return 0;
  if (v > static_cast<double>(n) - 0.5) return n;
  int64_t i = static_cast<int64_t>(ceil(v - 0.5));
  while (i > 0 && static_cast<double>(i - 1) + 0.5 >= v) --i;
  while (i < n && static_cast<double>(i) + 0.5 < v) ++i;
  return i;
}

// Half-open pixel range [lo, hi) whose centres lie in [a, b), clipped to [0, n).
struct PixelRange {
  int64_t lo;
  int64_t hi;
  C10_HOST_DEVICE int64_t size() const { return hi > lo ? hi - lo : 0; }
};

C10_HOST_DEVICE inline PixelRange centres_in(double a, double b, int64_t n) {
  return PixelRange{first_centre_at_or_after(a, n), first_centre_at_or_after(b, n)};
}

// Pixels of a box (x1, y1, x2, y2) on an h x w grid: centres in [x1, x2) x [y1, y2).
struct BoxPixels {
  PixelRange xs, ys;
  C10_HOST_DEVICE int64_t area() const { return xs.size() * ys.size(); }
};

C10_HOST_DEVICE inline BoxPixels box_pixels(const float* box, int64_t h, int64_t w) {
  return BoxPixels{centres_in(box[0], box[2], w), centres_in(box[1], box[3], h)};
}

}  // namespace pyseg
