// Affine 4/8-bit weights, AVX2 (+FMA+F16C): dequantize, the exact fp32 product, and the small-M
// product with int8 activations for 4-bit and 8-bit codes (see the affine section of
// lowbit/cpu_kernels.h).
//
// Dequantized values are bit-identical to the generic kernels: (float(q) - zero) * scale is one
// subtraction and one multiplication in fp32 (this unit builds with -ffp-contract=off), rounded
// once to the output type by the store8 helpers, which round like from_float<T>.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "affine_kernels.h"
#include "affine_q8_prep.h"
#include "avx2_util.h"
#include "fourbit_avx2.h"
#include "load_store.h"

namespace lowbit::cpu::avx2 {

namespace {

constexpr float kIdentity16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline int code_at(const uint8_t* packed, int bits, int64_t e) {
  if (bits == 8) return packed[e];
  return (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF;
}

// dst[e - e0] = (float(q[e]) - zero[g]) * scale[g] for e in [e0, e1), one group segment at a time.
// 4-bit: 16 codes per step through the NF4 nibble decoder (decode16) over the identity table, so
// the lanes hold float(q) in element order; 8-bit: 8 codes per step, widened to int32 and
// converted.
template <typename T>
void decode_range(const AffineWeight& w, int64_t e0, int64_t e1, T* dst) {
  const simd::Lut16 lut(kIdentity16);
  int64_t e = e0;
  while (e < e1) {
    const int64_t g = e / w.group_size;
    const int64_t seg_end = std::min(e1, (g + 1) * w.group_size);
    const float s = w.scales[g], z = w.zeros[g];
    const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
    if (w.bits == 4) {
      if ((e & 1) && e < seg_end) {  // odd start: one low nibble first
        *dst++ = from_float<T>((float(code_at(w.packed, 4, e)) - z) * s);
        ++e;
      }
      for (; e + 16 <= seg_end; e += 16, dst += 16) {
        __m256 lo, hi;
        decode16(lut, w.packed + (e >> 1), lo, hi);
        simd::store8(dst, _mm256_mul_ps(_mm256_sub_ps(lo, zv), sv));
        simd::store8(dst + 8, _mm256_mul_ps(_mm256_sub_ps(hi, zv), sv));
      }
    } else {
      for (; e + 8 <= seg_end; e += 8, dst += 8) {
        const __m256i q =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.packed + e)));
        simd::store8(dst, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv));
      }
    }
    for (; e < seg_end; ++e) *dst++ = from_float<T>((float(code_at(w.packed, w.bits, e)) - z) * s);
  }
}

// ---- int8-activation product (4-bit)
// -------------------------------------------------------------

// Read-ahead distance in each weight row stream (as in avx2_gemm4_q8.cpp: the hardware prefetcher
// alone leaves the core waiting on DRAM in this loop).
constexpr int64_t kPrefetchBytes = 4096;

// One chunk (64 elements, 32 bytes) of raw codes in two planes: u0 = high nibbles = elements 2j,
// u1 = low nibbles = elements 2j + 1. The codes are already the unsigned operand of vpmaddubsw, so
// unlike the codebook product there is no table lookup and no offset to undo.
struct Chunk {
  __m256i u0, u1;
};

inline Chunk load_chunk(const uint8_t* p) {
  // Integer arithmetic: the prefetch address may lie past the end of the weight (a prefetch never
  // faults, but forming such a pointer would be undefined).
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes),
               _MM_HINT_T0);
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  return {_mm256_and_si256(_mm256_srli_epi16(w, 4), low4), _mm256_and_si256(w, low4)};
}

// 8 exact int32 sums of q * x_q over one chunk. vpmaddubsw multiplies the unsigned codes
// (q <= 15) by the signed activation codes (|x_q| <= 127) and adds pairs: |pair| <= 3810. The two
// planes' int16 sums are added before widening (|sum| <= 7620, no overflow: the 4-bit codes leave
// room that the codebook product's offset codes do not), then one vpmaddwd with ones widens pairs
// to int32: lane i covers plane bytes 4i..4i+3 of both planes = chunk elements 8i..8i+7, so lanes
// 0..3 are the chunk's first half (elements 0..31) and lanes 4..7 its second half.
inline __m256i dot_chunk(const Chunk& w, const int8_t* xq) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
  const __m256i pairs =
      _mm256_add_epi16(_mm256_maddubs_epi16(w.u0, x0), _mm256_maddubs_epi16(w.u1, x1));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

struct Acts {
  const int8_t* q;            // [M, K] codes, two planes per chunk (quantize_activations_q8)
  const float* scale;         // [M, chunks]
  const float* xsum;          // [M, groups_per_row]: sum over the group of x_scale * sum x_q
  const int32_t* half_group;  // [2 * chunks]: group (within the row) of each half chunk
  int64_t K, chunks, groups;
};

