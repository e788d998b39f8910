// The small-M int8-activation affine product, AVX-512 VNNI (see the affine section of
// lowbit/cpu_kernels.h and avx2_affine.cpp, whose arithmetic this repeats on 512-bit registers).
// 4-bit codes first; 8-bit codes have their own layout and zero-point handling further down.
//
// 4-bit. One step = a block of two 64-element chunks = 64 packed bytes = one zmm load of a weight
// row. Its nibble planes u0 = high nibbles (elements 2j of each chunk) and u1 = low nibbles
// (elements 2j + 1) are the unsigned operand of vpdpbusd, which adds four byte products into each
// int32 lane exactly (|lane| <= 2 * 4 * 15 * 127 per step): int32 lane i (0..15) covers plane bytes
// 4i..4i+3, i.e. elements 8i..8i+7 of chunk 2b (lanes 0..7) and of chunk 2b + 1 (lanes 8..15);
// lanes 4k..4k+3 form half chunk k of the block (k = 0..3). The activations are laid out once per
// call to match: block b of row m holds [plane 0 of chunk 2b | plane 0 of chunk 2b + 1 | plane 1
// of chunk 2b | plane 1 of chunk 2b + 1] (a missing last chunk, K % 128 == 64, is zeros), with
// per-lane scales [x_scale(2b) x8 | x_scale(2b + 1) x8].
// Group scales: group_size % 128 == 0 puts a block in one group (per-group accumulator, one
// broadcast per group); otherwise the 4 half chunks of a block lie in up to 4 consecutive groups,
// whose scales are loaded (masked, never past the row) and spread over the lanes with vpermps.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "affine_kernels.h"
#include "affine_q8_prep.h"

namespace lowbit::cpu::avx512 {

namespace {

constexpr int64_t kPrefetchBytes = 4096;

struct Acts {
  const int8_t* q;          // [M, blocks, 128] relaid codes
  const float* xs;          // [M, blocks, 16] per-lane activation scales
  const float* xsum;        // [M, groups] (AffineQ8Prep)
  const int32_t* g_first;   // [blocks]: group (within the row) of the block's first half chunk
  const __mmask16* g_mask;  // [blocks]: which of the 4 scales from g_first exist (lane path)
  const int32_t* g_lane;    // [blocks, 16]: per lane, group - g_first (lane path)
  int64_t K, blocks, groups;
};

struct Planes {
  __m512i u0, u1;
};

inline Planes load_block(const uint8_t* p, bool whole) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes),
               _MM_HINT_T0);
  // The last block of a row with K % 128 == 64 holds one chunk: read only its 32 bytes.
  const __m512i w = whole ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(0xffffffffull, p);
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  return {_mm512_and_si512(_mm512_srli_epi16(w, 4), low4), _mm512_and_si512(w, low4)};
}

inline __m512 dot_block(const Planes& w, const int8_t* xq) {
  __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.u0, _mm512_loadu_si512(xq));
  acc = _mm512_dpbusd_epi32(acc, w.u1, _mm512_loadu_si512(xq + 64));
  return _mm512_cvtepi32_ps(acc);
}

inline float zero_term(const float* s, const float* z, const float* xsum, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16)
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(s + g), _mm512_loadu_ps(z + g)),
                          _mm512_loadu_ps(xsum + g), acc);
  float t = _mm512_reduce_add_ps(acc);
  for (; g < groups; ++g) t += s[g] * z[g] * xsum[g];
  return t;
}

