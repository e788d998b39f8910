// LLM.int8(): row-wise int8 quantization with outlier columns, int8 x int8 -> int32 GEMM and the
// dequantization of its result.
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "load_store.h"
#include "lowbit/blockscale.h"

namespace lowbit::cpu::generic {

namespace {

template <typename T>
void outlier_columns_impl(const T* a, int64_t rows, int64_t K, float threshold, uint8_t* mask,
                          int64_t c0, int64_t c1) {
  std::fill(mask + c0, mask + c1, uint8_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * K;
    for (int64_t c = c0; c < c1; ++c) mask[c] |= abs_f(to_float(row[c])) >= threshold ? 1 : 0;
  }
}

template <typename T>
void vectorwise_quant_impl(const T* a, int64_t /*rows*/, int64_t K, float threshold,
                           const int64_t* zero_cols, int64_t n_zero_cols, int8_t* q,
                           float* row_stats, int64_t r0, int64_t r1) {
  // threshold == 0 disables the split: nothing is an outlier, not even +-Inf (which then makes
  // the row's scale NaN instead of vanishing silently).
  const bool split = threshold > 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = a + r * K;
    int8_t* qrow = q + r * K;
    float m = 0.0f;
    bool bad = false;
    for (int64_t c = 0; c < K; ++c) {
      const float v = to_float(row[c]);
      // Elements at or above the threshold are outliers and do not count for the scale;
      // NaN compares false, so it stays in and poisons the row.
      if (!(split && abs_f(v) >= threshold)) absmax_fold(v, m, bad);
    }
    if (bad || m == 0.0f) {
      row_stats[r] = bad ? NAN : 0.0f;
      std::fill(qrow, qrow + K, int8_t(0));
      continue;
    }
    row_stats[r] = m;
    const float scale = 127.0f / m;
    for (int64_t c = 0; c < K; ++c) {
      const float v = to_float(row[c]);
      // nearbyint rounds half to even in the default rounding mode; |v * scale| <= 127 + 1 ulp.
      const float code =
          std::nearbyint(std::min(127.0f, std::max(-127.0f, int8_scale_value(v, m, scale))));
      qrow[c] = (split && abs_f(v) >= threshold) ? int8_t(0) : int8_t(code);
    }
    for (int64_t i = 0; i < n_zero_cols; ++i) qrow[zero_cols[i]] = 0;
  }
}

template <typename TB, typename TO>
void mm_dequant_impl(const int32_t* C, const float* row_stats, const float* col_stats,
                     const TB* bias, int64_t N, TO* out, int64_t r0, int64_t r1) {
  constexpr float kInv127Sq = 1.0f / 16129.0f;  // 1 / (127 * 127)
  for (int64_t r = r0; r < r1; ++r) {
    const float rs = row_stats[r];
    for (int64_t n = 0; n < N; ++n) {
      float v = float(C[r * N + n]) * (rs * col_stats[n]) * kInv127Sq;
      if (bias) v += to_float(bias[n]);
      out[r * N + n] = from_float<TO>(v);
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

void int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                           const int64_t* zero_cols, int64_t n_zero_cols, int8_t* q,
                           float* row_stats, int64_t r_begin, int64_t r_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    vectorwise_quant_impl(static_cast<const T*>(a), rows, K, threshold, zero_cols, n_zero_cols, q,
                          row_stats, r_begin, r_end);
  });
}

void int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t K, float* out,
                             int64_t r_begin, int64_t r_end) {
  constexpr float kInv127 = 1.0f / 127.0f;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float s = stats[r];
    for (int64_t c = 0; c < K; ++c) out[r * K + c] = float(q[r * K + c]) * s * kInv127;
  }
}

void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  // Four rows of A share each pass over a row of B, so B (the weight) is streamed once per four
  // activation rows. The int16 products widen to int32 sums, which the compiler maps to pmaddwd.
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* b = B + n * K;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      const int8_t* a0 = A + m * K;
      int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t bk = b[k];
        s0 += int32_t(a0[k]) * bk;
        s1 += int32_t(a0[K + k]) * bk;
        s2 += int32_t(a0[2 * K + k]) * bk;
        s3 += int32_t(a0[3 * K + k]) * bk;
      }
      C[m * N + n] = s0;
      C[(m + 1) * N + n] = s1;
      C[(m + 2) * N + n] = s2;
      C[(m + 3) * N + n] = s3;
    }
    for (; m < M; ++m) {
      const int8_t* a0 = A + m * K;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int32_t(a0[k]) * int32_t(b[k]);
      C[m * N + n] = s;
    }
  }
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

}  // namespace lowbit::cpu::generic
