// The FPN's top-down merge, lateral + nearest-upsampled coarser map, on CPU as MindSpore AOT custom
// ops (src/ops/upsample.py).
//
// Why: MindSpore's CPU ResizeNearestNeighbor took 38 ms a call on R50-FPN 800x1216 (256x100x152
// out; 76 ms a training step, and 15 ms for its gradient, MindSpore's profiler), more than the
// add it feeds. Here the upsampling is an index lookup fused with the add, and the backward
// passes d(lateral) = dy through and sums dy over each source pixel's copies.
//
// Ops (params are the inputs then the outputs, plain row-major float32):
//   FcosUpsampleAdd:         lateral (N,C,H,W), top (N,C,h,w) -> y (N,C,H,W)
//   FcosUpsampleAddBackward: top, dy (N,C,H,W) -> dtop (N,C,h,w)
//   FcosUpsampleAddChannelsLast, FcosUpsampleAddBackwardChannelsLast: the same on channels-last
//   storage (src/ops/backend.py), a pixel's channels at once
// Source index of output row i is floor(i * h / H) (torch's 'nearest', MindSpore's
// ResizeNearestNeighbor without align_corners), the same for columns; any sizes.
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

#include "runtime.h"

namespace {

// source index of every output index: floor(i * in / out)
std::vector<int64_t> SourceIndex(int64_t out, int64_t in) {
  std::vector<int64_t> index(out);
  for (int64_t i = 0; i < out; ++i) index[i] = i * in / out;
  return index;
}

bool Compatible(int *ndims, int64_t **shapes) {
  return ndims[0] == 4 && ndims[1] == 4 && shapes[0][0] == shapes[1][0] && shapes[0][1] == shapes[1][1];
}

// y[k] = a[k] + b[k]
FCOS_CLONES void AddPixel(const float *a, const float *b, float *y, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) y[k] = a[k] + b[k];
}

// y[k] += g[k]
FCOS_CLONES void AccumulatePixel(const float *g, float *y, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) y[k] += g[k];
}

}  // namespace

// lateral, top -> y (channels-last storage)
extern "C" int FcosUpsampleAddChannelsLast(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                           void *, void *) {
  if (nparam != 3 || !Compatible(ndims, shapes)) return 1;
  const int64_t n = shapes[0][0], c = shapes[0][1], H = shapes[0][2], W = shapes[0][3];
  const int64_t h = shapes[1][2], w = shapes[1][3];
  try {
    const std::vector<int64_t> rows = SourceIndex(H, h), cols = SourceIndex(W, w);
    const float *lateral = static_cast<const float *>(params[0]), *top = static_cast<const float *>(params[1]);
    float *y = static_cast<float *>(params[2]);
    fcos_ops::ForEachTask(n * H, [&](int64_t t) {
      const int64_t image = t / H, i = t % H;
      const float *src = top + (image * h + rows[i]) * w * c;
      for (int64_t j = 0; j < W; ++j) AddPixel(lateral + (t * W + j) * c, src + cols[j] * c, y + (t * W + j) * c, c);
    });
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

// top (for its shape), dy -> dtop (channels-last storage): each source row gathers the output rows
// copied from it, in order.
extern "C" int FcosUpsampleAddBackwardChannelsLast(int nparam, void **params, int *ndims, int64_t **shapes,
                                                   const char **, void *, void *) {
  if (nparam != 3 || !Compatible(ndims, shapes)) return 1;
  const int64_t n = shapes[0][0], c = shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t H = shapes[1][2], W = shapes[1][3];
  try {
    const std::vector<int64_t> rows = SourceIndex(H, h), cols = SourceIndex(W, w);
    const float *dy = static_cast<const float *>(params[1]);
    float *dtop = static_cast<float *>(params[2]);
    fcos_ops::ForEachTask(n * h, [&](int64_t t) {
      const int64_t image = t / h, a = t % h;
      float *out = dtop + t * w * c;
      std::memset(out, 0, sizeof(float) * w * c);
      for (int64_t i = 0; i < H; ++i) {
        if (rows[i] != a) continue;
        const float *grad = dy + (image * H + i) * W * c;
        for (int64_t j = 0; j < W; ++j) AccumulatePixel(grad + j * c, out + cols[j] * c, c);
      }
    });
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

// lateral, top -> y
extern "C" int FcosUpsampleAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                               void *) {
  if (nparam != 3 || !Compatible(ndims, shapes)) return 1;
  const int64_t planes = shapes[0][0] * shapes[0][1], H = shapes[0][2], W = shapes[0][3];
  const int64_t h = shapes[1][2], w = shapes[1][3];
  try {
    const std::vector<int64_t> rows = SourceIndex(H, h), cols = SourceIndex(W, w);
    const float *lateral = static_cast<const float *>(params[0]), *top = static_cast<const float *>(params[1]);
    float *y = static_cast<float *>(params[2]);
    fcos_ops::ForEachTask(planes, [&](int64_t p) {
      for (int64_t i = 0; i < H; ++i) {
        const float *src = top + (p * h + rows[i]) * w, *lat = lateral + (p * H + i) * W;
        float *out = y + (p * H + i) * W;
        for (int64_t j = 0; j < W; ++j) out[j] = lat[j] + src[cols[j]];
      }
    });
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

// top (for its shape), dy -> dtop
extern "C" int FcosUpsampleAddBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                       void *, void *) {
  if (nparam != 3 || !Compatible(ndims, shapes)) return 1;
  const int64_t planes = shapes[0][0] * shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t H = shapes[1][2], W = shapes[1][3];
  try {
    const std::vector<int64_t> rows = SourceIndex(H, h), cols = SourceIndex(W, w);
    const float *dy = static_cast<const float *>(params[1]);
    float *dtop = static_cast<float *>(params[2]);
    fcos_ops::ForEachTask(planes, [&](int64_t p) {
      float *out = dtop + p * h * w;
      std::memset(out, 0, sizeof(float) * h * w);
      for (int64_t i = 0; i < H; ++i) {
        const float *grad = dy + (p * H + i) * W;
        float *row = out + rows[i] * w;
        for (int64_t j = 0; j < W; ++j) row[cols[j]] += grad[j];
      }
    });
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}
