// Codebooks and the nearest-code rule shared by every quantizer (torch-free, CPU and CUDA).
//
// A codebook is a table of K float values (K = 16 for 4-bit, 256 for 8-bit blockwise). A
// normalised value x in [-1, 1] gets the code
//
//     order[ #{ i : bound[i] < x } ]
//
// where order is the stable ascending argsort of the table and bound[i] the fp32 midpoint
// (v[i] + v[i+1]) / 2 of neighbours in sorted order. This is "nearest value, an exact tie goes to
// the lower value" and is exactly torch.bucketize(x, bound) followed by order[], which is what
// bitsandbytes computes, so codes are byte-identical with it. For FP4, +0 (nibble 0) and -0
// (nibble 8) sort as equals with nibble 0 first, so (bound, 0] maps to nibble 0 and (0, bound]
// to nibble 8; both dequantize to a zero.
#pragma once

#include <cstdint>

#include "lowbit/numeric.h"

namespace lowbit {

// NF4 (QLoRA): the 16 quantiles of N(0, 1) scaled to [-1, 1], by nibble value.
constexpr float kNF4Code[16] = {-1.0f,
                                -0.6961928009986877f,
                                -0.5250730514526367f,
                                -0.39491748809814453f,
                                -0.28444138169288635f,
                                -0.18477343022823334f,
                                -0.09105003625154495f,
                                0.0f,
                                0.07958029955625534f,
                                0.16093020141124725f,
                                0.24611230194568634f,
                                0.33791524171829224f,
                                0.44070982933044434f,
                                0.5626170039176941f,
                                0.7229568362236023f,
                                1.0f};

// FP4 (E2M1 as in bitsandbytes), by nibble value: bit 3 is the sign, the magnitude table is
// [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12.
constexpr float kFP4Code[16] = {0.0f / 12,  0.0625f / 12,  8.0f / 12,  12.0f / 12,
                                4.0f / 12,  6.0f / 12,     2.0f / 12,  3.0f / 12,
                                -0.0f / 12, -0.0625f / 12, -8.0f / 12, -12.0f / 12,
                                -4.0f / 12, -6.0f / 12,    -2.0f / 12, -3.0f / 12};

enum class QuantType4 : int { nf4 = 0, fp4 = 1 };

LOWBIT_HD const float* code4_table(QuantType4 t) {
  return t == QuantType4::nf4 ? kNF4Code : kFP4Code;
}

// A 16-entry codebook prepared for quantization: the sorted boundaries and the sort order.
struct Codebook16 {
  float value[16];    // by code
  float bound[15];    // midpoints of the sorted values
  uint8_t order[16];  // order[k] = code of the k-th smallest value (stable)
  uint8_t zero_code;  // code used for blocks that quantize to all zeros or hold NaN/Inf
};

// Stable insertion sort of 16 entries; runs once per call on the host.
inline Codebook16 make_codebook16(const float* code) {
  Codebook16 cb{};
  for (int i = 0; i < 16; ++i) cb.value[i] = code[i];
  for (int i = 0; i < 16; ++i) cb.order[i] = uint8_t(i);
  for (int i = 1; i < 16; ++i) {
    uint8_t key = cb.order[i];
    int j = i - 1;
    while (j >= 0 && code[cb.order[j]] > code[key]) {
      cb.order[j + 1] = cb.order[j];
      --j;
    }
    cb.order[j + 1] = key;
  }
  for (int i = 0; i < 15; ++i) cb.bound[i] = (code[cb.order[i]] + code[cb.order[i + 1]]) / 2.0f;
  cb.zero_code = 0;
  float best = 3.0f;
  for (int i = 0; i < 16; ++i) {
    float d = code[i] < 0 ? -code[i] : code[i];
    if (d < best) best = d, cb.zero_code = uint8_t(i);
  }
  return cb;
}

// Position of x among the sorted values: the number of bounds strictly below x. Branch-free so the
// compiler vectorises the loop over elements.
LOWBIT_HD int bucket16(const float* bound, float x) {
  int k = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) k += bound[i] < x ? 1 : 0;
  return k;
}

// Same rule over a sorted 256-entry table (8-bit blockwise): binary search over the 255
// midpoints. Returns the number of bounds strictly below x.
LOWBIT_HD int bucket256(const float* bound255, float x) {
  int lo = 0;  // answer lies in [lo, lo + 256)
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int step = 128; step >= 1; step >>= 1) {
    // bound255[lo + step - 1] < x means at least lo + step bounds are below x.
    if (bound255[lo + step - 1] < x) lo += step;
  }
  return lo;
}

}  // namespace lowbit
