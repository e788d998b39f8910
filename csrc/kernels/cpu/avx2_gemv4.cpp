// The M = 1 product with a 4-bit weight (GEMV), AVX2 + FMA: the decode is fused into the dot
// product, so each weight byte is read once and never written out.
//
// Decode with byte shuffles: the 16 code values are fp32, so their 4 bytes form 4 byte tables of
// 16 entries, and vpshufb looks up 32 nibbles in one table at once. For one 32-byte load of the
// weight row (64 elements): the high nibbles (even elements) and low nibbles (odd elements) are
// split into two planes of 32 bytes; per plane, 4 vpshufb give byte 0..3 of each code value and
// two rounds of unpacks (bytes -> 16-bit pairs -> 32-bit floats) rebuild 4 vectors of 8 fp32.
// The unpacks work inside 128-bit lanes, so vector q (0..3) of a plane holds at position
// p = 4l + i (lane l, i = 0..3) the nibble of byte j = 16l + 4q + i. Instead of undoing that
// order, the activations are permuted once per call to match it:
//     xp[64c + 32P + 8q + p] = x[64c + 2 * (16 * (p / 4) + 4q + p % 4) + P]
// (P = 0: high-nibble plane, P = 1: low-nibble plane). Per 64 weights: 3 ops to split nibbles,
// 24 shuffles and 8 FMAs, with no gathers and no table in memory.
// Each block's partial sum is scaled once by its absmax (the sums reassociate vs. generic; a double
// quantized absmax is decoded once per block, see lowbit/blockscale.h); lanes
// 0..3 of every vector come from bytes 0..15 (elements 0..31), which for blocksize 32 is one
// block and lanes 4..7 the next.
#include "fourbit_avx2.h"

namespace lowbit::cpu::avx2 {

namespace {

// Byte b (0..3) of each of the 16 fp32 code values, in both 128-bit lanes for vpshufb.
struct ByteTables {
  __m256i t[4];
  explicit ByteTables(const float* code) {
    alignas(16) uint8_t bytes[4][16];
    for (int v = 0; v < 16; ++v) {
      const uint32_t u = float_bits(code[v]);
      for (int b = 0; b < 4; ++b) bytes[b][v] = uint8_t(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b)
      t[b] =
          _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[b])));
  }
};

// 32 nibbles (one per byte, values 0..15) -> 32 code values times xp, into acc.
inline void plane_fma(const ByteTables& L, __m256i nib, const float* xp, __m256* acc) {
  const __m256i b0 = _mm256_shuffle_epi8(L.t[0], nib), b1 = _mm256_shuffle_epi8(L.t[1], nib);
  const __m256i b2 = _mm256_shuffle_epi8(L.t[2], nib), b3 = _mm256_shuffle_epi8(L.t[3], nib);
  // 16-bit halves: (byte0, byte1) = low half, (byte2, byte3) = high half of each float.
  const __m256i l0 = _mm256_unpacklo_epi8(b0, b1), l1 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i h0 = _mm256_unpacklo_epi8(b2, b3), h1 = _mm256_unpackhi_epi8(b2, b3);
  acc[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l0, h0)), _mm256_loadu_ps(xp),
                           acc[0]);
  acc[1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l0, h0)),
                           _mm256_loadu_ps(xp + 8), acc[1]);
  acc[2] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l1, h1)),
                           _mm256_loadu_ps(xp + 16), acc[2]);
  acc[3] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l1, h1)),
                           _mm256_loadu_ps(xp + 24), acc[3]);
}

// One 64-element chunk into eight independent accumulators (FMA latency, not throughput, would
// bound a single chain).
inline void chunk_fma(const ByteTables& L, const uint8_t* w8, const float* xp, __m256* acc) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8));
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  // vpshufb reads bits 0..3 (and zeroes the lane if bit 7 is set), so both planes are masked.
  plane_fma(L, _mm256_and_si256(_mm256_srli_epi16(w, 4), low4), xp, acc);
  plane_fma(L, _mm256_and_si256(w, low4), xp + 32, acc + 4);
}

inline __m256 sum8(const __m256* a) {
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                       _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
}

}  // namespace

void permute_activations(const float* x, int64_t K, float* xp) {
  for (int64_t c = 0; c < K; c += 64)
    for (int P = 0; P < 2; ++P)
      for (int q = 0; q < 4; ++q)
        for (int p = 0; p < 8; ++p)
          xp[c + 32 * P + 8 * q + p] = x[c + 2 * (16 * (p / 4) + 4 * q + p % 4) + P];
}

namespace {

// Rows [n_begin, n_end) against the permuted activations. Scales: const float* (fp32 absmax) or
// BlockAbsmax (double quantized: one scale decoded per block, never per element).
template <typename Scales>
void gemv_rows(const float* xp, int64_t K, const uint8_t* packed, const Scales& absmax,
               const ByteTables& lut, int64_t bs, float* out, int64_t n_begin, int64_t n_end) {
  for (int64_t j = n_begin; j < n_end; ++j) {
    const uint8_t* wrow = packed + j * K / 2;  // K even: rows start on a byte
    __m256 total = _mm256_setzero_ps();
    if (bs == 32) {
      // Dwords 0..3 (elements 0..31) are one block, dwords 4..7 the next.
      const int64_t b0 = j * K / 32;
      for (int64_t c = 0; c < K / 64; ++c) {
        __m256 acc[8];
        for (auto& v : acc) v = _mm256_setzero_ps();
        chunk_fma(lut, wrow + 32 * c, xp + 64 * c, acc);
        const __m256 scale =
            _mm256_set_m128(_mm_set1_ps(absmax[b0 + 2 * c + 1]), _mm_set1_ps(absmax[b0 + 2 * c]));
        total = _mm256_fmadd_ps(sum8(acc), scale, total);
      }
    } else {
      // Segments of the row that share one block: [e, min(row end, next block start)).
      int64_t e = j * K;
      const int64_t row_end = e + K;
      while (e < row_end) {
        const int64_t b = e / bs;
        const int64_t seg_end = std::min(row_end, (b + 1) * bs);
        __m256 acc[8];
        for (auto& v : acc) v = _mm256_setzero_ps();
        for (int64_t k = e - j * K; k < seg_end - j * K; k += 64)
          chunk_fma(lut, wrow + k / 2, xp + k, acc);
        total = _mm256_fmadd_ps(sum8(acc), _mm256_set1_ps(absmax[b]), total);
        e = seg_end;
      }
    }
    out[j] = simd::hsum(total);
  }
}

}  // namespace

void gemv_4bit_avx2(const float* x, int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
                    const float* code16, int64_t bs, float* out, int64_t n_begin, int64_t n_end,
                    float* xp) {
  permute_activations(x, K, xp);
  const ByteTables lut(code16);
  if (scales.nested())
    gemv_rows(xp, K, packed, scales, lut, bs, out, n_begin, n_end);
  else
    gemv_rows(xp, K, packed, scales.absmax, lut, bs, out, n_begin, n_end);
}

}  // namespace lowbit::cpu::avx2
