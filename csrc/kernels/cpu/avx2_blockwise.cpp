// 8-bit blockwise quantization, AVX2 (+FMA+F16C). Codes are bit-identical to the generic kernels.
//
// Quantizing needs #{bounds < x} over 255 sorted midpoints. Instead of an 8-step binary search
// (8 gathers per 8 elements) a table indexed by the top 14 bits of x's fp32 pattern (sign,
// exponent, 5 mantissa bits) narrows the answer: every such "cell" is an interval of reals, and
// for the cell of x
//     #{bounds < x} = lo[cell] + #{j < C : bound[lo[cell] + j] < x}
// where lo[cell] counts the bounds below the cell's smallest value and C is the most bounds any
// one cell holds (2 for the dynamic map). Bounds past the cell are above x, so the C compares
// are exact; the bound list is padded with +Inf so they never read past it.
#include <algorithm>
#include <cstring>

#include "avx2_util.h"
#include "kernels.h"
#include "load_store.h"
#include "lowbit/codebook.h"

namespace lowbit::cpu::avx2 {

namespace {

constexpr int kCellShift = 18;                  // cell = fp32 bits >> 18
constexpr int kCells = 1 << (32 - kCellShift);  // 16384
constexpr int kMaxCompares = 4;                 // above this, binary search instead

struct BucketTable {
  float bound[255];                  // the midpoints the table was built for
  float padded[255 + kMaxCompares];  // the same, then +Inf
  int32_t lo[kCells];
  int compares;  // C; kMaxCompares + 1 when the table is not used
  bool valid = false;
};

// Built once per thread and per code: rebuilt only when the bounds change.
const BucketTable& bucket_table(const float* bound255) {
  static thread_local BucketTable t;
  if (t.valid && std::memcmp(t.bound, bound255, sizeof(t.bound)) == 0) return t;
  std::memcpy(t.bound, bound255, sizeof(t.bound));
  std::memcpy(t.padded, bound255, sizeof(t.bound));
  for (int j = 255; j < 255 + kMaxCompares; ++j) t.padded[j] = bits_float(0x7f800000u);
  int worst = 0;
  for (int c = 0; c < kCells; ++c) {
    const uint32_t first = uint32_t(c) << kCellShift, last = first | ((1u << kCellShift) - 1);
    // For negative floats a larger pattern is a smaller value.
    const bool neg = first & 0x80000000u;
    const float vmin = bits_float(neg ? last : first), vmax = bits_float(neg ? first : last);
    // NaN cells (never looked up: such blocks are special) compare false and get lo = hi.
    const int lo = bucket256(bound255, vmin);
    int hi = lo;
    while (hi < 255 && bound255[hi] <= vmax) ++hi;
    t.lo[c] = lo;
    worst = std::max(worst, hi - lo);
  }
  t.compares = worst;
  t.valid = true;
  return t;
}

// Codes of 8 normalised values (finite, |x| <= ~1) as int32 lanes.
inline __m256i bucket8(const BucketTable& t, __m256 x) {
  const __m256i cell = _mm256_srli_epi32(_mm256_castps_si256(x), kCellShift);
  __m256i idx = _mm256_i32gather_epi32(t.lo, cell, 4);
  const __m256i base = idx;
  for (int j = 0; j < t.compares; ++j) {
    const __m256 b = _mm256_i32gather_ps(t.padded + j, base, 4);
    // The compare mask is -1 where bound < x: subtracting it adds one.
    idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(b, x, _CMP_LT_OQ)));
  }
  return idx;
}

// Binary search over 255 bounds, 8 lanes at a time (codes whose cells hold many bounds).
inline __m256i bucket8_search(const float* bound255, __m256 x) {
  __m256i lo = _mm256_setzero_si256();
  for (int step = 128; step >= 1; step >>= 1) {
    const __m256 b = _mm256_i32gather_ps(bound255 + step - 1, lo, 4);
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(b, x, _CMP_LT_OQ));
    lo = _mm256_add_epi32(lo, _mm256_and_si256(below, _mm256_set1_epi32(step)));
  }
  return lo;
}

// 8 int32 lanes (each 0..255) -> 8 bytes.
inline void store_codes8(uint8_t* q, __m256i v) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packus_epi16(w, w));
}

template <typename T>
void quantize_impl(const T* a, int64_t n, int64_t bs, const float* bound255, uint8_t zero_code,
                   uint8_t* q, float* absmax, int64_t b0, int64_t b1) {
  const BucketTable& table = bucket_table(bound255);
  const bool use_table = table.compares <= kMaxCompares;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = std::min(n, start + bs) - start;
    const T* x = a + start;
    uint8_t* qb = q + start;
    float m;
    bool bad;
    simd::absmax_scan(x, len, m, bad);
    const BlockScale s = make_block_scale(m, bad);
    absmax[b] = s.absmax;
    if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) {
      std::memset(qb, zero_code, size_t(len));
      continue;
    }
    const bool divide = s.mode == BlockMode::divide;
    const __m256 inv = _mm256_set1_ps(s.inv), am = _mm256_set1_ps(s.absmax);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      const __m256 v = simd::load8(x + i);
      const __m256 xn = divide ? _mm256_div_ps(v, am) : _mm256_mul_ps(v, inv);
      store_codes8(qb + i, use_table ? bucket8(table, xn) : bucket8_search(bound255, xn));
    }
    for (; i < len; ++i) qb[i] = uint8_t(bucket256(bound255, normalize(to_float(x[i]), s)));
  }
}

template <typename T>
void dequantize_impl(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                     int64_t bs, T* out, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = std::min(n, start + bs) - start;
    const float s = absmax[b];
    const __m256 sv = _mm256_set1_ps(s);
    const uint8_t* qb = q + start;
    T* ob = out + start;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      const __m256i idx =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + i)));
      simd::store8(ob + i, _mm256_mul_ps(_mm256_i32gather_ps(code, idx, 4), sv));
    }
    for (; i < len; ++i) ob[i] = from_float<T>(code[qb[i]] * s);
  }
}

}  // namespace

void quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                        const float* bound255, uint8_t zero_code, uint8_t* q, float* absmax,
                        int64_t block_begin, int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_impl(static_cast<const T*>(a), n, blocksize, bound255, zero_code, q, absmax,
                  block_begin, block_end);
  });
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256, int64_t n,
                          int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                          int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    dequantize_impl(q, absmax, code256, n, blocksize, static_cast<T*>(out), block_begin, block_end);
  });
}

}  // namespace lowbit::cpu::avx2
