// 4-bit decode helpers and the M = 1 product shared by the AVX2 and AVX-512 translation units.
#pragma once

#include <algorithm>
#include <cstdint>

#include "avx2_util.h"
#include "lowbit/blockscale.h"

namespace lowbit::cpu::avx2 {

// 8 packed bytes -> their 16 elements in order, looked up in `lut` (unscaled code values).
// Byte j holds element 2j in its high nibble and 2j + 1 in its low nibble.
inline void decode16(const simd::Lut16& lut, const uint8_t* p, __m256& first8, __m256& next8) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  // High nibble: index bits 4..6 after >> 4, select bit 7 moved to bit 31 by << 24.
  const __m256 even = lut.lookup(_mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
  // Low nibble: vpermps ignores bits above 2; select bit 3 moved to bit 31 by << 28.
  const __m256 odd = lut.lookup(b, _mm256_slli_epi32(b, 28));
  // even = [e0 e2 .. e14], odd = [e1 e3 .. e15]; unpack interleaves within 128-bit halves:
  // lo = [e0 e1 e2 e3 | e8 e9 e10 e11], hi = [e4 .. e7 | e12 .. e15].
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  first8 = _mm256_permute2f128_ps(lo, hi, 0x20);
  next8 = _mm256_permute2f128_ps(lo, hi, 0x31);
}

// The fused M = 1 kernel needs whole 64-element chunks per row (K % 64 == 0); any power-of-two
// block size >= 32 then puts each chunk in one block (bs >= 64) or exactly two (bs == 32).
inline bool gemv_fast_path_ok(int64_t K, int64_t blocksize) {
  return K % 64 == 0 && blocksize >= 32 && (blocksize & (blocksize - 1)) == 0;
}

// out[j] = sum_k x[k] * W[j, k] for j in [n_begin, n_end); x_scratch holds K floats. The block
// scales (fp32 or double quantized) are read once per block.
void gemv_4bit_avx2(const float* x, int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
                    const float* code16, int64_t blocksize, float* out, int64_t n_begin,
                    int64_t n_end, float* x_scratch);

// Lays x out in the order the GEMV decodes nibbles (see avx2_gemv4.cpp).
void permute_activations(const float* x, int64_t K, float* xp);

}  // namespace lowbit::cpu::avx2
