// The squared L2 norm of many tensors at once, as a MindSpore AOT custom op (src/ops/global_norm.py):
// the training step's gradient norm (clipping and the non-finite guard) in one kernel instead of a
// dot product per gradient and their sum (119 + 1 kernels for ResNet-18 FCOS).
//
// Op: FcosSquaredNorm: t_1, ..., t_n (float32, any shapes) -> (1,) float32 = sum of every t_i^2,
// accumulated in float64 per chunk; NaN or infinity in any input, or a sum beyond float32's range,
// gives a non-finite result, as the dot products did.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "runtime.h"

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements a task sums

struct Chunk {
  const float *data;
  int64_t size;
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
double SumSquares(const float *x, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

}  // namespace

extern "C" int FcosSquaredNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                               void *) {
  if (nparam < 2) return 1;
  try {
    std::vector<Chunk> chunks;
    for (int i = 0; i < nparam - 1; ++i) {
      int64_t size = 1;
      for (int d = 0; d < ndims[i]; ++d) size *= shapes[i][d];
      const float *data = static_cast<const float *>(params[i]);
      for (int64_t begin = 0; begin < size; begin += kChunk) {
        chunks.push_back({data + begin, std::min(kChunk, size - begin)});
      }
    }
    std::vector<double> partial(chunks.size());
    fcos_ops::ForEachTask(static_cast<int64_t>(chunks.size()),
                          [&](int64_t c) { partial[c] = SumSquares(chunks[c].data, chunks[c].size); });
    double total = 0.0;
    for (double p : partial) total += p;
    *static_cast<float *>(params[nparam - 1]) = static_cast<float>(total);
  } catch (const std::exception &) {  // std::bad_alloc
    return 1;
  }
  return 0;
}