// The zero-point term of one output: sum_g scale[g] * zero[g] * xsum[g] over a row's groups
// (activation-only sums precomputed once per call), 8 groups per step.
inline float zero_term(const float* s, const float* z, const float* xsum, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8)
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(z + g)),
                          _mm256_loadu_ps(xsum + g), acc);
  float t = simd::hsum(acc);
  for (; g < groups; ++g) t += s[g] * z[g] * xsum[g];
  return t;
}

// RT weight rows (rows[r]) against MT activation rows from m0; out = sum of the scaled exact
// integer sums minus the zero term.
// kHalf = false (group_size % 64 == 0): per chunk, accg += float(I_c) * x_scale[c] (8 lanes), and
// per group acc += accg * scale[g]. kHalf = true (group_size % 64 == 32): a chunk's halves may lie
// in two groups; per chunk acc += (float(I_c) * [scale(half 0) x4 | scale(half 1) x4]) * x_scale[c]
// (lanes 0..3 are the first half, see dot_chunk).
template <int RT, int MT, bool kHalf>
void rows_tile(const Acts& x, const AffineWeight& w, const int64_t* rows, int64_t m0, float* out,
               int64_t N) {
  __m256 acc[RT][MT];
  const uint8_t* wp[RT];
  const float* srow[RT];
  const int64_t K = x.K;
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    wp[r] = w.packed + rows[r] * (K / 2);  // K even: rows start on a byte
    srow[r] = w.scales + rows[r] * x.groups;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  if constexpr (!kHalf) {
    const int64_t cpg = w.group_size / 64;
    for (int64_t kg = 0; kg < x.groups; ++kg) {
      __m256 accg[RT][MT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) accg[r][m] = _mm256_setzero_ps();
      for (int64_t c = kg * cpg; c < (kg + 1) * cpg; ++c) {
        Chunk ch[RT];
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) ch[r] = load_chunk(wp[r] + 32 * c);
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) {
          const int64_t am = m0 + m;
          const int8_t* xq = x.q + am * K + 64 * c;
          const __m256 xs = _mm256_broadcast_ss(x.scale + am * x.chunks + c);
#pragma GCC unroll 4
          for (int r = 0; r < RT; ++r)
            accg[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_chunk(ch[r], xq)), xs, accg[r][m]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        const __m256 sv = _mm256_broadcast_ss(srow[r] + kg);
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_fmadd_ps(accg[r][m], sv, acc[r][m]);
      }
    }
  } else {
    for (int64_t c = 0; c < x.chunks; ++c) {
      Chunk ch[RT];
      __m256 sv[RT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        ch[r] = load_chunk(wp[r] + 32 * c);
        sv[r] = _mm256_set_m128(_mm_broadcast_ss(srow[r] + x.half_group[2 * c + 1]),
                                _mm_broadcast_ss(srow[r] + x.half_group[2 * c]));
      }
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const int64_t am = m0 + m;
        const int8_t* xq = x.q + am * K + 64 * c;
        const __m256 xs = _mm256_broadcast_ss(x.scale + am * x.chunks + c);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r)
          acc[r][m] = _mm256_fmadd_ps(
              _mm256_mul_ps(_mm256_cvtepi32_ps(dot_chunk(ch[r], xq)), sv[r]), xs, acc[r][m]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const float* zrow = w.zeros + rows[r] * x.groups;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m)
      out[(m0 + m) * N + rows[r]] =
          simd::hsum(acc[r][m]) - zero_term(srow[r], zrow, x.xsum + (m0 + m) * x.groups, x.groups);
  }
}

template <bool kHalf>
void q8_rows(const Acts& x, int64_t M, const AffineWeight& w, float* out, int64_t N,
             int64_t n_begin, int64_t n_end) {
  schedule_q8_rows(M, n_begin, n_end, [&](auto rt, auto mt, const int64_t* rows, int64_t m0) {
    rows_tile<decltype(rt)::value, decltype(mt)::value, kHalf>(x, w, rows, m0, out, N);
  });
}

