// The stem's max-pool (3x3, stride 2, padding 1, torch's MaxPool2d(3, 2, 1)) on CPU, as MindSpore AOT
// custom ops (src/ops/pooling.py).
//
// Why: src/model/backbone.py's StemMaxPool pads by concatenating zeros (MindSpore's Pad kernel
// is slow and a padded MaxPool does not export) and runs MindSpore's pool and its gradient. On
// the small configuration's stem output (4x64x128x128) forward + backward took 30 ms that way
// and 20 ms here (timed with a weighted sum around both, GRAPH mode, 2 cores). The kernels below
// find each window's maximum without branches and the backward gathers into dx row by row: on
// 4x64x160x160 (the quick start's stem) forward 3.3 ms and backward 16.5 ms of a training step,
// against 4.9 and 20.3 ms for a plain scatter (MindSpore's profiler; docs/performance.md).
//
// Ops (params are the inputs then the outputs, plain row-major float32):
//   FcosMaxPoolForward:  x (N,C,H,W) -> y (N,C,ceil(H/2),ceil(W/2))
//   FcosMaxPoolBackward: x, dy -> dx (N,C,H,W)
//   FcosMaxPoolForwardChannelsLast, FcosMaxPoolBackwardChannelsLast: the same on channels-last
//   storage (src/ops/backend.py), every channel of a pixel at once; the backward first finds every
//   window's maxima (one pass, like the forward), then gathers each dx row as below.
// y is the maximum over the window's rows 2i-1..2i+1 and columns 2j-1..2j+1 inside the map (the
// padding is -inf, as torch's). The backward sends dy to the window's first maximum in row-major
// order (torch's choice) and recomputes it from x instead of storing indices; the results are
// bitwise those of a scatter over the windows in (i, j) order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

#include "runtime.h"

namespace {

struct Plane {
  int64_t planes, h, w, oh, ow;
  explicit Plane(const int64_t *x) : planes(x[0] * x[1]), h(x[2]), w(x[3]), oh((x[2] + 1) / 2), ow((x[3] + 1) / 2) {}
};

// Output row i of one plane: each window's first maximum (row-major, strict >, as torch) -> its value
// best[j] and, with kCodes, its place code[j] = 3 * (r - (2i - 1)) + (c - (2j - 1)) in the 3x3 window.
template <bool kCodes>
void RowMaxima(const float *x, const Plane &s, int64_t i, float *best, int8_t *code) {
  const int64_t r0 = i > 0 ? 2 * i - 1 : 0, r1 = 2 * i + 1 < s.h ? 2 * i + 1 : s.h - 1;
  const int8_t top = static_cast<int8_t>(3 * (r0 - (2 * i - 1)));
  // Windows cut by the map's edge (j = 0, and j >= w / 2, whose column 2j + 1 is outside): scalar.
  auto edge = [&](int64_t j) {
    const int64_t c0 = j > 0 ? 2 * j - 1 : 0, c1 = 2 * j + 1 < s.w ? 2 * j + 1 : s.w - 1;
    float b = x[r0 * s.w + c0];
    int8_t k = static_cast<int8_t>(top + (c0 - (2 * j - 1)));
    for (int64_t r = r0; r <= r1; ++r) {
      for (int64_t c = c0; c <= c1; ++c) {
        const float v = x[r * s.w + c];
        if (v > b) {
          b = v;
          k = static_cast<int8_t>(3 * (r - (2 * i - 1)) + (c - (2 * j - 1)));
        }
      }
    }
    best[j] = b;
    if (kCodes) code[j] = k;
  };
  const int64_t inner_end = s.w / 2;  // windows 1 .. w/2 - 1 have all three columns
  edge(0);
  for (int64_t j = 1; j < inner_end; ++j) {
    const float *p = x + r0 * s.w + 2 * j - 1;
    float b = p[0];
    int k = top;
    for (int64_t r = r0; r <= r1; ++r, p += s.w) {
      const int row = 3 * static_cast<int>(r - (2 * i - 1));
      for (int c = 0; c < 3; ++c) {
        // A mask, not `?:`, which g++ -O2 compiles to a branch here: the maxima lie at random, and
        // the places of 4x64x160x160's windows took 13.7 ms with the branch, 8 ms with the mask.
        const int take = -static_cast<int>(p[c] > b);
        b = p[c] > b ? p[c] : b;
        if (kCodes) k = (k & ~take) | ((row + c) & take);
      }
    }
    best[j] = b;
    if (kCodes) code[j] = static_cast<int8_t>(k);
  }
  for (int64_t j = std::max<int64_t>(inner_end, 1); j < s.ow; ++j) edge(j);
}

// v if take, else +0.0f, by a bit mask (g++ -O2 compiles `take ? v : 0.0f` to a branch)
inline float Masked(bool take, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= 0u - static_cast<uint32_t>(take);
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}

// RowMaxima over a whole plane, in buffers kept per thread (the backward reads the codes).
struct PlaneMaxima {
  std::vector<float> best;
  std::vector<int8_t> code;
  void Compute(const float *x, const Plane &s) {
    best.resize(s.oh * s.ow);
    code.resize(s.oh * s.ow);
    for (int64_t i = 0; i < s.oh; ++i) RowMaxima<true>(x, s, i, &best[i * s.ow], &code[i * s.ow]);
  }
};

// Channels-last storage: c values per pixel. b[k] = max(b[k], v[k]) and code[k] = here where v[k] is
// larger (strict >: the first maximum stays).
FCOS_CLONES void MaxInto(const float *v, float *b, int8_t *code, int8_t here, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) {
    const bool take = v[k] > b[k];
    b[k] = take ? v[k] : b[k];
    code[k] = take ? here : code[k];
  }
}

