// The small-M int8-activation affine product, AVX-512 VNNI (see the affine section of
// lowbit/cpu_kernels.h and avx2_affine.cpp, whose arithmetic this repeats on 512-bit registers).
//
// One step = a block of two 64-element chunks = 64 packed bytes = one zmm load of a weight row.
// Its nibble planes u0 = high nibbles (elements 2j of each chunk) and u1 = low nibbles (elements
// 2j + 1) are the unsigned operand of vpdpbusd, which adds four byte products into each int32
// lane exactly (|lane| <= 2 * 4 * 15 * 127 per step): int32 lane i (0..15) covers plane bytes
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

void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
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

}  // namespace lowbit::cpu::avx512
