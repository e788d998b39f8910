// int8 x int8 -> int32 GEMM, AVX2: C = A * B^T with A [M, K] and B [N, K] both row-major.
//
// Each 16-byte piece of a row is sign-extended to 16 int16 lanes (vpmovsxbw) and multiplied with
// vpmaddwd, which forms 16-bit products and adds adjacent pairs into 8 int32 lanes:
// |a0*b0 + a1*b1| <= 2 * 128 * 128 = 2^15 fits easily, so every int8 value, -128 included, is
// exact (vpmaddubsw is faster per instruction but saturates to int16 and needs one unsigned
// operand; on Zen 4 / Ice Lake both issue twice per cycle, so the widened form loses little).
// A register tile of MR rows of A by NR rows of B keeps MR x NR int32x8 accumulators; each loaded
// piece is reused NR (or MR) times. Loops: blocks of kMC rows of A (kept in L2) outside, tiles
// of NR rows of B (kept in L1) inside, so B is streamed once per block of A.
#include <immintrin.h>

#include <algorithm>

#include "avx2_util.h"
#include "int8_gemm_avx2.h"

namespace lowbit::cpu::avx2 {

namespace {

constexpr int64_t kMC = 48;  // rows of A per cache block: 48 * K bytes (192 KiB at K = 4096)

inline __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// C tile [MR x NR] at rows a of A and rows b of B; ldc is C's row stride (N).
template <int MR, int NR>
void tile(const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t ldc) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i av[MR];
    for (int i = 0; i < MR; ++i) av[i] = widen16(a + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m256i bv = widen16(b + j * K + k);
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av[i], bv));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t s = simd::hsum_epi32(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += int32_t(a[i * K + t]) * int32_t(b[j * K + t]);
      c[i * ldc + j] = s;
    }
}

// Runtime (mr, nr) -> the tile instance; mr in 1..3, nr in 1..4.
template <int MR>
void tile_nr(int nr, const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t ldc) {
  switch (nr) {
    case 4:
      return tile<MR, 4>(a, b, c, K, ldc);
    case 3:
      return tile<MR, 3>(a, b, c, K, ldc);
    case 2:
      return tile<MR, 2>(a, b, c, K, ldc);
    default:
      return tile<MR, 1>(a, b, c, K, ldc);
  }
}

}  // namespace

void int8_gemm_avx2(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                    int64_t n_begin, int64_t n_end) {
  constexpr int MR = 3, NR = 4;
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t m1 = std::min(M, m0 + kMC);
    for (int64_t n = n_begin; n < n_end; n += NR) {
      const int nr = int(std::min<int64_t>(NR, n_end - n));
      const int8_t* b = B + n * K;
      int64_t m = m0;
      for (; m + MR <= m1; m += MR) tile_nr<MR>(nr, A + m * K, b, C + m * N + n, K, N);
      if (m1 - m == 2) tile_nr<2>(nr, A + m * K, b, C + m * N + n, K, N);
      if (m1 - m == 1) tile_nr<1>(nr, A + m * K, b, C + m * N + n, K, N);
    }
  }
}

}  // namespace lowbit::cpu::avx2
