// Affine 4/8-bit weights: the generic (scalar) kernels, and the public entry points of
// lowbit/cpu_kernels.h (affine section) that pick the active ISA's kernels.
#include <algorithm>
#include <cmath>

#include "affine_kernels.h"
#include "load_store.h"
#include "lowbit/blockscale.h"
#include "lowbit/cpu_isa.h"

namespace lowbit::cpu {

namespace generic {

namespace {

constexpr float kFltMax = 3.4028234663852886e38f;

// Code of flat element e: bits 4 -> nibble (even elements in the high nibble of byte e / 2).
inline int code_at(const uint8_t* packed, int bits, int64_t e) {
  if (bits == 8) return packed[e];
  return (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF;
}

// dst[e - e0] = (float(q[e]) - zero[g]) * scale[g] for e in [e0, e1), one group segment at a time
// (scale and zero loaded once per segment, no division in the inner loop).
template <typename T>
void decode_range(const AffineWeight& w, int64_t e0, int64_t e1, T* dst) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t g = e / w.group_size;
    const int64_t seg_end = std::min(e1, (g + 1) * w.group_size);
    const float s = w.scales[g], z = w.zeros[g];
    for (; e < seg_end; ++e) *dst++ = from_float<T>((float(code_at(w.packed, w.bits, e)) - z) * s);
  }
}

template <typename T>
void quantize_impl(const T* a, int64_t gs, int bits, bool symmetric, uint8_t* packed, float* scales,
                   float* zeros, int64_t g0, int64_t g1) {
  const float qmax = float((1 << bits) - 1);
  const float base_zero = symmetric ? float(1 << (bits - 1)) : 0.0f;
  for (int64_t g = g0; g < g1; ++g) {
    const T* x = a + g * gs;
    // Range over the finite elements; 0 is always inside it (asymmetric) or its centre.
    float lo = 0.0f, hi = 0.0f;
    bool bad = false;
    for (int64_t i = 0; i < gs; ++i) {
      const float v = to_float(x[i]);
      if (!(abs_f(v) <= kFltMax)) {
        bad = true;
        continue;
      }
      if (symmetric) {
        hi = abs_f(v) > hi ? abs_f(v) : hi;
      } else {
        hi = v > hi ? v : hi;
        lo = v < lo ? v : lo;
      }
    }
    if (symmetric) lo = -hi;
    float scale = (hi - lo) / qmax;
    if (std::isinf(scale)) scale = hi / qmax - lo / qmax;  // hi - lo overflowed
    float zero = base_zero;
    const bool special = bad || !(scale > 0.0f);
    if (bad)
      scale = bits_float(0x7fc00000u);  // NaN: the group decodes to NaN
    else if (special)
      scale = 0.0f;  // all zeros (or a range that underflows): decodes to zeros
    else if (!symmetric)
      zero = std::min(std::max(std::nearbyint(-lo / scale), 0.0f), qmax) + 0.0f;  // never -0.0
    scales[g] = scale;
    zeros[g] = zero;
    for (int64_t i = 0; i < gs; ++i) {
      float q = zero;
      if (!special)
        q = std::min(std::max(std::nearbyint(to_float(x[i]) / scale) + zero, 0.0f), qmax);
      const int64_t e = g * gs + i;
      if (bits == 8)
        packed[e] = uint8_t(q);
      else
        packed[e >> 1] |= uint8_t(int(q) << ((~e & 1) << 2));
    }
  }
}

}  // namespace

void dequantize_affine(const AffineWeight& w, FloatType t, void* out, int64_t g_begin,
                       int64_t g_end) {
  const int64_t e0 = g_begin * w.group_size, e1 = g_end * w.group_size;
  if (e0 >= e1) return;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    decode_range(w, e0, e1, static_cast<T*>(out) + e0);
  });
}

void gemm_affine(const float* a, int64_t M, int64_t K, const AffineWeight& w, float* out, int64_t N,
                 int64_t n_begin, int64_t n_end, float* row_scratch) {
  for (int64_t j = n_begin; j < n_end; ++j) {
    decode_range(w, j * K, (j + 1) * K, row_scratch);
    for (int64_t m = 0; m < M; ++m) out[m * N + j] = dot_f32(a + m * K, row_scratch, K);
  }
}

void quantize_affine(FloatType t, const void* a, int64_t group_size, int bits, bool symmetric,
                     uint8_t* packed, float* scales, float* zeros, int64_t g_begin, int64_t g_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_impl(static_cast<const T*>(a), group_size, bits, symmetric, packed, scales, zeros,
                  g_begin, g_end);
  });
}

}  // namespace generic

// ---- public entry points
// -------------------------------------------------------------------------

void quantize_affine(FloatType t, const void* a, int64_t group_size, int bits, bool symmetric,
                     uint8_t* packed, float* scales, float* zeros, int64_t g_begin, int64_t g_end) {
  // One pass per weight at load/quantize time: the scalar kernel on every ISA.
  generic::quantize_affine(t, a, group_size, bits, symmetric, packed, scales, zeros, g_begin,
                           g_end);
}

#if defined(LOWBIT_CPU_X86)
#define LOWBIT_AFFINE_DISPATCH(NAME, ...)                           \
  if (active_isa() != Isa::generic) return avx2::NAME(__VA_ARGS__); \
  return generic::NAME(__VA_ARGS__);
#else
#define LOWBIT_AFFINE_DISPATCH(NAME, ...) return generic::NAME(__VA_ARGS__);
#endif

void dequantize_affine(const AffineWeight& w, FloatType t, void* out, int64_t g_begin,
                       int64_t g_end) {
  LOWBIT_AFFINE_DISPATCH(dequantize_affine, w, t, out, g_begin, g_end)
}

void gemm_affine(const float* a, int64_t M, int64_t K, const AffineWeight& w, float* out, int64_t N,
                 int64_t n_begin, int64_t n_end, float* row_scratch) {
  LOWBIT_AFFINE_DISPATCH(gemm_affine, a, M, K, w, out, N, n_begin, n_end, row_scratch)
}

bool gemm_affine_q8_supported(int64_t K, int bits, int64_t group_size) {
#if defined(LOWBIT_CPU_X86)
  return (bits == 4 || bits == 8) && K > 0 && K % kQ8Chunk == 0 && group_size % 32 == 0;
#else
  (void)K, (void)bits, (void)group_size;
  return false;
#endif
}

void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                    int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                    int64_t n_end) {
#if defined(LOWBIT_CPU_X86)
  if (active_isa() == Isa::avx512)
    avx512::gemm_affine_q8(q, q_scales, offsets, M, K, w, out, N, n_begin, n_end);
  else
    avx2::gemm_affine_q8(q, q_scales, offsets, M, K, w, out, N, n_begin, n_end);
#else
  // Unreachable: gemm_affine_q8_supported is false, so no caller gets here.
  (void)q, (void)q_scales, (void)offsets, (void)M, (void)K, (void)w, (void)out, (void)N;
  (void)n_begin, (void)n_end;
#endif
}

}  // namespace lowbit::cpu
