// Trained BatchNorm (batch statistics) forward and backward on CPU, as MindSpore AOT custom ops
// (src/ops/batch_norm.py).
//
// Why: MindSpore's CPU BatchNorm and BatchNormGrad kernels took 35 ms of a 377 ms small-config
// training step (ResNet-18 backbone with trained BatchNorm, 256x256, batch 4; MindSpore's profiler,
// docs/performance.md), torch's 22 ms. A channel's N*H*W values are one task here: one pass for the
// mean, one for the variance about it (no cancellation of large means), one to write, while the
// channel sits in the core's cache; the backward likewise (sums, then dx).
//
// Ops (params are the inputs then the outputs, plain row-major float32):
//   FcosBatchNormForward:  x (N,C,H,W), gamma (C), beta (C), moving_mean (C), moving_variance (C), attrs
//                          -> y (N,C,H,W), mean (C), rstd (C), new moving_mean (C), new moving_variance (C)
//   FcosBatchNormBackward: x, gamma, beta, mean, rstd, dy, attrs -> dx (N,C,H,W), dgamma (C), dbeta (C)
//   FcosBatchNormInference: x, gamma, beta, moving_mean, moving_variance, attrs -> y (N,C,H,W), normalised
//                          with the running statistics (out of training)
// attrs: float64 (4,) = eps, momentum (the weight of the batch in the running statistics: MindSpore's
// nn.BatchNorm2d(momentum=0.9) -> 0.1, torch's momentum), relu (1: y = max(0, BatchNorm(x)), the
// ReLU that follows a backbone norm, saving its own pass over the tensor each way; the backward
// recomputes the mask from x), channels_last (1: x, y, dy, dx in channels-last storage,
// src/ops/backend.py). rstd = 1 / sqrt(biased variance + eps); the running variance takes
// the unbiased variance (MindSpore's and torch's rule). In channels-last storage a task is a block
// of pixels, all channels at once (norm_loops.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "norm_loops.h"
#include "runtime.h"

namespace {

using fcos_ops::Affine;
using fcos_ops::AffinePixels;
using fcos_ops::BackwardPixels;
using fcos_ops::BackwardRow;
using fcos_ops::ExpectedArgs;
using fcos_ops::ForEachBlock;
using fcos_ops::ForEachTask;
using fcos_ops::Sum;
using fcos_ops::SumBlocks;
using fcos_ops::SumDy;
using fcos_ops::SumDyPixels;
using fcos_ops::SumPixels;
using fcos_ops::SumSquares;
using fcos_ops::SumSquaresPixels;

// y = max(0, (x - m) * a + b)
FCOS_CLONES void AffineRelu(const float *x, float *y, int64_t n, float m, float a, float b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = std::max((x[i] - m) * a + b, 0.0f);
}

// SumDy of the gradient through the ReLU of (x - m) * a + b: dy where that is positive, else 0
FCOS_CLONES void SumDyRelu(const float *dy, const float *x, int64_t n, float m, float a, float b, double *s1,
                           double *s2) {
  float u = 0.0f, v = 0.0f;
#pragma omp simd reduction(+ : u, v)
  for (int64_t i = 0; i < n; ++i) {
    const float g = (x[i] - m) * a + b > 0.0f ? dy[i] : 0.0f;
    u += g;
    v += g * (x[i] - m);
  }
  *s1 = u;
  *s2 = v;
}

// BackwardRow of the gradient through that ReLU: dx = g * a + (x - m) * c + b2
FCOS_CLONES void BackwardRowRelu(const float *dy, const float *x, float *dx, int64_t n, float m, float a, float b,
                                 float a2, float b2, float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = (x[i] - m) * a + b > 0.0f ? dy[i] : 0.0f;
    dx[i] = g * a2 + (x[i] - m) * c + b2;
  }
}

struct Shape {
  int64_t n, c, hw, count;  // count: values per channel, N*H*W
  explicit Shape(const int64_t *x) : n(x[0]), c(x[1]), hw(x[2] * x[3]), count(x[0] * x[2] * x[3]) {}
};

// The running statistics' update, and the batch's mean and rstd, from a channel's sums.
void Statistics(const Shape &s, const double *attrs, int64_t ch, double total, double squares,
                const float *moving_mean, const float *moving_var, float *mean, float *rstd, float *new_mean,
                float *new_var) {
  const double momentum = attrs[1], var = squares / s.count;
  mean[ch] = static_cast<float>(total / s.count);
  rstd[ch] = static_cast<float>(1.0 / std::sqrt(var + static_cast<float>(attrs[0])));
  const double unbiased = s.count > 1 ? squares / (s.count - 1) : var;
  new_mean[ch] = static_cast<float>((1.0 - momentum) * moving_mean[ch] + momentum * mean[ch]);
  new_var[ch] = static_cast<float>((1.0 - momentum) * moving_var[ch] + momentum * unbiased);
}

