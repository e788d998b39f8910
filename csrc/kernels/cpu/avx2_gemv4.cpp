// The M = 1 product with a 4-bit weight (GEMV), AVX2 + FMA: the decode is fused into the dot
// product, so each weight byte is read once and never written out.
//
// Nibble order trick: a 32-byte load of the weight row is seen as 8 dwords; dword i holds
// elements 8i .. 8i + 7 of the 64-element chunk. Shifting all dwords right by 4s puts one nibble
// of each in bits 0..3, and vpermps (which reads only bits 0..2 of each index) plus a blend on
// bit 3 (moved to bit 31 by a left shift of 28 - 4s) looks it up in the 16-entry code table held
// in two registers. So each shift s yields 8 decoded weights, one per dword, with no unpacking.
// Nibble s of dword i (little endian) is byte 4i + s/2; the low nibble (even s) holds the odd
// element, so shift s decodes elements 8i + f(s) with f(s) = 2 * (s / 2) + (s even ? 1 : 0).
// The activations are permuted once per call to the same order:
//     xp[64c + 8s + i] = x[64c + 8i + f(s)].
// Each block's partial sum is scaled once by its absmax (the sums reassociate vs. generic).
#include "fourbit_avx2.h"

namespace lowbit::cpu::avx2 {

namespace {

constexpr int f_of_shift(int s) { return 2 * (s >> 1) + ((s & 1) ? 0 : 1); }

// Sum over one 64-element chunk into two accumulators (even / odd shifts, for latency).
inline void chunk_fma(const simd::Lut16& lut, const uint8_t* w8, const float* xp, __m256& acc0,
                      __m256& acc1) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8));
#define LOWBIT_SHIFT_STEP(S, ACC)                                                                  \
  ACC = _mm256_fmadd_ps(lut.lookup(_mm256_srli_epi32(w, 4 * S), _mm256_slli_epi32(w, 28 - 4 * S)), \
                        _mm256_loadu_ps(xp + 8 * S), ACC)
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

}  // namespace

void permute_activations(const float* x, int64_t K, float* xp) {
  for (int64_t c = 0; c < K; c += 64)
    for (int s = 0; s < 8; ++s)
      for (int i = 0; i < 8; ++i) xp[c + 8 * s + i] = x[c + 8 * i + f_of_shift(s)];
}

void gemv_4bit_avx2(const float* x, int64_t K, const uint8_t* packed, const float* absmax,
                    const float* code16, int64_t bs, float* out, int64_t n_begin, int64_t n_end,
                    float* xp) {
  permute_activations(x, K, xp);
  const simd::Lut16 lut(code16);
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint8_t* wrow = packed + j * K / 2;  // K even: rows start on a byte
    __m256 total = _mm256_setzero_ps();
    if (bs == 32) {
      // Dwords 0..3 (elements 0..31) are one block, dwords 4..7 the next.
      const float* sc = absmax + j * K / 32;
      for (int64_t c = 0; c < K / 64; ++c) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        chunk_fma(lut, wrow + 32 * c, xp + 64 * c, acc0, acc1);
        const __m256 scale = _mm256_set_m128(_mm_set1_ps(sc[2 * c + 1]), _mm_set1_ps(sc[2 * c]));
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), scale, total);
      }
    } else {
      // Segments of the row that share one block: [e, min(row end, next block start)).
      int64_t e = j * K;
      const int64_t row_end = e + K;
      while (e < row_end) {
        const int64_t b = e / bs;
        const int64_t seg_end = std::min(row_end, (b + 1) * bs);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t k = e - j * K; k < seg_end - j * K; k += 64)
          chunk_fma(lut, wrow + k / 2, xp + k, acc0, acc1);
        total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(absmax[b]), total);
        e = seg_end;
      }
    }
    out[j] = simd::hsum(total);
  }
}

}  // namespace lowbit::cpu::avx2
