// GroupNorm forward and backward on CPU, as MindSpore AOT custom ops (src/ops/group_norm.py).
//
// Why: MindSpore has no fast CPU GroupNorm; src/model/norm.py builds a portable one from MatMul and
// BatchNorm kernels, about 12 kernels forward and 20 backward per call, which made GroupNorm and
// its kernel launches a large share of a small-configuration training step (docs/performance.md).
// oneDNN's group normalization has only a reference backward for plain NCHW tensors (350 ms on
// 256x100x152 on one thread, against 5 ms forward), so both directions are written here: one
// pass over a group's block for its mean, one for its variance about that mean (no cancellation
// of large means), one to write, as src/model/norm.py's GroupNormFunction.
//
// Ops (params are the inputs then the outputs, plain row-major float32):
//   FcosGroupNormForward:  x (N,C,H,W), gamma (C), beta (C), attrs -> y (N,C,H,W), mean (N,G), rstd (N,G)
//   FcosGroupNormBackward: x, gamma, mean, rstd, dy, attrs -> dx (N,C,H,W), dgamma (C), dbeta (C)
// attrs: float64 (3,) = groups, eps, channels_last (1: x, y, dy, dx in channels-last storage,
// src/ops/backend.py). rstd = 1 / sqrt(biased variance + eps), torch's definition.
// A group's channels are contiguous in NCHW, so one task is one (image, group) block; in
// channels-last storage a task is a block of one image's pixels, all channels at once, and the
// per-channel sums are added up by group (norm_loops.h).
#include <cmath>
#include <cstdint>
#include <exception>
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

struct Shape {
  int64_t n, c, hw, groups, per_group;
  float eps;
  bool channels_last;
  Shape(const int64_t *x, const double *attrs)
      : n(x[0]), c(x[1]), hw(x[2] * x[3]), groups(static_cast<int64_t>(attrs[0])),
        per_group(groups > 0 ? x[1] / groups : 0), eps(static_cast<float>(attrs[1])), channels_last(attrs[2] != 0.0) {}
  bool Valid() const { return groups > 0 && c % groups == 0; }
};

void Forward(const Shape &s, const float *x, const float *gamma, const float *beta, float *y, float *mean,
             float *rstd) {
  const int64_t block = s.per_group * s.hw;
  ForEachTask(s.n * s.groups, [&](int64_t t) {
    const int64_t g = t % s.groups;
    const float *xb = x + t * block;
    double total = 0.0;
    for (int64_t k = 0; k < s.per_group; ++k) total += Sum(xb + k * s.hw, s.hw);
    const float m = static_cast<float>(total / block);
    double squares = 0.0;
    for (int64_t k = 0; k < s.per_group; ++k) squares += SumSquares(xb + k * s.hw, s.hw, m);
    const float r = static_cast<float>(1.0 / std::sqrt(squares / block + s.eps));
    mean[t] = m;
    rstd[t] = r;
    for (int64_t k = 0; k < s.per_group; ++k) {
      const int64_t ch = g * s.per_group + k;
      Affine(xb + k * s.hw, y + t * block + k * s.hw, s.hw, m, r * gamma[ch], beta[ch]);
    }
  });
}

// With xhat = (x - mean) * rstd over a group of M values:
// dx = rstd * (gamma * dy - mean_g(gamma * dy) - xhat * mean_g(gamma * dy * xhat)),
// dgamma = sum over images and pixels of dy * xhat, dbeta = sum of dy.
void Backward(const Shape &s, const float *x, const float *gamma, const float *mean, const float *rstd,
              const float *dy, float *dx, float *dgamma, float *dbeta) {
  const int64_t block = s.per_group * s.hw;
  std::vector<double> sum_dy(s.n * s.c), sum_dy_xhat(s.n * s.c);  // per image and channel
  ForEachTask(s.n * s.groups, [&](int64_t t) {
    const int64_t n = t / s.groups, g = t % s.groups;
    const float m = mean[t], r = rstd[t];
    double mean_dy = 0.0, mean_dy_xhat = 0.0;
    for (int64_t k = 0; k < s.per_group; ++k) {
      const int64_t ch = g * s.per_group + k, offset = t * block + k * s.hw;
      double s1, s2;
      SumDy(dy + offset, x + offset, s.hw, m, &s1, &s2);
      sum_dy[n * s.c + ch] = s1;
      sum_dy_xhat[n * s.c + ch] = s2 * r;
      mean_dy += gamma[ch] * s1;
      mean_dy_xhat += gamma[ch] * s2 * r;
    }
    mean_dy /= block;
    mean_dy_xhat /= block;
    const float b = static_cast<float>(-r * mean_dy), c = static_cast<float>(-r * r * mean_dy_xhat);
    for (int64_t k = 0; k < s.per_group; ++k) {
      const int64_t ch = g * s.per_group + k, offset = t * block + k * s.hw;
      BackwardRow(dy + offset, x + offset, dx + offset, s.hw, m, r * gamma[ch], b, c);
    }
  });
  for (int64_t ch = 0; ch < s.c; ++ch) {
    double dg = 0.0, db = 0.0;
    for (int64_t n = 0; n < s.n; ++n) {
      dg += sum_dy_xhat[n * s.c + ch];
      db += sum_dy[n * s.c + ch];
    }
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(db);
  }
}

// sums (N*C, per image and channel) added up over each group's channels -> (N*G)
std::vector<double> GroupSums(const Shape &s, const std::vector<double> &sums, int64_t width, int64_t offset) {
  std::vector<double> out(s.n * s.groups, 0.0);
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t ch = 0; ch < s.c; ++ch) out[n * s.groups + ch / s.per_group] += sums[n * width + offset + ch];
  }
  return out;
}