// RT weight rows against MT activation rows from m0 (see the top of the file).
template <int RT, int MT, bool kGroup>
void rows_tile(const Acts& x, const AffineWeight& w, const int64_t* rows, int64_t m0, float* out,
               int64_t N) {
  __m512 acc[RT][MT];
  const uint8_t* wp[RT];
  const float* srow[RT];
  const int64_t K = x.K;
  const bool whole_last = K % 128 == 0;
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    wp[r] = w.packed + rows[r] * (K / 2);
    srow[r] = w.scales + rows[r] * x.groups;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  if constexpr (kGroup) {  // group_size % 128 == 0, so K % 128 == 0
    const int64_t bpg = w.group_size / 128;
    for (int64_t kg = 0; kg < x.groups; ++kg) {
      __m512 accg[RT][MT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) accg[r][m] = _mm512_setzero_ps();
      for (int64_t b = kg * bpg; b < (kg + 1) * bpg; ++b) {
        Planes pl[RT];
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) pl[r] = load_block(wp[r] + 64 * b, true);
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) {
          const int64_t at = (m0 + m) * x.blocks + b;
          const __m512 xs = _mm512_loadu_ps(x.xs + 16 * at);
#pragma GCC unroll 4
          for (int r = 0; r < RT; ++r)
            accg[r][m] = _mm512_fmadd_ps(dot_block(pl[r], x.q + 128 * at), xs, accg[r][m]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        const __m512 sv = _mm512_set1_ps(srow[r][kg]);
#pragma GCC unroll 4
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_fmadd_ps(accg[r][m], sv, acc[r][m]);
      }
    }
  } else {
    for (int64_t b = 0; b < x.blocks; ++b) {
      const bool whole = whole_last || b + 1 < x.blocks;
      const __m512i lane = _mm512_loadu_si512(x.g_lane + 16 * b);
      Planes pl[RT];
      __m512 sv[RT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        pl[r] = load_block(wp[r] + 64 * b, whole);
        const __m512 s4 =
            _mm512_castps128_ps512(_mm_maskz_loadu_ps(x.g_mask[b], srow[r] + x.g_first[b]));
        sv[r] = _mm512_permutexvar_ps(lane, s4);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const int64_t at = (m0 + m) * x.blocks + b;
        const __m512 xs = _mm512_loadu_ps(x.xs + 16 * at);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r)
          acc[r][m] = _mm512_fmadd_ps(dot_block(pl[r], x.q + 128 * at), _mm512_mul_ps(sv[r], xs),
                                      acc[r][m]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const float* zrow = w.zeros + rows[r] * x.groups;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m)
      out[(m0 + m) * N + rows[r]] =
          _mm512_reduce_add_ps(acc[r][m]) -
          zero_term(srow[r], zrow, x.xsum + (m0 + m) * x.groups, x.groups);
  }
}

template <bool kGroup>
void q8_rows(const Acts& x, int64_t M, const AffineWeight& w, float* out, int64_t N,
             int64_t n_begin, int64_t n_end) {
  schedule_q8_rows(M, n_begin, n_end, [&](auto rt, auto mt, const int64_t* rows, int64_t m0) {
    rows_tile<decltype(rt)::value, decltype(mt)::value, kGroup>(x, w, rows, m0, out, N);
  });
}

}  // namespace

namespace {

void gemm_affine4_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                     int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                     int64_t n_end) {
  const int64_t chunks = K / kQ8Chunk, blocks = (chunks + 1) / 2, groups = K / w.group_size;
  const AffineQ8Prep prep(offsets, M, K, w.group_size);
  // Activations in block order (zeros for a missing last chunk) and per-lane scales.
  std::vector<int8_t> xq(static_cast<size_t>(M * blocks * 128), 0);
  std::vector<float> xs(static_cast<size_t>(M * blocks * 16), 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c / 2, h = c % 2;
      int8_t* dst = xq.data() + (m * blocks + b) * 128 + 32 * h;
      const int8_t* src = q + m * K + 64 * c;
      std::copy(src, src + 32, dst);            // plane 0
      std::copy(src + 32, src + 64, dst + 64);  // plane 1
      std::fill_n(xs.data() + (m * blocks + b) * 16 + 8 * h, 8, q_scales[m * chunks + c]);
    }
  // Lane path tables: the block's half chunks k = 0..3 lie in groups g_first + g_lane (k <= 3).
  std::vector<int32_t> g_first(static_cast<size_t>(blocks)),
      g_lane(static_cast<size_t>(16 * blocks));
  std::vector<__mmask16> g_mask(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t h0 = 4 * b, h_last = std::min<int64_t>(4 * b + 3, 2 * chunks - 1);
    g_first[b] = prep.half_group[h0];
    const int32_t span = prep.half_group[h_last] - g_first[b] + 1;  // 1..4 groups
    g_mask[b] = __mmask16((1u << span) - 1);
    for (int i = 0; i < 16; ++i) {
      const int64_t h = std::min<int64_t>(h0 + i / 4, h_last);
      g_lane[16 * b + i] = prep.half_group[h] - g_first[b];
    }
  }
  const Acts x{xq.data(),     xs.data(), prep.xsum.data(), g_first.data(), g_mask.data(),
               g_lane.data(), K,         blocks,           groups};
  if (w.group_size % 128 == 0)
    q8_rows<true>(x, M, w, out, N, n_begin, n_end);
  else
    q8_rows<false>(x, M, w, out, N, n_begin, n_end);
}

}  // namespace

