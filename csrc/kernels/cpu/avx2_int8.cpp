// LLM.int8() kernels, AVX2 (+FMA+F16C): row quantization, the int8 GEMM and its dequantization.
// Codes, int32 products and dequantized values are bit-identical to the generic kernels.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "avx2_util.h"
#include "int8_gemm_avx2.h"
#include "kernels.h"
#include "load_store.h"
#include "lowbit/blockscale.h"

namespace lowbit::cpu::avx2 {

namespace {

template <typename T>
void outlier_columns_impl(const T* a, int64_t rows, int64_t K, float threshold, uint8_t* mask,
                          int64_t c0, int64_t c1) {
  std::fill(mask + c0, mask + c1, uint8_t(0));
  const __m256 th = _mm256_set1_ps(threshold);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * K;
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) {
      const int bits =
          _mm256_movemask_ps(_mm256_cmp_ps(simd::abs8(simd::load8(row + c)), th, _CMP_GE_OQ));
      if (bits)
        for (int u = 0; u < 8; ++u) mask[c + u] |= (bits >> u) & 1;
    }
    for (; c < c1; ++c) mask[c] |= abs_f(to_float(row[c])) >= threshold ? 1 : 0;
  }
}

// 8 int32 lanes (each in [-127, 127]) -> 8 int8.
inline void store_i8x8(int8_t* q, __m256i v) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(w, w));
}

template <typename T>
void vectorwise_quant_impl(const T* a, int64_t K, float threshold, const int64_t* zero_cols,
                           int64_t n_zero_cols, int8_t* q, float* row_stats, int64_t r0,
                           int64_t r1) {
  const bool split = threshold > 0.0f;
  // With split off the threshold is NaN: `|v| >= th` is then false for every element (even +-Inf,
  // which must count as bad, not as outliers), so one code path serves both cases.
  const float ths = split ? threshold : bits_float(0x7fc00000u);
  const __m256 th = _mm256_set1_ps(ths);
  const __m256 big = _mm256_set1_ps(3.4028234663852886e38f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = a + r * K;
    int8_t* qrow = q + r * K;
    // Pass 1: absmax over non-outliers, and whether any non-outlier is NaN / +-Inf. The NaN
    // test is unordered (NaN is never >= th, so it counts), as in the generic fold.
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= K; c += 8) {
      const __m256 v = simd::abs8(simd::load8(row + c));
      const __m256 keep = _mm256_cmp_ps(v, th, _CMP_NGE_UQ);
      m = _mm256_max_ps(m, _mm256_and_ps(v, keep));
      bad = _mm256_or_ps(bad, _mm256_and_ps(keep, _mm256_cmp_ps(v, big, _CMP_NLE_UQ)));
    }
    float mx = simd::hmax(m);
    bool bd = _mm256_movemask_ps(bad) != 0;
    for (; c < K; ++c) {
      const float v = to_float(row[c]);
      if (!(split && abs_f(v) >= threshold)) absmax_fold(v, mx, bd);
    }
    if (bd || mx == 0.0f) {
      row_stats[r] = bd ? NAN : 0.0f;
      std::memset(qrow, 0, size_t(K));
      continue;
    }
    row_stats[r] = mx;
    const float scale = 127.0f / mx;
    // Pass 2: round-half-even(clamp(v * scale)), zero for outliers and masked columns.
    const __m256 sv = _mm256_set1_ps(scale), hi = _mm256_set1_ps(127.0f),
                 lo = _mm256_set1_ps(-127.0f);
    // A row whose scale overflows (tiny absmax) divides instead: the scalar loop handles it.
    const int64_t vec_end = int8_scale_overflows(scale) ? 0 : K;
    for (c = 0; c + 8 <= vec_end; c += 8) {
      const __m256 v = simd::load8(row + c);
      const __m256 y = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(v, sv)));
      __m256i code =
          _mm256_cvtps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256 outlier = _mm256_cmp_ps(simd::abs8(v), th, _CMP_GE_OQ);
      code = _mm256_andnot_si256(_mm256_castps_si256(outlier), code);
      store_i8x8(qrow + c, code);
    }
    for (; c < K; ++c) {
      const float v = to_float(row[c]);
      const float code =
          std::nearbyint(std::min(127.0f, std::max(-127.0f, int8_scale_value(v, mx, scale))));
      qrow[c] = abs_f(v) >= ths ? int8_t(0) : int8_t(code);
    }
    for (int64_t i = 0; i < n_zero_cols; ++i) qrow[zero_cols[i]] = 0;
  }
}