// Window row i of one channels-last image x (h, w, c): best[j * c + k], code[j * c + k] as RowMaxima's.
void RowMaximaChannelsLast(const float *x, const Plane &s, int64_t c, int64_t i, float *best, int8_t *code) {
  const int64_t r0 = i > 0 ? 2 * i - 1 : 0, r1 = 2 * i + 1 < s.h ? 2 * i + 1 : s.h - 1;
  for (int64_t j = 0; j < s.ow; ++j) {
    const int64_t c0 = j > 0 ? 2 * j - 1 : 0, c1 = 2 * j + 1 < s.w ? 2 * j + 1 : s.w - 1;
    float *b = best + j * c;
    int8_t *k = code + j * c;
    std::memcpy(b, x + (r0 * s.w + c0) * c, sizeof(float) * c);
    std::memset(k, static_cast<int>(3 * (r0 - (2 * i - 1)) + (c0 - (2 * j - 1))), c);
    for (int64_t r = r0; r <= r1; ++r) {
      for (int64_t col = r == r0 ? c0 + 1 : c0; col <= c1; ++col) {
        MaxInto(x + (r * s.w + col) * c, b, k, static_cast<int8_t>(3 * (r - (2 * i - 1)) + (col - (2 * j - 1))), c);
      }
    }
  }
}

// out[k] += g[k] where code[k] == at
FCOS_CLONES void AddWhere(const int8_t *code, int at, const float *g, float *out, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) out[k] += code[k] == at ? g[k] : 0.0f;
}

}  // namespace

// x -> y (channels-last storage)
extern "C" int FcosMaxPoolForwardChannelsLast(int nparam, void **params, int *ndims, int64_t **shapes, const char **,
                                              void *, void *) {
  if (nparam != 2 || ndims[0] != 4) return 1;
  const Plane s(shapes[0]);
  const int64_t n = shapes[0][0], c = shapes[0][1];
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  fcos_ops::ForEachTask(n * s.oh, [&](int64_t t) {
    thread_local std::vector<int8_t> code;
    code.resize(s.ow * c);
    RowMaximaChannelsLast(x + t / s.oh * s.h * s.w * c, s, c, t % s.oh, y + t * s.ow * c, code.data());
  });
  return 0;
}