// ---- 8-bit codes -------------------------------------------------------------------------------
//
// The codes are unsigned bytes already, so they are vpdpbusd's unsigned operand as loaded: no
// nibble split, no offset. The math, for output (m, n), with x[k] ~ xs_c * xq[k] (chunk c = k / 64,
// quantize_activations_q8) and w[k] = s_g * (q[k] - z_g):
//     y = sum_k x[k] w[k] = sum over lanes L of  xs_c(L) * s_g(L) * T_L,
//     T_L = sum_{k in L} xq[k] * (q[k] - z_g(L)) = I_L - z_g(L) * X_L,
//     I_L = sum_{k in L} xq[k] * q[k]   (vpdpbusd, exact in int32),  X_L = sum_{k in L} xq[k],
// where a lane L is a set of 16 elements of one chunk inside one group (8 with kHalf, below). Where
// it rounds:
//   1. float(I_L) and X_L are exact (|I_L| <= 16 * 255 * 127 < 2^24), and T_L = fma(-z, X_L, I_L)
//      is rounded ONCE, relative to |T_L| <= sum |xq| * |q - z|; for integer zeros (GPTQ,
//      compressed-tensors) every term is an integer below 2^24 and T_L is exact. So the zero point
//      is never applied as  s * (sum x q - z * sum x)  over a group: with 8-bit codes both sums are
//      near 255 * sum x while their difference can be small (codes and zero near 255), and fp32
//      would lose it (the 4-bit kernels above, with codes <= 15, subtract the zero term per
//      output).
//   2. the per-lane factor s_g * xs_c (one rounding);
//   3. the fp32 sums: one FMA per block into per-lane accumulators, and the final 16-lane sum.
// Every error is relative to sum_k |x[k]| * s_g * |q[k] - z_g| (= |x| . |w|): no cancellation.
// reference.gemm_affine_q8 is this sum in fp64.
//
// Layout. A block = 4 chunks = 256 codes = 4 zmm loads c0..c3 (c_j = chunk 4b + j). A 4 x 4
// transpose of their 128-bit lanes (8 vshufi64x2) gives W_i (i = 0..3) with 128-bit lane j =
// bytes 16i..16i+15 of chunk j, so that after the 4 vpdpbusd (W_i against the activation vector
// A_i laid out the same way) int32 lane L = 4j + l holds chunk j's elements 16i + 4l + (0..3),
// i = 0..3: every lane stays inside one chunk (one activation scale), 16 lanes cover 4 chunks, and
// the fp32 work per weight row and activation row is one convert, one FMA for the zero point, one
// multiply (s * xs) and one FMA into the accumulator per 256 codes. i = 0, 1 are the chunk's first
// half (elements 0..31), i = 2, 3 its second: with group_size % 64 == 32 (kHalf) the two halves may
// lie in different groups and are kept in two accumulators (lo, hi) with their own X, z and s. A
// last block with fewer than 4 chunks (K % 256 != 0) loads zeros for the missing ones; their
// activations, X and xs are zeros and their lanes' z and s are masked to 0, so they add exactly 0
// (a NaN scale elsewhere in the row cannot leak into them).

