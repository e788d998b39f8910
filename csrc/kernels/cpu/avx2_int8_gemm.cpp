// int8 x int8 -> int32 GEMM, AVX2: C = A * B^T with A [M, K] and B [N, K] both row-major.
//
// Main kernel: the sign trick. vpmaddubsw multiplies UNSIGNED bytes of its first operand by
// SIGNED bytes of the second and adds adjacent pairs into int16 with saturation; vpmaddwd with
// ones then widens the pairs into int32 lanes. With u = |b| (vpsignb(b, b)) and s = a * sign(b)
// (vpsignb(a, b)), u * s = a * b for every pair of int8 values except a = -128 with b < 0, where
// vpsignb wraps -(-128) back to -128. For b = -128, vpsignb(b, b) gives the byte 0x80 = 128 as
// unsigned, which is exact. Each int16 pair sum is then at most 2 * 128 * 127 = 32512 < 2^15, so
// nothing saturates and every product is exact. A (the activations, from the row quantizer in
// [-127, 127]) is scanned once per call for -128; if it holds one, the call takes the widening
// kernel below instead, which is exact for all int8 values. B (the weights) may hold anything.
//
// Per 32 bytes of k and per (row of A, row of B): vpsignb, vpmaddubsw, vpmaddwd, vpaddd, i.e. 32
// products in 4 instructions, 2 of them multiplies, as in the widening kernel (2 x (vpmaddwd,
// vpaddd)), which also spends a vpmovsxbw per 16 loaded bytes; the gain is those widenings.
// Register tiles of 6 rows of A by 1 row of B (6 int32x8 accumulators; b and |b| are loaded and
// formed once per 6 products); for M = 1 a row of A against 8 rows of B so that 8 weight streams
// are in flight. Loops: blocks of kMC rows of A (kept in L2) outside, rows of B (kept in L1)
// inside, tiles of 6 rows of A innermost, whole K per tile. Measured on Zen 4 (2 threads, 1 core):
// 1.2-1.3x the widening kernel at M = 128..512, ~1.05x at M = 8; 4 x 2, 2 x 4,
// 3 x 3 tiles and blocking k by 512..2048 bytes were slower. The M = 1 path streams weights at
// about the machine's read bandwidth (11008 x 4096: ~28 GB/s, 1.2x the widening kernel); software
// prefetch (512..2048 bytes ahead) and 2 or 4 rows per tile were slower.
//
// Fallback (A holds -128): each 16-byte piece of a row is sign-extended to 16 int16 lanes
// (vpmovsxbw) and multiplied with vpmaddwd: |a0*b0 + a1*b1| <= 2 * 128 * 128 = 2^15 fits, so every
// int8 value is exact; 3 x 4 tiles.
#include <immintrin.h>

#include <algorithm>

#include "avx2_util.h"
#include "int8_gemm_avx2.h"

namespace lowbit::cpu::avx2 {

namespace {

// ---- the widening kernel (exact for every int8 input) -----------------------------------------

constexpr int64_t kWideMC = 48;  // rows of A per cache block: 48 * K bytes (192 KiB at K = 4096)

inline __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// C tile [MR x NR] at rows a of A and rows b of B; ldc is C's row stride (N).
template <int MR, int NR>
void wide_tile(const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t ldc) {
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

template <int MR>
void wide_tile_nr(int nr, const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t ldc) {
  switch (nr) {
    case 4:
      return wide_tile<MR, 4>(a, b, c, K, ldc);
    case 3:
      return wide_tile<MR, 3>(a, b, c, K, ldc);
    case 2:
      return wide_tile<MR, 2>(a, b, c, K, ldc);
    default:
      return wide_tile<MR, 1>(a, b, c, K, ldc);
  }
}

void gemm_wide(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  constexpr int MR = 3, NR = 4;
  for (int64_t m0 = 0; m0 < M; m0 += kWideMC) {
    const int64_t m1 = std::min(M, m0 + kWideMC);
    for (int64_t n = n_begin; n < n_end; n += NR) {
      const int nr = int(std::min<int64_t>(NR, n_end - n));
      const int8_t* b = B + n * K;
      int64_t m = m0;
      for (; m + MR <= m1; m += MR) wide_tile_nr<MR>(nr, A + m * K, b, C + m * N + n, K, N);
      if (m1 - m == 2) wide_tile_nr<2>(nr, A + m * K, b, C + m * N + n, K, N);
      if (m1 - m == 1) wide_tile_nr<1>(nr, A + m * K, b, C + m * N + n, K, N);
    }
  }
}

// ---- the sign-trick kernel (A without -128) ----------------------------------------------------

constexpr int64_t kMC = 96;  // rows of A per block: 96 * K bytes (384 KiB at K = 4096) in L2

// True if any of the n bytes at p is -128.
bool has_min_int8(const int8_t* p, int64_t n) {
  const __m256i m128 = _mm256_set1_epi8(char(-128));
  __m256i any = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    any = _mm256_or_si256(
        any, _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), m128));
  bool found = !_mm256_testz_si256(any, any);
  for (; i < n; ++i) found |= p[i] == -128;
  return found;
}

// The 8 horizontal sums of v[0..7], in order, as one vector.
inline __m256i hsum8(const __m256i* v) {
  const __m256i t0 = _mm256_hadd_epi32(v[0], v[1]), t1 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i t2 = _mm256_hadd_epi32(v[4], v[5]), t3 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                          _mm256_permute2x128_si256(u0, u1, 0x31));
}

