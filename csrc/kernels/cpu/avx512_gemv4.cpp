// The 4-bit product, AVX-512 (F+BW+VL): the M = 1 GEMV of avx2_gemv4.cpp on 512-bit registers.
//
// Same nibble-order trick with 16 dwords per 64-byte load (128 elements per chunk): shift s puts
// nibble s of every dword in bits 0..3, and vpermps on zmm reads exactly bits 0..3 of each index,
// so the whole 16-entry code table lives in ONE register and needs no blend. Shift s decodes
// elements 8i + f(s) of dword i, i = 0..15, with f as in avx2_gemv4.cpp; activations are
// permuted once per call: xp[128c + 16s + i] = x[128c + 8i + f(s)].
// Block scales: a chunk lies in one block when bs >= 128; for bs = 32 or 64 the scale of each
// lane (dword i covers elements 8i..8i+7 of the chunk) is gathered per chunk; a double quantized
// absmax is decoded once per block (lowbit/blockscale.h) into a small array and gathered from it.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include "fourbit_avx2.h"
#include "kernels.h"

namespace lowbit::cpu::avx512 {

namespace {

constexpr int f_of_shift(int s) { return 2 * (s >> 1) + ((s & 1) ? 0 : 1); }

void permute_activations128(const float* x, int64_t K, float* xp) {
  for (int64_t c = 0; c < K; c += 128)
    for (int s = 0; s < 8; ++s)
      for (int i = 0; i < 16; ++i) xp[c + 16 * s + i] = x[c + 8 * i + f_of_shift(s)];
}

// One 128-element chunk into two accumulators (even / odd shifts).
inline void chunk_fma(__m512 lut, const uint8_t* w8, const float* xp, __m512& acc0, __m512& acc1) {
  const __m512i w = _mm512_loadu_si512(w8);
#define LOWBIT_SHIFT_STEP(S, ACC)                                                \
  ACC = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * S), lut), \
                        _mm512_loadu_ps(xp + 16 * S), ACC)
  LOWBIT_SHIFT_STEP(0, acc0);
  LOWBIT_SHIFT_STEP(1, acc1);
  LOWBIT_SHIFT_STEP(2, acc0);
  LOWBIT_SHIFT_STEP(3, acc1);
  LOWBIT_SHIFT_STEP(4, acc0);
  LOWBIT_SHIFT_STEP(5, acc1);
  LOWBIT_SHIFT_STEP(6, acc0);
  LOWBIT_SHIFT_STEP(7, acc1);
#undef LOWBIT_SHIFT_STEP
}

// Scales: const float* (fp32 absmax, gathered per lane for bs < 128) or BlockAbsmax (double
// quantized: the chunk's 128 / bs scales are decoded once each, then gathered from the stack).
template <typename Scales>
void gemv_rows(const float* xp, int64_t K, const uint8_t* packed, const Scales& absmax, __m512 lut,
               int64_t bs, float* out, int64_t n_begin, int64_t n_end) {
  constexpr bool kNested = std::is_same_v<Scales, BlockAbsmax>;
  // Block of dword i relative to the chunk's first block, for bs < 128: (8i) / bs.
  const __m512i lane_block = _mm512_srlv_epi32(
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(8)),
      _mm512_set1_epi32(__builtin_ctzll(uint64_t(bs))));
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint8_t* wrow = packed + j * K / 2;
    __m512 total = _mm512_setzero_ps();
    if (bs < 128) {
      for (int64_t c = 0; c < K / 128; ++c) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        chunk_fma(lut, wrow + 64 * c, xp + 128 * c, acc0, acc1);
        const int64_t b0 = (j * K + 128 * c) / bs;
        __m512 scale;
        if constexpr (kNested) {
          float sc[4];  // bs is 32 or 64: four or two blocks per chunk
          for (int64_t t = 0; t < 128 / bs; ++t) sc[t] = absmax[b0 + t];
          scale = _mm512_i32gather_ps(lane_block, sc, 4);
        } else {
          scale = _mm512_i32gather_ps(lane_block, absmax + b0, 4);
        }
        total = _mm512_fmadd_ps(_mm512_add_ps(acc0, acc1), scale, total);
      }
    } else {
      int64_t e = j * K;
      const int64_t row_end = e + K;
      while (e < row_end) {
        const int64_t b = e / bs;
        const int64_t seg_end = std::min(row_end, (b + 1) * bs);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t k = e - j * K; k < seg_end - j * K; k += 128)
          chunk_fma(lut, wrow + k / 2, xp + k, acc0, acc1);
        total = _mm512_fmadd_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(absmax[b]), total);
        e = seg_end;
      }
    }
    out[j] = _mm512_reduce_add_ps(total);
  }
}

void gemv(const float* x, int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
          const float* code16, int64_t bs, float* out, int64_t n_begin, int64_t n_end, float* xp) {
  permute_activations128(x, K, xp);
  const __m512 lut = _mm512_loadu_ps(code16);
  if (scales.nested())
    gemv_rows(xp, K, packed, scales, lut, bs, out, n_begin, n_end);
  else
    gemv_rows(xp, K, packed, scales.absmax, lut, bs, out, n_begin, n_end);
}

}  // namespace

void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,
               const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,
               int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch) {
  // bs >= 32 is a power of two, so with K % 128 == 0 every chunk covers whole blocks or lies
  // inside one.
  if (M == 1 && K % 128 == 0 && avx2::gemv_fast_path_ok(K, blocksize)) {
    gemv(a, K, packed, scales, code16, blocksize, out, n_begin, n_end, row_scratch);
    return;
  }
  avx2::gemm_4bit(a, M, K, packed, scales, code16, blocksize, out, N, n_begin, n_end, row_scratch);
}

}  // namespace lowbit::cpu::avx512