namespace {

struct Acts8 {
  const int8_t* q;         // [M, blocks, 4, 64]: A_i of block b (layout above)
  const float* xs;         // [M, blocks, 16]: lane 4j + l: x_scale of chunk 4b + j (0: missing)
  const float* xsum;       // [M, blocks, H, 16]: X per lane; H = 1 (whole lane) or 2 (lo, hi)
  const int32_t* g_first;  // [blocks]: group (within the row) of the block's first element
  const __mmask8* g_mask;  // [blocks]: groups g_first .. g_first + span - 1 exist (span <= 8)
  const int32_t* g_lane;   // [blocks, 2, 16]: per lane, group - g_first of its lo / hi half
  const __mmask16* valid;  // [blocks]: lanes of chunks that exist
  int64_t K, blocks, groups, full_blocks, tail_chunks;
};

struct Block8 {
  __m512i w[4];
};

// No software prefetch, unlike the 4-bit kernels: the two row streams of M = 1 read whole 4 KiB
// pages, which the hardware prefetchers follow better alone (Zen 4 guest, one thread, 11008 x 4096
// rotated over 180 MiB: 16-18 GB/s with prefetches 1-16 KiB ahead, 22-25 GB/s without).
template <bool kWhole>
inline Block8 load_block8(const uint8_t* p, int64_t nc) {
  __m512i c[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    if (kWhole || j < nc)
      c[j] = _mm512_loadu_si512(p + 64 * j);
    else
      c[j] = _mm512_setzero_si512();  // never read past the row's last chunk
  }
  // 128-bit lane transpose: t0 = [c0.0 c0.1 c1.0 c1.1], t1 = [c0.2 c0.3 c1.2 c1.3], t2, t3 the
  // same of c2, c3; W_i = [c0.i c1.i c2.i c3.i].
  const __m512i t0 = _mm512_shuffle_i64x2(c[0], c[1], 0x44),
                t1 = _mm512_shuffle_i64x2(c[0], c[1], 0xee);
  const __m512i t2 = _mm512_shuffle_i64x2(c[2], c[3], 0x44),
                t3 = _mm512_shuffle_i64x2(c[2], c[3], 0xee);
  return {{_mm512_shuffle_i64x2(t0, t2, 0x88), _mm512_shuffle_i64x2(t0, t2, 0xdd),
           _mm512_shuffle_i64x2(t1, t3, 0x88), _mm512_shuffle_i64x2(t1, t3, 0xdd)}};
}

// The integer sums of one block against one activation row: lo = W_0, W_1 (first halves of the
// chunks), hi = W_2, W_3.
struct Sums8 {
  __m512i lo, hi;
};
inline Sums8 dot_block8(const Block8& w, const int8_t* a) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i lo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w.w[0], _mm512_loadu_si512(a)),
                                         w.w[1], _mm512_loadu_si512(a + 64));
  const __m512i hi =
      _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, w.w[2], _mm512_loadu_si512(a + 128)), w.w[3],
                          _mm512_loadu_si512(a + 192));
  return {lo, hi};
}
// lo + hi in one chain of 4 vpdpbusd (group_size % 64 == 0): no second zeroed accumulator, no add.
inline __m512i dot_block8_all(const Block8& w, const int8_t* a) {
  __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.w[0], _mm512_loadu_si512(a));
#pragma GCC unroll 4
  for (int i = 1; i < 4; ++i)
    acc = _mm512_dpbusd_epi32(acc, w.w[i], _mm512_loadu_si512(a + 64 * i));
  return acc;
}

// Per-lane scale or zero of one weight row over block b: the block's groups (masked load, never
// past the row) spread over the lanes; lanes of missing chunks get 0.
inline __m512 lane_values(const float* row, const Acts8& x, int64_t b, int half) {
  const __m512 v = _mm512_zextps256_ps512(_mm256_maskz_loadu_ps(x.g_mask[b], row + x.g_first[b]));
  return _mm512_maskz_permutexvar_ps(x.valid[b], _mm512_loadu_si512(x.g_lane + 32 * b + 16 * half),
                                     v);
}