void Forward(const Shape &s, const double *attrs, const float *x, const float *gamma, const float *beta,
             const float *moving_mean, const float *moving_var, float *y, float *mean, float *rstd, float *new_mean,
             float *new_var) {
  const bool relu = attrs[2] != 0.0;
  ForEachTask(s.c, [&](int64_t ch) {
    double total = 0.0;
    for (int64_t n = 0; n < s.n; ++n) total += Sum(x + (n * s.c + ch) * s.hw, s.hw);
    const float m = static_cast<float>(total / s.count);
    double squares = 0.0;
    for (int64_t n = 0; n < s.n; ++n) squares += SumSquares(x + (n * s.c + ch) * s.hw, s.hw, m);
    Statistics(s, attrs, ch, total, squares, moving_mean, moving_var, mean, rstd, new_mean, new_var);
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t offset = (n * s.c + ch) * s.hw;
      if (relu) {
        AffineRelu(x + offset, y + offset, s.hw, m, rstd[ch] * gamma[ch], beta[ch]);
      } else {
        Affine(x + offset, y + offset, s.hw, m, rstd[ch] * gamma[ch], beta[ch]);
      }
    }
  });
}

// With xhat = (x - mean) * rstd over a channel's M values and g = dy (or dy masked by the ReLU):
// dx = gamma * rstd * (g - mean(g) - xhat * mean(g * xhat)), dgamma = sum of g * xhat, dbeta = sum of g.
void Backward(const Shape &s, const double *attrs, const float *x, const float *gamma, const float *beta,
              const float *mean, const float *rstd, const float *dy, float *dx, float *dgamma, float *dbeta) {
  const bool relu = attrs[2] != 0.0;
  ForEachTask(s.c, [&](int64_t ch) {
    const float m = mean[ch], r = rstd[ch], scale = r * gamma[ch];  // scale, beta: the forward's affine
    double sum_dy = 0.0, sum_dy_xmu = 0.0;
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t offset = (n * s.c + ch) * s.hw;
      double s1, s2;
      if (relu) {
        SumDyRelu(dy + offset, x + offset, s.hw, m, scale, beta[ch], &s1, &s2);
      } else {
        SumDy(dy + offset, x + offset, s.hw, m, &s1, &s2);
      }
      sum_dy += s1;
      sum_dy_xmu += s2;
    }
    const double a = static_cast<double>(gamma[ch]) * r;
    const float b = static_cast<float>(-a * sum_dy / s.count);
    const float c = static_cast<float>(-a * r * r * sum_dy_xmu / s.count);
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t offset = (n * s.c + ch) * s.hw;
      if (relu) {
        BackwardRowRelu(dy + offset, x + offset, dx + offset, s.hw, m, scale, beta[ch], static_cast<float>(a), b, c);
      } else {
        BackwardRow(dy + offset, x + offset, dx + offset, s.hw, m, static_cast<float>(a), b, c);
      }
    }
    dgamma[ch] = static_cast<float>(sum_dy_xmu * r);
    dbeta[ch] = static_cast<float>(sum_dy);
  });
}

