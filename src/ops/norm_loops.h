// The vectorised loops of a normalisation that the GroupNorm and BatchNorm kernels share
// (src/ops/group_norm.cc, src/ops/batch_norm.cc), and their argument check: over one row of a
// channel's H*W values (NCHW), and over blocks of pixels, each a row of C channels (channels-last
// storage, src/ops/backend.py), with a value per channel in m, a, b.
#ifndef FCOS_OPS_NORM_LOOPS_H_
#define FCOS_OPS_NORM_LOOPS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "runtime.h"

namespace fcos_ops {
namespace {

// An op's call has the parameter count it should (inputs + outputs) and a 4-d x (N, C, H, W) first.
inline bool ExpectedArgs(int nparam, int want, const int *ndims) { return nparam == want && ndims[0] == 4; }

// sum of x[0:n]
FCOS_CLONES double Sum(const float *x, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

// sum of (x - m)^2
FCOS_CLONES double SumSquares(const float *x, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (x[i] - m) * (x[i] - m);
  return s;
}

// y = (x - m) * a + b
FCOS_CLONES void Affine(const float *x, float *y, int64_t n, float m, float a, float b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * a + b;
}

// sum of dy -> *s1, sum of dy * (x - m) -> *s2
FCOS_CLONES void SumDy(const float *dy, const float *x, int64_t n, float m, double *s1, double *s2) {
  float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    a += dy[i];
    b += dy[i] * (x[i] - m);
  }
  *s1 = a;
  *s2 = b;
}

// dx = dy * a + (x - m) * c + b
FCOS_CLONES void BackwardRow(const float *dy, const float *x, float *dx, int64_t n, float m, float a, float b,
                             float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * a + (x[i] - m) * c + b;
}

// Channels-last blocks: x holds `pixels` rows of c values; m, a, b, c2 hold one value per channel.
// Accumulators are float over one block (kPixelBlock pixels at most) and summed in double across blocks.

constexpr int64_t kPixelBlock = 256;  // pixels per task: one task's rows stay in the core's cache

// acc[k] += sum over pixels of x[., k]
FCOS_CLONES void SumPixels(const float *x, int64_t pixels, int64_t c, float *acc) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float *row = x + p * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) acc[k] += row[k];
  }
}

// acc[k] += sum over pixels of (x[., k] - m[k])^2
FCOS_CLONES void SumSquaresPixels(const float *x, int64_t pixels, int64_t c, const float *m, float *acc) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float *row = x + p * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) acc[k] += (row[k] - m[k]) * (row[k] - m[k]);
  }
}

// y[., k] = (x[., k] - m[k]) * a[k] + b[k], then max(0, .) when relu
FCOS_CLONES void AffinePixels(const float *x, float *y, int64_t pixels, int64_t c, const float *m, const float *a,
                              const float *b, bool relu) {
  const float floor = relu ? 0.0f : -__builtin_inff();
  for (int64_t p = 0; p < pixels; ++p) {
    const float *row = x + p * c;
    float *out = y + p * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) out[k] = std::max((row[k] - m[k]) * a[k] + b[k], floor);
  }
}

// With g = dy, or with relu dy where (x - m) * a + b > 0: s1[k] += sum of g, s2[k] += sum of g * (x - m)
FCOS_CLONES void SumDyPixels(const float *dy, const float *x, int64_t pixels, int64_t c, const float *m,
                             const float *a, const float *b, bool relu, float *s1, float *s2) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float *row = x + p * c, *grad = dy + p * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float g = !relu || (row[k] - m[k]) * a[k] + b[k] > 0.0f ? grad[k] : 0.0f;
      s1[k] += g;
      s2[k] += g * (row[k] - m[k]);
    }
  }
}

// dx = g * a2 + (x - m) * c2 + b2 per channel, g as in SumDyPixels
FCOS_CLONES void BackwardPixels(const float *dy, const float *x, float *dx, int64_t pixels, int64_t c,
                                const float *m, const float *a, const float *b, bool relu, const float *a2,
                                const float *b2, const float *c2) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float *row = x + p * c, *grad = dy + p * c;
    float *out = dx + p * c;
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      const float g = !relu || (row[k] - m[k]) * a[k] + b[k] > 0.0f ? grad[k] : 0.0f;
      out[k] = g * a2[k] + (row[k] - m[k]) * c2[k] + b2[k];
    }
  }
}

// Runs block(sample, first, pixels, acc) over the blocks of kPixelBlock pixels of each of `samples`
// images of `pixels` pixels, on the pool, acc (width floats) zeroed for each block -> out[sample * width + k],
// the sum of acc[k] over the sample's blocks, in double and in block order (the same result on any
// number of threads).
template <typename Block>
std::vector<double> SumBlocks(int64_t samples, int64_t pixels, int64_t width, const Block &block) {
  const int64_t per_sample = (pixels + kPixelBlock - 1) / kPixelBlock;
  std::vector<float> partial(samples * per_sample * width, 0.0f);
  ForEachTask(samples * per_sample, [&](int64_t t) {
    const int64_t first = t % per_sample * kPixelBlock;
    block(t / per_sample, first, std::min(kPixelBlock, pixels - first), &partial[t * width]);
  });
  std::vector<double> out(samples * width, 0.0);
  for (int64_t t = 0; t < samples * per_sample; ++t) {
    double *sums = &out[t / per_sample * width];
    for (int64_t k = 0; k < width; ++k) sums[k] += partial[t * width + k];
  }
  return out;
}

// Runs block(sample, first, pixels) over the same blocks, on the pool.
template <typename Block>
void ForEachBlock(int64_t samples, int64_t pixels, const Block &block) {
  const int64_t per_sample = (pixels + kPixelBlock - 1) / kPixelBlock;
  ForEachTask(samples * per_sample, [&](int64_t t) {
    const int64_t first = t % per_sample * kPixelBlock;
    block(t / per_sample, first, std::min(kPixelBlock, pixels - first));
  });
}

}  // namespace
}  // namespace fcos_ops

#endif  // FCOS_OPS_NORM_LOOPS_H_