// One block of the lane path (any group_size % 32 == 0 and the K tail): RT rows x MT activation
// rows, acc += T * (s * xs) per lane. One weight row at a time (its transposed block, z and s in
// 6-8 registers) against the MT activation rows, whose block data (384-448 bytes each) the first
// row brings into L1 and the others reuse: with RT = 4 the activations cross from L2 once per 4
// weight rows (at M = 32 they are 200 KiB, read once per weight row with RT = 1).
template <int RT, int MT, bool kHalf, bool kWhole>
inline void lane_block8(const Acts8& x, const uint8_t* const* wp, const float* const* srow,
                        const float* const* zrow, int64_t m0, int64_t b, __m512 (&acc)[RT][MT]) {
  constexpr int H = kHalf ? 2 : 1;
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const Block8 blk = load_block8<kWhole>(wp[r] + 256 * b, x.tail_chunks);
    const __m512 s_lo = lane_values(srow[r], x, b, 0), z_lo = lane_values(zrow[r], x, b, 0);
    __m512 s_hi = s_lo, z_hi = z_lo;
    if constexpr (kHalf) {
      s_hi = lane_values(srow[r], x, b, 1);
      z_hi = lane_values(zrow[r], x, b, 1);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const int64_t at = (m0 + m) * x.blocks + b;
      const __m512 xs = _mm512_loadu_ps(x.xs + 16 * at);
      const __m512 X_lo = _mm512_loadu_ps(x.xsum + 16 * (H * at));
      if constexpr (kHalf) {
        const Sums8 d = dot_block8(blk, x.q + 256 * at);
        const __m512 X_hi = _mm512_loadu_ps(x.xsum + 16 * (H * at + 1));
        const __m512 t_lo = _mm512_fnmadd_ps(z_lo, X_lo, _mm512_cvtepi32_ps(d.lo));
        const __m512 t_hi = _mm512_fnmadd_ps(z_hi, X_hi, _mm512_cvtepi32_ps(d.hi));
        acc[r][m] = _mm512_fmadd_ps(t_lo, _mm512_mul_ps(s_lo, xs), acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(t_hi, _mm512_mul_ps(s_hi, xs), acc[r][m]);
      } else {
        const __m512 t =
            _mm512_fnmadd_ps(z_lo, X_lo, _mm512_cvtepi32_ps(dot_block8_all(blk, x.q + 256 * at)));
        acc[r][m] = _mm512_fmadd_ps(t, _mm512_mul_ps(s_lo, xs), acc[r][m]);
      }
    }
  }
}

// RT weight rows against MT activation rows from m0 (the lane path above for every group size).
template <int RT, int MT, bool kHalf>
void rows_tile8(const Acts8& x, const AffineWeight& w, const int64_t* rows, int64_t m0, float* out,
                int64_t N) {
  __m512 acc[RT][MT];
  const uint8_t* wp[RT];
  const float *srow[RT], *zrow[RT];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    wp[r] = w.packed + rows[r] * x.K;
    srow[r] = w.scales + rows[r] * x.groups;
    zrow[r] = w.zeros + rows[r] * x.groups;
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < x.full_blocks; ++b)
    lane_block8<RT, MT, kHalf, true>(x, wp, srow, zrow, m0, b, acc);
  if (x.full_blocks < x.blocks)
    lane_block8<RT, MT, kHalf, false>(x, wp, srow, zrow, m0, x.full_blocks, acc);
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) out[(m0 + m) * N + rows[r]] = _mm512_reduce_add_ps(acc[r][m]);
}

// M = 1: schedule_q8_rows (two row streams). M > 1: tiles of 4 weight rows x up to 4 activation
// rows, then the last N % 4 rows one at a time.
template <bool kHalf>
void q8_rows8(const Acts8& x, int64_t M, const AffineWeight& w, float* out, int64_t N,
              int64_t n_begin, int64_t n_end) {
  auto tile = [&](auto rt, auto mt, const int64_t* rows, int64_t m0) {
    rows_tile8<decltype(rt)::value, decltype(mt)::value, kHalf>(x, w, rows, m0, out, N);
  };
  if (M == 1) return schedule_q8_rows(1, n_begin, n_end, tile);
  schedule_q8_row_tiles<4>(M, n_begin, n_end, tile);
}