// ---- int8-activation product (8-bit)
// -------------------------------------------------------------
//
// The math and the places where it rounds are those of the AVX-512 kernel (avx512_affine.cpp,
// 8-bit section): per lane L (a set of elements of one chunk inside one group)
//     T_L = fma(-z_g, X_L, float(I_L)),  I_L = sum xq * q (exact int32),  X_L = sum xq (exact),
// one rounding (none for integer zeros), then y = sum_L xs_c * s_g * T_L in fp32, so the error
// is relative to |x| . |w| and the zero point never cancels against sum x * q.
//
// The integer product. vpmaddubsw (u8 x s8 -> pairs added with int16 saturation) would saturate:
// a pair of 8-bit codes reaches 2 * 255 * 127 = 64770 > 32767. Two non-saturating forms exist:
//   (a) split q = 16 * hi + lo into nibbles and run vpmaddubsw on each (pairs <= 3810), then widen
//       both with vpmaddwd (by 16 and by 1) and add: 3 ops to split, 2 vpmaddubsw, 2 vpmaddwd and
//       an add per 32 codes;
//   (b) widen the codes to int16 (vpmovzxbw, which takes its 16 bytes straight from memory) and
//       multiply them by int16 activations with vpmaddwd (int16 x int16 -> int32 pairs, exact):
//       2 vpmovzxbw, 2 vpmaddwd and an add per 32 codes.
// (b) is used: fewer instructions, and the widening is weight-side work shared by every
// activation row of a tile; the price is activations stored as int16 (2 bytes per element, once
// per call, cache-resident: 256 KiB at M = 32, K = 4096).
// Lanes: code sub-block i (elements 16i..16i+15 of a chunk) gives int32 lane l = elements
// 16i + 2l, 16i + 2l + 1; lo = sub-blocks 0 + 1 (the chunk's first half), hi = 2 + 3. With
// group_size % 64 == 0 a chunk lies in one group and lo + hi is one lane set (8 elements per
// lane); with group_size % 64 == 32 (kHalf) the halves keep their own z, s and X.

struct Acts8 {
  const int16_t* q;           // [M, K] activation codes in element order, widened to int16
  const float* scale;         // [M, chunks]
  const float* xsum;          // [M, chunks, 2, 8]: X of the lo and hi lanes
  const int32_t* half_group;  // [2 * chunks]: group (within the row) of each half chunk
  int64_t K, chunks, groups;
};

struct Codes8 {
  __m256i c[4];  // sub-blocks 0..3 of a chunk, int16
};

// No software prefetch (see load_block8 in avx512_affine.cpp: the hardware prefetchers follow
// the two 4 KiB-row streams better alone; here 19-20 GB/s with it, 21-24 without).
inline Codes8 load_codes8(const uint8_t* p) {
  Codes8 w;
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    w.c[i] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)));
  return w;
}

struct Sums8 {
  __m256i lo, hi;
};
inline Sums8 dot_codes8(const Codes8& w, const int16_t* a) {
  auto md = [&](int i) {
    return _mm256_madd_epi16(w.c[i],
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * i)));
  };
  return {_mm256_add_epi32(md(0), md(1)), _mm256_add_epi32(md(2), md(3))};
}