template <typename TB, typename TO>
void mm_dequant_impl(const int32_t* C, const float* row_stats, const float* col_stats,
                     const TB* bias, int64_t N, TO* out, int64_t r0, int64_t r1) {
  constexpr float kInv127Sq = 1.0f / 16129.0f;
  const __m256 inv = _mm256_set1_ps(kInv127Sq);
  for (int64_t r = r0; r < r1; ++r) {
    const float rs = row_stats[r];
    const __m256 rsv = _mm256_set1_ps(rs);
    const int32_t* crow = C + r * N;
    TO* orow = out + r * N;
    int64_t n = 0;
    // Same operation order as generic: (float(C) * (rs * cs)) * (1/16129) + bias, no FMA.
    for (; n + 8 <= N; n += 8) {
      const __m256 cf =
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(crow + n)));
      __m256 v =
          _mm256_mul_ps(_mm256_mul_ps(cf, _mm256_mul_ps(rsv, _mm256_loadu_ps(col_stats + n))), inv);
      if (bias) v = _mm256_add_ps(v, simd::load8(bias + n));
      simd::store8(orow + n, v);
    }
    for (; n < N; ++n) {
      float v = float(crow[n]) * (rs * col_stats[n]) * kInv127Sq;
      if (bias) v += to_float(bias[n]);
      orow[n] = from_float<TO>(v);
    }
  }
}

}  // namespace

void int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                          uint8_t* mask, int64_t c_begin, int64_t c_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    outlier_columns_impl(static_cast<const T*>(a), rows, K, threshold, mask, c_begin, c_end);
  });
}

void int8_vectorwise_quant(FloatType t, const void* a, int64_t /*rows*/, int64_t K, float threshold,
                           const int64_t* zero_cols, int64_t n_zero_cols, int8_t* q,
                           float* row_stats, int64_t r_begin, int64_t r_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    vectorwise_quant_impl(static_cast<const T*>(a), K, threshold, zero_cols, n_zero_cols, q,
                          row_stats, r_begin, r_end);
  });
}

void int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t K, float* out,
                             int64_t r_begin, int64_t r_end) {
  constexpr float kInv127 = 1.0f / 127.0f;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float s = stats[r];
    const __m256 sv = _mm256_set1_ps(s), iv = _mm256_set1_ps(kInv127);
    int64_t c = 0;
    for (; c + 8 <= K; c += 8) {
      const __m256i v =
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + r * K + c)));
      _mm256_storeu_ps(out + r * K + c,
                       _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), sv), iv));
    }
    for (; c < K; ++c) out[r * K + c] = float(q[r * K + c]) * s * kInv127;
  }
}

void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  int8_gemm_avx2(A, B, C, M, N, K, n_begin, n_end);
}

void int8_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats,
                     FloatType bias_t, const void* bias, int64_t N, FloatType out_t, void* out,
                     int64_t r_begin, int64_t r_end) {
  dispatch_float(bias_t, [&](auto btag) {
    using TB = decltype(btag);
    dispatch_float(out_t, [&](auto otag) {
      using TO = decltype(otag);
      mm_dequant_impl(C, row_stats, col_stats, static_cast<const TB*>(bias), N,
                      static_cast<TO*>(out), r_begin, r_end);
    });
  });
}

}  // namespace lowbit::cpu::avx2