// C tile [MR x NR] = A rows a.. times B rows b.. over k in [k0, k1); ld: the row stride (K) of A
// and B; ldc: C's row stride (N).
template <int MR, int NR>
inline void sign_tile(const int8_t* a, const int8_t* b, int32_t* c, int64_t ld, int64_t k0,
                      int64_t k1, int64_t ldc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR * NR];
  for (int t = 0; t < MR * NR; ++t) acc[t] = _mm256_setzero_si256();
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    __m256i bs[NR], bu[NR];
    for (int j = 0; j < NR; ++j) {
      bs[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * ld + k));
      bu[j] = _mm256_sign_epi8(bs[j], bs[j]);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * ld + k));
      for (int j = 0; j < NR; ++j) {
        const __m256i p = _mm256_maddubs_epi16(bu[j], _mm256_sign_epi8(av, bs[j]));
        acc[i * NR + j] = _mm256_add_epi32(acc[i * NR + j], _mm256_madd_epi16(p, ones));
      }
    }
  }
  alignas(32) int32_t s[MR * NR];
  if constexpr (MR * NR == 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(s), hsum8(acc));
  } else {
    for (int t = 0; t < MR * NR; ++t) s[t] = simd::hsum_epi32(acc[t]);
  }
  for (; k < k1; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) s[i * NR + j] += int32_t(a[i * ld + k]) * int32_t(b[j * ld + k]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      c[i * ldc + j] = s[i * NR + j];
    }
}

template <int MR, int NR>
void sign_tile_nr(int nr, const int8_t* a, const int8_t* b, int32_t* c, int64_t ld, int64_t k0,
                  int64_t k1, int64_t ldc) {
  if constexpr (NR >= 4)
    if (nr == 4) return sign_tile<MR, 4>(a, b, c, ld, k0, k1, ldc);
  if constexpr (NR >= 3)
    if (nr == 3) return sign_tile<MR, 3>(a, b, c, ld, k0, k1, ldc);
  if (nr == 2) return sign_tile<MR, 2>(a, b, c, ld, k0, k1, ldc);
  return sign_tile<MR, 1>(a, b, c, ld, k0, k1, ldc);
}

// The [rows x nr] edge tile for rows in 1..R.
template <int R, int NR>
void sign_tile_rows(int rows, int nr, const int8_t* a, const int8_t* b, int32_t* c, int64_t ld,
                    int64_t k0, int64_t k1, int64_t ldc) {
  if constexpr (R > 1)
    if (rows < R) return sign_tile_rows<R - 1, NR>(rows, nr, a, b, c, ld, k0, k1, ldc);
  sign_tile_nr<R, NR>(nr, a, b, c, ld, k0, k1, ldc);
}

// M = 1: one row of A against the rows [n_begin, n_end) of B, 8 at a time, whole K.
void gemv_sign(const int8_t* a, const int8_t* B, int32_t* c, int64_t K, int64_t n_begin,
               int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 8 <= n_end; n += 8) sign_tile<1, 8>(a, B + n * K, c + n, K, 0, K, 0);
  for (; n + 2 <= n_end; n += 2) sign_tile<1, 2>(a, B + n * K, c + n, K, 0, K, 0);
  if (n < n_end) sign_tile<1, 1>(a, B + n * K, c + n, K, 0, K, 0);
}

void gemm_sign(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  constexpr int MR = 6, NR = 1;
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t m1 = std::min(M, m0 + kMC);
    for (int64_t n = n_begin; n < n_end; n += NR) {
      const int nr = int(std::min<int64_t>(NR, n_end - n));
      const int8_t* b = B + n * K;
      int64_t m = m0;
      for (; m + MR <= m1; m += MR)
        sign_tile_nr<MR, NR>(nr, A + m * K, b, C + m * N + n, K, 0, K, N);
      if (m < m1)
        sign_tile_rows<MR - 1, NR>(int(m1 - m), nr, A + m * K, b, C + m * N + n, K, 0, K, N);
    }
  }
}

}  // namespace

void int8_gemm_avx2(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                    int64_t n_begin, int64_t n_end) {
  if (n_begin >= n_end || M <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * N + n_begin, C + m * N + n_end, 0);
    return;
  }
  if (has_min_int8(A, M * K)) return gemm_wide(A, B, C, M, N, K, n_begin, n_end);
  if (M == 1) return gemv_sign(A, B, C, K, n_begin, n_end);
  gemm_sign(A, B, C, M, N, K, n_begin, n_end);
}

}  // namespace lowbit::cpu::avx2
