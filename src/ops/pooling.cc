// The stem's max-pool (3x3, stride 2, padding 1, torch's MaxPool2d(3, 2, 1)) on CPU, as MindSpore AOT
// custom ops (src/ops/pooling.py).
//
// Why: src/model/backbone.py's StemMaxPool pads by concatenating zeros (MindSpore's Pad kernel
// is slow and a padded MaxPool does not export) and runs MindSpore's pool and its gradient. On
// the small configuration's stem output (4x64x128x128) forward + backward took 30 ms that way
// and 20 ms here (timed with a weighted sum around both, GRAPH mode, 2 cores).
//
// Ops (params are the inputs then the outputs, plain row-major float32):
//   FcosMaxPoolForward:  x (N,C,H,W) -> y (N,C,ceil(H/2),ceil(W/2))
//   FcosMaxPoolBackward: x, dy -> dx (N,C,H,W)
// y is the maximum over the window's rows 2i-1..2i+1 and columns 2j-1..2j+1 inside the map (the
// padding is -inf, as torch's). The backward sends dy to the window's first maximum in row-major
// order (torch's choice) and recomputes it from x instead of storing indices.
#include <cstdint>
#include <cstring>

#include "runtime.h"

namespace {

struct Plane {
  int64_t planes, h, w, oh, ow;
  explicit Plane(const int64_t *x) : planes(x[0] * x[1]), h(x[2]), w(x[3]), oh((x[2] + 1) / 2), ow((x[3] + 1) / 2) {}
};

// Index (in the plane) of the first maximum of output (i, j)'s window.
inline int64_t ArgMax(const float *x, const Plane &s, int64_t i, int64_t j) {
  const int64_t r0 = i * 2 > 0 ? i * 2 - 1 : 0, r1 = i * 2 + 1 < s.h ? i * 2 + 1 : s.h - 1;
  const int64_t c0 = j * 2 > 0 ? j * 2 - 1 : 0, c1 = j * 2 + 1 < s.w ? j * 2 + 1 : s.w - 1;
  int64_t best = r0 * s.w + c0;
  for (int64_t r = r0; r <= r1; ++r) {
    for (int64_t c = c0; c <= c1; ++c) {
      if (x[r * s.w + c] > x[best]) best = r * s.w + c;
    }
  }
  return best;
}

}  // namespace

// x -> y
extern "C" int FcosMaxPoolForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                  void *) {
  if (nparam != 2 || ndims[0] != 4) return 1;
  const Plane s(shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  fcos_ops::ForEachTask(s.planes, [&](int64_t p) {
    const float *xp = x + p * s.h * s.w;
    float *yp = y + p * s.oh * s.ow;
    for (int64_t i = 0; i < s.oh; ++i) {
      for (int64_t j = 0; j < s.ow; ++j) yp[i * s.ow + j] = xp[ArgMax(xp, s, i, j)];
    }
  });
  return 0;
}

// x, dy -> dx
extern "C" int FcosMaxPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                   void *) {
  if (nparam != 3 || ndims[0] != 4) return 1;
  const Plane s(shapes[0]);
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  fcos_ops::ForEachTask(s.planes, [&](int64_t p) {
    const float *xp = x + p * s.h * s.w, *dyp = dy + p * s.oh * s.ow;
    float *dxp = dx + p * s.h * s.w;
    std::memset(dxp, 0, sizeof(float) * s.h * s.w);
    for (int64_t i = 0; i < s.oh; ++i) {
      for (int64_t j = 0; j < s.ow; ++j) dxp[ArgMax(xp, s, i, j)] += dyp[i * s.ow + j];
    }
  });
  return 0;
}
