// int8 x int8 -> int32 GEMM, AVX-512 VNNI: C = A * B^T with A [M, K], B [N, K] row-major.
//
// vpdpbusd multiplies UNSIGNED bytes of its first operand by SIGNED bytes of the second and adds
// each group of 4 products into an int32 lane, without intermediate saturation. B is made
// unsigned by flipping its sign bit, b ^ 0x80 = b + 128 in [0, 255], so the instruction yields
//     sum_k (B[n, k] + 128) * A[m, k] = C[m, n] + 128 * sum_k A[m, k],
// and the row sums of A (computed once per block of A rows, with vpdpbusd against bytes of 1)
// are subtracted at the end. The K tail uses masked loads that read zeros: a zero A byte adds
// nothing whatever the (flipped) B byte is. Tiles of 4 x 4 accumulators; loops as in the AVX2
// kernel (blocks of A rows outside, tiles of B rows inside).
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace lowbit::cpu::avx512 {

namespace {

constexpr int64_t kMC = 64;

// The sum of the 16 int32 lanes modulo 2^32, with vector adds (which wrap by definition); GCC's
// _mm512_reduce_add_epi32 adds in C ints, whose overflow is undefined behaviour, and the biased
// sums of int8_gemm below can leave the int32 range on the way to an exact result.
inline uint32_t reduce_add_wrap(__m512i v) {
  const __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));  // lanes + lanes two apart
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));  // + the neighbour lane
  return uint32_t(_mm_cvtsi128_si32(s4));
}

inline __mmask64 tail_mask(int64_t left) {
  return left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
}

int32_t row_sum(const int8_t* a, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64)
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(tail_mask(K - k), a + k));
  return int32_t(reduce_add_wrap(acc));  // |sum| <= 128 * K: no wrap
}

template <int MR, int NR>
void tile(const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t ldc,
          const int32_t* a_sums) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = tail_mask(K - k);
    __m512i av[MR];
    for (int i = 0; i < MR; ++i) av[i] = _mm512_maskz_loadu_epi8(mk, a + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m512i bu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, b + j * K + k), flip);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], bu, av[i]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      // Modulo 2^32 in unsigned arithmetic; the true C fits in int32, so the cast is exact.
      c[i * ldc + j] = int32_t(reduce_add_wrap(acc[i][j]) - 128u * uint32_t(a_sums[i]));
}

template <int MR>
void tile_nr(int nr, const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t ldc,
             const int32_t* a_sums) {
  switch (nr) {
    case 4:
      return tile<MR, 4>(a, b, c, K, ldc, a_sums);
    case 3:
      return tile<MR, 3>(a, b, c, K, ldc, a_sums);
    case 2:
      return tile<MR, 2>(a, b, c, K, ldc, a_sums);
    default:
      return tile<MR, 1>(a, b, c, K, ldc, a_sums);
  }
}

}  // namespace

void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  // The biased sums may exceed int32 for large K, but vpdpbusd and the final additions wrap
  // modulo 2^32, and the true C fits in int32 (the wrapper bounds K), so C comes out exact.
  constexpr int MR = 4, NR = 4;
  int32_t sums[kMC];
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t m1 = std::min(M, m0 + kMC);
    for (int64_t m = m0; m < m1; ++m) sums[m - m0] = row_sum(A + m * K, K);
    for (int64_t n = n_begin; n < n_end; n += NR) {
      const int nr = int(std::min<int64_t>(NR, n_end - n));
      const int8_t* b = B + n * K;
      int64_t m = m0;
      for (; m + MR <= m1; m += MR)
        tile_nr<MR>(nr, A + m * K, b, C + m * N + n, K, N, sums + (m - m0));
      int32_t* c = C + m * N + n;
      const int32_t* s = sums + (m - m0);
      switch (m1 - m) {
        case 3:
          tile_nr<3>(nr, A + m * K, b, c, K, N, s);
          break;
        case 2:
          tile_nr<2>(nr, A + m * K, b, c, K, N, s);
          break;
        case 1:
          tile_nr<1>(nr, A + m * K, b, c, K, N, s);
          break;
        default:
          break;
      }
    }
  }
}

}  // namespace lowbit::cpu::avx512