// x, dy -> dx (channels-last storage): the windows' maxima, then each dx row gathered from the
// window rows that cover it, in the order of FcosMaxPoolBackward.
extern "C" int FcosMaxPoolBackwardChannelsLast(int nparam, void **params, int *ndims, int64_t **shapes,
                                               const char **, void *, void *) {
  if (nparam != 3 || ndims[0] != 4) return 1;
  const Plane s(shapes[0]);
  const int64_t n = shapes[0][0], c = shapes[0][1];
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  try {
    std::vector<int8_t> codes(n * s.oh * s.ow * c);
    fcos_ops::ForEachTask(n * s.oh, [&](int64_t t) {
      thread_local std::vector<float> best;
      best.resize(s.ow * c);
      RowMaximaChannelsLast(x + t / s.oh * s.h * s.w * c, s, c, t % s.oh, best.data(), &codes[t * s.ow * c]);
    });
    fcos_ops::ForEachTask(n * s.h, [&](int64_t task) {
      const int64_t image = task / s.h, r = task % s.h;
      const int rows = r % 2 == 1 && r / 2 + 1 < s.oh ? 2 : 1;
      float *out = dx + task * s.w * c;
      std::memset(out, 0, sizeof(float) * s.w * c);
      for (int t = 0; t < rows; ++t) {
        const int64_t i = r / 2 + t, window_row = (image * s.oh + i) * s.ow;
        const int offset = static_cast<int>(3 * (r - (2 * i - 1)));
        for (int64_t col = 0; col < s.w; ++col) {
          const int64_t j = col / 2;
          const int8_t *code = &codes[(window_row + j) * c];
          const float *grad = dy + (window_row + j) * c;
          float *cell = out + col * c;
          if (col % 2 == 0) {
            AddWhere(code, offset + 1, grad, cell, c);
          } else {
            AddWhere(code, offset + 2, grad, cell, c);
            if (j + 1 < s.ow) AddWhere(code + c, offset, grad + c, cell, c);
          }
        }
      }
    });
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}

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
    for (int64_t i = 0; i < s.oh; ++i) RowMaxima<false>(xp, s, i, yp + i * s.ow, nullptr);
  });
  return 0;
}

// x, dy -> dx: every input row gathers from the (one or two) window rows that cover it, so dx is
// written once, in order, with no zeroing pass.
extern "C" int FcosMaxPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                   void *) {
  if (nparam != 3 || ndims[0] != 4) return 1;
  const Plane s(shapes[0]);
  const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  fcos_ops::ForEachTask(s.planes, [&](int64_t p) {
    thread_local PlaneMaxima maxima;
    maxima.Compute(x + p * s.h * s.w, s);
    const float *dyp = dy + p * s.oh * s.ow;
    float *dxp = dx + p * s.h * s.w;
    for (int64_t r = 0; r < s.h; ++r) {
      // The window rows covering input row r: r / 2 alone (r even), or r / 2 and r / 2 + 1 (r odd,
      // the second one only inside the map), summed in that order, as a scatter over (i, j) would.
      const int rows = r % 2 == 1 && r / 2 + 1 < s.oh ? 2 : 1;
      const int8_t *code[2];
      const float *grad[2];
      int8_t offset[2];  // code of (row r, column 2j - 1) in window j
      for (int t = 0; t < rows; ++t) {
        const int64_t i = r / 2 + t;
        code[t] = &maxima.code[i * s.ow];
        grad[t] = dyp + i * s.ow;
        offset[t] = static_cast<int8_t>(3 * (r - (2 * i - 1)));
      }
      float *out = dxp + r * s.w;
      // Column 2j takes window j's middle column; column 2j + 1 window j's right and window j + 1's
      // left. Masks, not branches: the maxima lie at random, and branches were mispredicted.
      for (int64_t j = 0; j < s.ow; ++j) {
        const int64_t next = j + 1 < s.ow ? j + 1 : j;
        float even = 0.0f, odd = 0.0f;
        for (int t = 0; t < rows; ++t) {
          const int at = code[t][j] - offset[t];
          even += Masked(at == 1, grad[t][j]);
          odd += Masked(at == 2, grad[t][j]);
          odd += Masked(next != j && code[t][next] - offset[t] == 0, grad[t][next]);
        }
        out[2 * j] = even;
        if (2 * j + 1 < s.w) out[2 * j + 1] = odd;
      }
    }
  });
  return 0;
}
