// Helpers for the AVX2 (+FMA+F16C) kernels; included only by translation units compiled with
// -mavx2 -mfma -mf16c (and the AVX-512 ones, which are supersets).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "lowbit/blockscale.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu::simd {

// ---- 8 elements of a float type <-> 8 fp32 lanes -----------------------------------------------
// Widening is exact for every type. Narrowing rounds to nearest-even exactly like numeric.h, so a
// SIMD store is bit-identical to from_float<T>() of the same fp32 value.

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const bfloat16_t* p) {
  // bf16 is the top half of an fp32: zero-extend to 32 bits and shift up.
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(half_t* p, __m256 v) {
  // F16C rounds to nearest-even, overflows to Inf and keeps NaN quiet, as to_half() does.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// fp32 -> bf16 bit patterns in the 8 low halves of the int32 lanes (upper halves zero).
inline __m256i to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  // Round to nearest-even on bit 16: add 0x7fff plus the lowest kept bit, then truncate.
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  // NaN (|u| > 0x7f800000) keeps its sign and top mantissa bits and is forced quiet.
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}
inline void store8(bfloat16_t* p, __m256 v) {
  const __m256i w = to_bf16_bits(v);
  // packus works within 128-bit lanes: [w0..3 w0..3 | w4..7 w4..7]; gather qwords 0 and 2.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// |x| by clearing the sign bit.
inline __m256 abs8(__m256 v) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

// Horizontal sums.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// A 16-entry fp32 table in two registers. lookup16(i) returns table[i & 15] per lane: vpermps
// uses only bits 0..2 of each index, and blendv picks the upper half by bit 31 of `sel`, so the
// caller passes the index with bit 3 moved to bit 31 (both may carry junk in other bits).
struct Lut16 {
  __m256 lo, hi;
  explicit Lut16(const float* table) : lo(_mm256_loadu_ps(table)), hi(_mm256_loadu_ps(table + 8)) {}
  __m256 lookup(__m256i idx, __m256i sel) const {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(sel));
  }
  // Index in bits 0..3 of each lane, other bits zero.
  __m256 lookup(__m256i idx) const { return lookup(idx, _mm256_slli_epi32(idx, 28)); }
};

// Absmax of n elements and whether any is NaN or +-Inf (the fold of blockscale.h, 8 at a time).
template <typename T>
inline void absmax_scan(const T* a, int64_t n, float& m_out, bool& bad_out) {
  __m256 m = _mm256_setzero_ps();
  // !(|x| <= FLT_MAX) flags NaN and +-Inf; max_ps(m, |x|) would drop NaN silently.
  __m256 bad = _mm256_setzero_ps();
  const __m256 big = _mm256_set1_ps(3.4028234663852886e38f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = abs8(load8(a + i));
    m = _mm256_max_ps(m, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, big, _CMP_NLE_UQ));
  }
  float mm = hmax(m);
  bool bb = _mm256_movemask_ps(bad) != 0;
  for (; i < n; ++i) {
    const float v = abs_f(to_float(a[i]));
    mm = v > mm ? v : mm;
    bb = bb || !(v <= 3.4028234663852886e38f);
  }
  m_out = mm;
  bad_out = bb;
}

}  // namespace lowbit::cpu::simd

namespace lowbit::cpu::simd {

// ---- gathers without a false dependency ---------------------------------------------------------
// vpgatherdd / vgatherdps merge into their destination register, so the hardware waits for that
// register's previous value. With a constant all-ones mask GCC drops the merge source and reuses
// whatever register is free, often the previous iteration's gather result: every iteration then
// waits for the one before on the gather's ~30-cycle latency (measured: 5x slower loops). Here
// the zero source and the all-ones mask come from asm the compiler cannot see through; both are
// hoisted out of loops and copied in by register moves, which depend on nothing.
inline __m256i opaque_zero_si256() {
  __m256i z;
  asm("vpxor %x0, %x0, %x0" : "=x"(z));
  return z;
}
inline __m256i opaque_ones_si256() {
  __m256i m;
  asm("vpcmpeqd %0, %0, %0" : "=x"(m));
  return m;
}
inline __m256i gather_epi32(const int32_t* base, __m256i idx) {
  return _mm256_mask_i32gather_epi32(opaque_zero_si256(), base, idx, opaque_ones_si256(), 4);
}
inline __m256 gather_ps(const float* base, __m256i idx) {
  return _mm256_mask_i32gather_ps(_mm256_castsi256_ps(opaque_zero_si256()), base, idx,
                                  _mm256_castsi256_ps(opaque_ones_si256()), 4);
}

}  // namespace lowbit::cpu::simd

