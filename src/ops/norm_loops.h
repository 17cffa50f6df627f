// The vectorised loops over one row of a normalisation (a channel's H*W values) and the argument
// check that the GroupNorm and BatchNorm kernels share (src/ops/group_norm.cc, src/ops/batch_norm.cc).
#ifndef FCOS_OPS_NORM_LOOPS_H_
#define FCOS_OPS_NORM_LOOPS_H_

#include <cstdint>

// The loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC
// function multi-versioning), since the library is built once for whatever CPU runs it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FCOS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FCOS_CLONES
#endif

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

}  // namespace
}  // namespace fcos_ops

#endif  // FCOS_OPS_NORM_LOOPS_H_