// RT weight rows against MT activation rows from m0: per chunk, one weight row at a time (its
// 4 widened code vectors and its group's z and s) against the MT activation rows, whose chunk data
// (128 bytes of int16 codes, 64 of lane sums) the first row brings into L1 and the others reuse:
// with int16 activations the loop is bound by the L2 -> L1 traffic of the activations (~200 bytes
// per 64 products), which RT = 4 cuts by 4. acc += T * (s * xs) per chunk (no per-group
// accumulators: 16 registers hold RT x MT = 8 accumulators and one row's codes).
template <int RT, int MT, bool kHalf>
void rows_tile8(const Acts8& x, const AffineWeight& w, const int64_t* rows, int64_t m0, float* out,
                int64_t N) {
  __m256 acc[RT][MT];
  const uint8_t* wp[RT];
  const float *srow[RT], *zrow[RT];
  const int64_t K = x.K;
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    wp[r] = w.packed + rows[r] * K;
    srow[r] = w.scales + rows[r] * x.groups;
    zrow[r] = w.zeros + rows[r] * x.groups;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < x.chunks; ++c) {
    const int32_t g_lo = x.half_group[2 * c], g_hi = x.half_group[2 * c + 1];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const Codes8 ch = load_codes8(wp[r] + 64 * c);
      const __m256 s_lo = _mm256_broadcast_ss(srow[r] + g_lo);
      const __m256 z_lo = _mm256_broadcast_ss(zrow[r] + g_lo);
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const int64_t am = m0 + m, at = am * x.chunks + c;
        const __m256 xs = _mm256_broadcast_ss(x.scale + at);
        const Sums8 d = dot_codes8(ch, x.q + am * K + 64 * c);
        if constexpr (kHalf) {
          const __m256 t_lo =
              _mm256_fnmadd_ps(z_lo, _mm256_loadu_ps(x.xsum + 16 * at), _mm256_cvtepi32_ps(d.lo));
          const __m256 t_hi =
              _mm256_fnmadd_ps(_mm256_broadcast_ss(zrow[r] + g_hi),
                               _mm256_loadu_ps(x.xsum + 16 * at + 8), _mm256_cvtepi32_ps(d.hi));
          acc[r][m] = _mm256_fmadd_ps(t_lo, _mm256_mul_ps(s_lo, xs), acc[r][m]);
          acc[r][m] = _mm256_fmadd_ps(t_hi, _mm256_mul_ps(_mm256_broadcast_ss(srow[r] + g_hi), xs),
                                      acc[r][m]);
        } else {
          // lo + hi lane sums, precomputed (exact)
          const __m256 t = _mm256_fnmadd_ps(z_lo, _mm256_loadu_ps(x.xsum + 16 * at),
                                            _mm256_cvtepi32_ps(_mm256_add_epi32(d.lo, d.hi)));
          acc[r][m] = _mm256_fmadd_ps(t, _mm256_mul_ps(s_lo, xs), acc[r][m]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) out[(m0 + m) * N + rows[r]] = simd::hsum(acc[r][m]);
}

// M = 1: schedule_q8_rows (two row streams). M > 1: tiles of 4 weight rows x 2 activation rows,
// then the last N % 4 rows one at a time.
template <bool kHalf>
void q8_rows8(const Acts8& x, int64_t M, const AffineWeight& w, float* out, int64_t N,
              int64_t n_begin, int64_t n_end) {
  auto tile = [&](auto rt, auto mt, const int64_t* rows, int64_t m0) {
    rows_tile8<decltype(rt)::value, decltype(mt)::value, kHalf>(x, w, rows, m0, out, N);
  };
  if (M == 1) return schedule_q8_rows(1, n_begin, n_end, tile);
  schedule_q8_row_tiles<2>(M, n_begin, n_end, tile);
}

void gemm_affine8_q8(const int8_t* q, const float* q_scales, int64_t M, int64_t K,
                     const AffineWeight& w, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t chunks = K / kQ8Chunk, groups = K / w.group_size;
  const bool half = w.group_size % 64 != 0;
  // Element order (quantize_activations_q8 stores element 2u of a chunk at byte u, 2u + 1 at
  // byte 32 + u), widened to int16, and the lane sums X per chunk: kHalf, [lo | hi] (lo: elements
  // 16i + 2l, + 1 for i = 0, 1; hi: i = 2, 3); otherwise lo + hi in the first 8.
  std::vector<int16_t> xq(static_cast<size_t>(M * K));
  std::vector<float> xsum(static_cast<size_t>(M * chunks * 16), 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* src = q + m * K + 64 * c;
      int16_t* dst = xq.data() + m * K + 64 * c;
      float* X = xsum.data() + 16 * (m * chunks + c);
      for (int e = 0; e < 64; ++e) {
        const int8_t v = src[(e & 1) * 32 + (e >> 1)];
        dst[e] = v;
        X[(half ? 8 * (e / 32) : 0) + (e % 16) / 2] += float(v);  // exact: |X| <= 8 * 127
      }
    }
  std::vector<int32_t> half_group(static_cast<size_t>(2 * chunks));
  for (int64_t h = 0; h < 2 * chunks; ++h) half_group[h] = int32_t(32 * h / w.group_size);
  const Acts8 x{xq.data(), q_scales, xsum.data(), half_group.data(), K, chunks, groups};
  if (half)
    q8_rows8<true>(x, M, w, out, N, n_begin, n_end);
  else
    q8_rows8<false>(x, M, w, out, N, n_begin, n_end);
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
  // Decode each weight row once into the thread's scratch (it stays in L1/L2), then one fp32 dot
  // product per activation row: the exact path (8-bit, odd shapes, LOWBIT_CPU_GEMV=fp32).
  for (int64_t j = n_begin; j < n_end; ++j) {
    decode_range(w, j * K, (j + 1) * K, row_scratch);
    for (int64_t m = 0; m < M; ++m) out[m * N + j] = simd::dot_f32(a + m * K, row_scratch, K);
  }
}

void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                    int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                    int64_t n_end) {
  if (w.bits == 8) {
    gemm_affine8_q8(q, q_scales, M, K, w, out, N, n_begin, n_end);
    return;
  }
  const int64_t chunks = K / kQ8Chunk, groups = K / w.group_size;
  const bool half = w.group_size % 64 != 0;
  const AffineQ8Prep prep(offsets, M, K, w.group_size);
  const Acts x{q, q_scales, prep.xsum.data(), prep.half_group.data(), K, chunks, groups};
  if (half)
    q8_rows<true>(x, M, w, out, N, n_begin, n_end);
  else
    q8_rows<false>(x, M, w, out, N, n_begin, n_end);
}

}  // namespace lowbit::cpu::avx2