// Forward on channels-last storage: the same sums, per block of pixels for all channels.
void ForwardChannelsLast(const Shape &s, const double *attrs, const float *x, const float *gamma, const float *beta,
                         const float *moving_mean, const float *moving_var, float *y, float *mean, float *rstd,
                         float *new_mean, float *new_var) {
  const int64_t c = s.c;
  const std::vector<double> totals = SumBlocks(1, s.count, c, [&](int64_t, int64_t first, int64_t n, float *acc) {
    SumPixels(x + first * c, n, c, acc);
  });
  std::vector<float> m(c), scale(c);
  for (int64_t ch = 0; ch < c; ++ch) m[ch] = static_cast<float>(totals[ch] / s.count);
  const std::vector<double> squares = SumBlocks(1, s.count, c, [&](int64_t, int64_t first, int64_t n, float *acc) {
    SumSquaresPixels(x + first * c, n, c, m.data(), acc);
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    Statistics(s, attrs, ch, totals[ch], squares[ch], moving_mean, moving_var, mean, rstd, new_mean, new_var);
    scale[ch] = rstd[ch] * gamma[ch];
  }
  ForEachBlock(1, s.count, [&](int64_t, int64_t first, int64_t n) {
    AffinePixels(x + first * c, y + first * c, n, c, mean, scale.data(), beta, attrs[2] != 0.0);
  });
}

// Backward on channels-last storage (the formulas of Backward).
void BackwardChannelsLast(const Shape &s, const double *attrs, const float *x, const float *gamma, const float *beta,
                          const float *mean, const float *rstd, const float *dy, float *dx, float *dgamma,
                          float *dbeta) {
  const int64_t c = s.c;
  const bool relu = attrs[2] != 0.0;
  std::vector<float> scale(c), a(c), b(c), cc(c);
  for (int64_t ch = 0; ch < c; ++ch) scale[ch] = rstd[ch] * gamma[ch];
  const std::vector<double> sums = SumBlocks(1, s.count, 2 * c, [&](int64_t, int64_t first, int64_t n, float *acc) {
    SumDyPixels(dy + first * c, x + first * c, n, c, mean, scale.data(), beta, relu, acc, acc + c);
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    const double r = rstd[ch], sum_dy = sums[ch], sum_dy_xmu = sums[c + ch], a_ch = gamma[ch] * r;
    a[ch] = static_cast<float>(a_ch);
    b[ch] = static_cast<float>(-a_ch * sum_dy / s.count);
    cc[ch] = static_cast<float>(-a_ch * r * r * sum_dy_xmu / s.count);
    dgamma[ch] = static_cast<float>(sum_dy_xmu * r);
    dbeta[ch] = static_cast<float>(sum_dy);
  }
  ForEachBlock(1, s.count, [&](int64_t, int64_t first, int64_t n) {
    BackwardPixels(dy + first * c, x + first * c, dx + first * c, n, c, mean, scale.data(), beta, relu, a.data(),
                   b.data(), cc.data());
  });
}

bool ChannelsLast(const double *attrs) { return attrs[3] != 0.0; }

}  // namespace

// x, gamma, beta, moving_mean, moving_variance, attrs -> y, mean, rstd, new moving_mean, new moving_variance
extern "C" int FcosBatchNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                    void *) {
  if (!ExpectedArgs(nparam, 11, ndims)) return 1;
  const Shape s(shapes[0]);
  if (s.count == 0) return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  auto out = [&](int i) { return static_cast<float *>(params[i]); };
  const double *attrs = static_cast<const double *>(params[5]);
  try {
    (ChannelsLast(attrs) ? ForwardChannelsLast : Forward)(s, attrs, in(0), in(1), in(2), in(3), in(4), out(6), out(7),
                                                          out(8), out(9), out(10));
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

// x, gamma, beta, moving_mean, moving_variance, attrs -> y
extern "C" int FcosBatchNormInference(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                      void *) {
  if (!ExpectedArgs(nparam, 7, ndims)) return 1;
  const Shape s(shapes[0]);
  const float *x = static_cast<const float *>(params[0]), *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]), *mean = static_cast<const float *>(params[3]);
  const float *var = static_cast<const float *>(params[4]);
  const double *attrs = static_cast<const double *>(params[5]);
  float *y = static_cast<float *>(params[6]);
  const bool relu = attrs[2] != 0.0;
  try {
    std::vector<float> scale(s.c);
    for (int64_t ch = 0; ch < s.c; ++ch) {
      scale[ch] = static_cast<float>(gamma[ch] / std::sqrt(static_cast<double>(var[ch]) + static_cast<float>(attrs[0])));
    }
    if (ChannelsLast(attrs)) {
      ForEachBlock(1, s.count, [&](int64_t, int64_t first, int64_t n) {
        AffinePixels(x + first * s.c, y + first * s.c, n, s.c, mean, scale.data(), beta, relu);
      });
    } else {
      ForEachTask(s.n * s.c, [&](int64_t plane) {
        const int64_t ch = plane % s.c;
        (relu ? AffineRelu : Affine)(x + plane * s.hw, y + plane * s.hw, s.hw, mean[ch], scale[ch], beta[ch]);
      });
    }
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

// x, gamma, beta, mean, rstd, dy, attrs -> dx, dgamma, dbeta
extern "C" int FcosBatchNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  if (!ExpectedArgs(nparam, 10, ndims)) return 1;
  const Shape s(shapes[0]);
  if (s.count == 0) return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  auto out = [&](int i) { return static_cast<float *>(params[i]); };
  const double *attrs = static_cast<const double *>(params[6]);
  try {
    (ChannelsLast(attrs) ? BackwardChannelsLast : Backward)(s, attrs, in(0), in(1), in(2), in(3), in(4), in(5), out(7),
                                                            out(8), out(9));
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}