// Forward on channels-last storage: per-channel sums of each image's pixel blocks, added up by group.
void ForwardChannelsLast(const Shape &s, const float *x, const float *gamma, const float *beta, float *y, float *mean,
                         float *rstd) {
  const int64_t c = s.c, block = s.per_group * s.hw;
  const auto pixels = [&](int64_t n, int64_t first) { return (n * s.hw + first) * c; };
  const std::vector<double> totals = GroupSums(s, SumBlocks(s.n, s.hw, c, [&](int64_t n, int64_t first, int64_t count,
                                                                              float *acc) {
    SumPixels(x + pixels(n, first), count, c, acc);
  }), c, 0);
  std::vector<float> m(s.n * c), scale(s.n * c);  // per image and channel: its group's mean, rstd * gamma
  for (int64_t t = 0; t < s.n * s.groups; ++t) mean[t] = static_cast<float>(totals[t] / block);
  for (int64_t i = 0; i < s.n * c; ++i) m[i] = mean[i / c * s.groups + i % c / s.per_group];
  const std::vector<double> squares = GroupSums(s, SumBlocks(s.n, s.hw, c, [&](int64_t n, int64_t first,
                                                                               int64_t count, float *acc) {
    SumSquaresPixels(x + pixels(n, first), count, c, &m[n * c], acc);
  }), c, 0);
  for (int64_t t = 0; t < s.n * s.groups; ++t) rstd[t] = static_cast<float>(1.0 / std::sqrt(squares[t] / block + s.eps));
  for (int64_t i = 0; i < s.n * c; ++i) scale[i] = rstd[i / c * s.groups + i % c / s.per_group] * gamma[i % c];
  ForEachBlock(s.n, s.hw, [&](int64_t n, int64_t first, int64_t count) {
    AffinePixels(x + pixels(n, first), y + pixels(n, first), count, c, &m[n * c], &scale[n * c], beta, false);
  });
}

// Backward on channels-last storage (the formulas of Backward).
void BackwardChannelsLast(const Shape &s, const float *x, const float *gamma, const float *mean, const float *rstd,
                          const float *dy, float *dx, float *dgamma, float *dbeta) {
  const int64_t c = s.c, block = s.per_group * s.hw;
  const auto pixels = [&](int64_t n, int64_t first) { return (n * s.hw + first) * c; };
  const auto group = [&](int64_t i) { return i / c * s.groups + i % c / s.per_group; };  // (image, channel) -> t
  std::vector<float> m(s.n * c), a(s.n * c), b(s.n * c), cc(s.n * c);
  for (int64_t i = 0; i < s.n * c; ++i) m[i] = mean[group(i)];
  // sums[n * 2C + ch]: sum of dy; sums[n * 2C + C + ch]: sum of dy * (x - mean)
  const std::vector<double> sums = SumBlocks(s.n, s.hw, 2 * c, [&](int64_t n, int64_t first, int64_t count,
                                                                    float *acc) {
    // no ReLU: the mask's a and b are not read (any valid pointers)
    SumDyPixels(dy + pixels(n, first), x + pixels(n, first), count, c, &m[n * c], &m[n * c], &m[n * c], false, acc,
                acc + c);
  });
  std::vector<double> mean_dy(s.n * s.groups, 0.0), mean_dy_xhat(s.n * s.groups, 0.0);
  for (int64_t i = 0; i < s.n * c; ++i) {
    const int64_t n = i / c, ch = i % c, t = group(i);
    mean_dy[t] += gamma[ch] * sums[n * 2 * c + ch] / block;
    mean_dy_xhat[t] += gamma[ch] * sums[n * 2 * c + c + ch] * rstd[t] / block;
  }
  for (int64_t i = 0; i < s.n * c; ++i) {
    const int64_t t = group(i);
    const float r = rstd[t];
    a[i] = r * gamma[i % c];
    b[i] = static_cast<float>(-r * mean_dy[t]);
    cc[i] = static_cast<float>(-r * r * mean_dy_xhat[t]);
  }
  ForEachBlock(s.n, s.hw, [&](int64_t n, int64_t first, int64_t count) {
    BackwardPixels(dy + pixels(n, first), x + pixels(n, first), dx + pixels(n, first), count, c, &m[n * c], &m[n * c],
                   &m[n * c], false, &a[n * c], &b[n * c], &cc[n * c]);
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    double dg = 0.0, db = 0.0;
    for (int64_t n = 0; n < s.n; ++n) {
      dg += sums[n * 2 * c + c + ch] * rstd[n * s.groups + ch / s.per_group];
      db += sums[n * 2 * c + ch];
    }
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(db);
  }
}

}  // namespace

// x, gamma, beta, attrs -> y, mean, rstd
extern "C" int FcosGroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                    void *) {
  if (!ExpectedArgs(nparam, 7, ndims)) return 1;
  Shape s(shapes[0], static_cast<const double *>(params[3]));
  if (!s.Valid()) return 1;
  try {
    (s.channels_last ? ForwardChannelsLast : Forward)(
        s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
        static_cast<const float *>(params[2]), static_cast<float *>(params[4]), static_cast<float *>(params[5]),
        static_cast<float *>(params[6]));
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

// x, gamma, mean, rstd, dy, attrs -> dx, dgamma, dbeta
extern "C" int FcosGroupNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  if (!ExpectedArgs(nparam, 9, ndims)) return 1;
  Shape s(shapes[0], static_cast<const double *>(params[5]));
  if (!s.Valid()) return 1;
  try {
    (s.channels_last ? BackwardChannelsLast : Backward)(s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
             static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
             static_cast<const float *>(params[4]), static_cast<float *>(params[6]), static_cast<float *>(params[7]),
             static_cast<float *>(params[8]));
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}