void gemm_affine8_q8(const int8_t* q, const float* q_scales, int64_t M, int64_t K,
                     const AffineWeight& w, float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t chunks = K / kQ8Chunk, blocks = (chunks + 3) / 4, groups = K / w.group_size;
  const bool half = w.group_size % 64 != 0;
  const int H = half ? 2 : 1;
  // Activations in block order: A_i's 128-bit lane j = elements 16i..16i+15 of chunk 4b + j, in
  // element order (quantize_activations_q8 stores a chunk as two planes: element 2u at byte u,
  // element 2u + 1 at byte 32 + u). Missing chunks stay zeros.
  std::vector<int8_t> xq(static_cast<size_t>(M * blocks * 256), 0);
  std::vector<float> xs(static_cast<size_t>(M * blocks * 16), 0.0f);
  std::vector<float> xsum(static_cast<size_t>(M * blocks * H * 16), 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c / 4, j = c % 4, at = m * blocks + b;
      const int8_t* src = q + m * K + 64 * c;
      int8_t* dst = xq.data() + 256 * at + 16 * j;
      float* X = xsum.data() + 16 * H * at;
      for (int e = 0; e < 64; ++e) {
        const int8_t v = src[(e & 1) * 32 + (e >> 1)];
        const int i = e / 16, l = (e % 16) / 4;  // A_i, lane 4j + l
        dst[64 * i + e % 16] = v;
        X[(half && i >= 2 ? 16 : 0) + 4 * j + l] += float(v);  // exact: |X| <= 16 * 127
      }
      std::fill_n(xs.data() + 16 * at + 4 * j, 4, q_scales[m * chunks + c]);
    }
  // Weight-side lane tables (the same for every row): chunk 4b + j's halves lie in the groups
  // 2 * 32 * (4b + j) / group_size (+ 1 for the second half); g_first is the block's first group.
  std::vector<int32_t> g_first(static_cast<size_t>(blocks)),
      g_lane(static_cast<size_t>(32 * blocks));
  std::vector<__mmask8> g_mask(static_cast<size_t>(blocks));
  std::vector<__mmask16> valid(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t e0 = 256 * b, e_last = std::min<int64_t>(256 * b + 255, K - 1);
    g_first[b] = int32_t(e0 / w.group_size);
    const int64_t span = e_last / w.group_size - g_first[b] + 1;  // 1..8 (group_size >= 32)
    g_mask[b] = __mmask8((1u << span) - 1);
    unsigned v = 0;
    for (int L = 0; L < 16; ++L) {
      const int64_t c = 4 * b + L / 4;
      if (c < chunks) v |= 1u << L;
      const int64_t cc = std::min(c, chunks - 1);  // masked anyway
      g_lane[32 * b + L] = int32_t(64 * cc / w.group_size - g_first[b]);
      g_lane[32 * b + 16 + L] = int32_t((64 * cc + 32) / w.group_size - g_first[b]);
    }
    valid[b] = __mmask16(v);
  }
  const Acts8 x{xq.data(),    xs.data(), xsum.data(), g_first.data(), g_mask.data(), g_lane.data(),
                valid.data(), K,         blocks,      groups,         chunks / 4,    chunks % 4};
  if (half)
    q8_rows8<true>(x, M, w, out, N, n_begin, n_end);
  else
    q8_rows8<false>(x, M, w, out, N, n_begin, n_end);
}

}  // namespace

void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                    int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                    int64_t n_end) {
  if (w.bits == 8)
    gemm_affine8_q8(q, q_scales, M, K, w, out, N, n_begin, n_end);
  else
    gemm_affine4_q8(q, q_scales, offsets, M, K, w, out, N, n_begin, n_end);
}

}  // namespace lowbit::cpu::avx512
