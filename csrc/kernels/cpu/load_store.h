// Typed element access for the CPU kernels. dispatch_float lives in lowbit/numeric.h (shared with
// the CUDA kernels); it is named here so the CPU kernels find it in their own namespace.
#pragma once

#include <cstdint>

#include "lowbit/numeric.h"

namespace lowbit::cpu {

using lowbit::dispatch_float;

// Dot product of two fp32 rows (the scalar kernels' fused products): eight partial sums let the
// compiler vectorise without reassociating a single sum.
inline float dot_f32(const float* x, const float* w, int64_t K) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int u = 0; u < 8; ++u) acc[u] += x[k + u] * w[k + u];
  float tail = 0.0f;
  for (; k < K; ++k) tail += x[k] * w[k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

}  // namespace lowbit::cpu