namespace lowbit::cpu::simd {

// ---- absmax on bit patterns ---------------------------------------------------------------------
// The same (absmax, nonfinite) pair as absmax_scan, from integer maxima of the patterns with the
// sign cleared: for IEEE floats of one type, |x| patterns order like the values, and every NaN or
// Inf pattern is at or above the Inf pattern. When no element is NaN/Inf, the largest pattern is
// exactly max |x|; otherwise only the flag matters (the block stores NaN). 16-bit types take 16
// elements per instruction with no conversion to fp32.
namespace detail {
inline uint32_t hmax_epu16(__m256i v) {
  const __m128i m = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  // minpos finds the smallest word: the smallest of ~m is the largest of m.
  const __m128i inv = _mm_xor_si128(m, _mm_set1_epi16(-1));
  return 0xffffu - uint32_t(_mm_cvtsi128_si32(_mm_minpos_epu16(inv)) & 0xffff);
}
inline uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(m));
}
template <typename T>
inline uint32_t abs_bits_max16(const T* a, int64_t n) {  // T: half_t or bfloat16_t
  const uint16_t* p = reinterpret_cast<const uint16_t*>(a);
  const __m256i mag = _mm256_set1_epi16(0x7fff);
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_epu16(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(p + i)), mag));
    m1 = _mm256_max_epu16(m1,
                          _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(p + i + 16)), mag));
  }
  for (; i + 16 <= n; i += 16)
    m0 = _mm256_max_epu16(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(p + i)), mag));
  uint32_t m = hmax_epu16(_mm256_max_epu16(m0, m1));
  for (; i < n; ++i) m = std::max<uint32_t>(m, p[i] & 0x7fffu);
  return m;
}
}  // namespace detail

inline void absmax_scan_bits(const bfloat16_t* a, int64_t n, float& m_out, bool& bad_out) {
  const uint32_t m = detail::abs_bits_max16(a, n);
  bad_out = m >= 0x7f80u;  // bf16 Inf; NaN above
  m_out = bits_float(m << 16);
}
inline void absmax_scan_bits(const half_t* a, int64_t n, float& m_out, bool& bad_out) {
  const uint32_t m = detail::abs_bits_max16(a, n);
  bad_out = m >= 0x7c00u;  // fp16 Inf; NaN above
  m_out = to_float(half_t{uint16_t(m)});
}
inline void absmax_scan_bits(const float* a, int64_t n, float& m_out, bool& bad_out) {
  const __m256i mag = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(a + i)), mag));
    m1 = _mm256_max_epu32(m1,
                          _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(a + i + 8)), mag));
  }
  uint32_t m = detail::hmax_epu32(_mm256_max_epu32(m0, m1));
  for (; i < n; ++i) m = std::max<uint32_t>(m, float_bits(a[i]) & 0x7fffffffu);
  bad_out = m >= 0x7f800000u;
  m_out = bits_float(m);
}

}  // namespace lowbit::cpu::simd

namespace lowbit::cpu::simd {

// Dot product of two fp32 rows with four independent accumulators.
inline float dot_f32(const float* x, const float* w, int64_t K) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] =
          _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * u), _mm256_loadu_ps(w + k + 8 * u), acc[u]);
  for (; k + 8 <= K; k += 8)
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), acc[0]);
  float sum =
      simd::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < K; ++k) sum += x[k] * w[k];
  return sum;
}

}  // namespace lowbit::cpu::simd
