// int8 x int8 -> int32 GEMM, AVX-512 VNNI: C = A * B^T with A [M, K], B [N, K] row-major.
//
// vpdpbusd multiplies UNSIGNED bytes of its first operand by SIGNED bytes of the second and adds
// each group of 4 products into an int32 lane, without intermediate saturation. B is made
// unsigned by flipping its sign bit, b ^ 0x80 = b + 128 in [0, 255], so the instruction yields
//     sum_k (B[n, k] + 128) * A[m, k] = C[m, n] + 128 * sum_k A[m, k],
// and 128 * (the row sum of A) is subtracted at the end. The biased sums can leave the int32
// range for large K (255 * 128 * K), but vpdpbusd and the vector subtraction wrap modulo 2^32
// and the true C fits in int32 (the wrapper bounds K), so C comes out exact; scalar sums that may
// wrap are unsigned (no signed overflow in C++ arithmetic: UBSan runs on this file in CI).
//
// Two kernels, picked by M (packed_min_m below, measured on Zen 4):
//
// The packed (outer-product) kernel, M >= packed_min_m. B is packed per call, one panel of
// kNR = 32 columns at a time (BLIS-style: the panel, 32 * K bytes, stays in L2 and serves every
// row of A), into the VNNI layout: one 64-byte vector per 4 consecutive k and 16 columns,
//     panel[s * nv + v] byte 4 * j + t = B[n0 + 16 * v + j, 4 * s + t] ^ 0x80
// (s: the k-step, k = 4 * s + t with t in 0..3; v: the vector within the panel, nv = 2, fewer
// at the N edge; j: the column within the vector). So lane j of a packed vector holds the 4
// flipped bytes of column n0 + 16 v + j at one k-step, which vpdpbusd multiplies with 4 bytes of
// one A row broadcast to every lane (vpbroadcastd): lane j accumulates C[m, n0 + 16 v + j]
// directly. The micro-kernel keeps an 8 x 32 tile of C in 16 zmm accumulators; per k-step it
// loads 2 packed vectors and 8 broadcasts for 16 vpdpbusd, and the tile is stored as whole
// 16-lane vectors (masked at the N edge): no horizontal reductions at all. Bytes past K (the K
// tail) and columns past N are packed as zeros, and the last, partial k-step of each A row is
// read byte by byte into a zeroed word, so nothing past a row of A is read and the padding adds
// 0. Packing is a 16 x 16 transpose of 32-bit words (16 rows of B by 64 bytes of k) per 16
// vectors: ~6 instructions per packed vector, against M vpdpbusd that use it.
//
// The dot-product (inner-product) kernel, M < packed_min_m (decode, M = 1): each zmm accumulator
// holds 16 partial sums along k of ONE C element, B rows are read straight from the weight (no
// packing: it streams weights at bandwidth), and each C element ends with a 16-lane horizontal
// reduction; tiles of 4 x 4 accumulators, blocks of A rows outside, tiles of B rows inside.
//
// Measured on a 2-vCPU Zen 4 guest (BENCHMARKS.md, "int8 GEMM on AVX-512 VNNI", 2026-12-01;
// benchmarks/bench_int8_gemm_cpu.py, the kernels forced in one process): the packed kernel
// does 128 x 4096 x 4096 in 10.5 ms on one thread, 204 G int8 multiply-adds/s (one zmm vpdpbusd
// per cycle, 64 multiply-adds, at ~3.2 GHz; bf16 torch.matmul: 102 G/s), 1.9-2.3x bf16
// torch.matmul at M = 16..512 and 2.4-2.9x the dot kernel at M = 64..512. Crossover: at M = 1..3
// the dot kernel is 1.2-2.5x faster (no packing; the 3-row tile streams B once), from M = 4 the
// packed one (1.07-1.2x at M = 4, 1.5x at M = 8), hence packed_min_m = 4.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace lowbit::cpu::avx512 {

namespace {

// ---- shared helpers -----------------------------------------------------------------------------

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

// ---- the packed (outer-product) kernel ----------------------------------------------------------

constexpr int kNV = 2;         // 16-column vectors per panel
constexpr int kNR = 16 * kNV;  // columns of B per panel (= per micro-tile)
constexpr int kMR = 8;         // rows of A per micro-tile: kMR * kNV = 16 accumulators

// The smallest M that takes the packed kernel; a test and benchmark hook can change it.
std::atomic<int64_t> packed_min_m{4};

// In-place transpose of a 16 x 16 matrix of 32-bit words, r[i] lane j -> r[j] lane i.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  // t[2i], t[2i+1]: rows 2i, 2i+1 interleaved by words; in each 128-bit lane L,
  // t[2i] = (r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]), t[2i+1] the same for words 4L+2, 4L+3.
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4q + c], in 128-bit lane L: rows 4q..4q+3 at word 4L + c.
  for (int q = 0; q < 4; ++q) {
    const __m512i* tq = t + 4 * q;
    u[4 * q + 0] = _mm512_unpacklo_epi64(tq[0], tq[2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(tq[0], tq[2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(tq[1], tq[3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(tq[1], tq[3]);
  }
  // Output word row 4L + c = lane L of u[c], u[4 + c], u[8 + c], u[12 + c], in that lane order.
  // _mm512_shuffle_i32x4(x, y, imm): lanes 0, 1 from x and 2, 3 from y, each picked by 2 bits.
  for (int c = 0; c < 4; ++c) {
    const __m512i p0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);  // uc.L0 uc.L1 u4c.L0 u4c.L1
    const __m512i p1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);  // uc.L2 uc.L3 u4c.L2 u4c.L3
    const __m512i q0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i q1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(p0, q0, 0x88);       // lanes 0, 2 of each: L = 0
    r[4 + c] = _mm512_shuffle_i32x4(p0, q0, 0xDD);   // lanes 1, 3 of each: L = 1
    r[8 + c] = _mm512_shuffle_i32x4(p1, q1, 0x88);   // L = 2
    r[12 + c] = _mm512_shuffle_i32x4(p1, q1, 0xDD);  // L = 3
  }
}

// Packs the columns (rows of B) [n0, n0 + cols), cols <= 16 * nv, into nv-vector VNNI layout
// (see the top of the file): out[s * nv + v], s < ceil(K / 4). Columns past cols and bytes past
// K are zero.
void pack_panel(const int8_t* B, int64_t K, int64_t n0, int cols, int nv, __m512i* out) {
  for (int v = 0; v < nv; ++v) {
    const int vcols = std::min(16, cols - 16 * v);
    const int8_t* bv = B + (n0 + 16 * v) * K;
    for (int64_t kc = 0; kc < K; kc += 64) {
      const __mmask64 mk = tail_mask(K - kc);
      // Zero outside the mask, so the padding bytes stay 0 after the flip.
      const __m512i flip = _mm512_maskz_mov_epi8(mk, _mm512_set1_epi8(char(0x80)));
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = j < vcols ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, bv + j * K + kc), flip)
                         : _mm512_setzero_si512();
      // r[j] word s = the 4 bytes of column j at k = kc + 4 s .. +3; after the transpose r[s]
      // word j holds them: the packed vector of k-step kc / 4 + s.
      transpose16x16_epi32(r);
      const int64_t s0 = kc / 4;
      const int steps = int(std::min<int64_t>(16, (K - kc + 3) / 4));
      for (int s = 0; s < steps; ++s) _mm512_store_si512(out + (s0 + s) * nv + v, r[s]);
    }
  }
}

// acc += vpdpbusd(u, s) through inline assembly: with the intrinsic, GCC 12 copied all 16
// accumulators between registers (and two through the stack) on every k-step of the 8 x 32 tile,
// 30 extra instructions per 16 vpdpbusd; the tied "+v" operand keeps each accumulator in one
// register. The unroll pragmas let the accumulator array become registers before allocation.
inline void dpbusd(__m512i& acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// C tile [R x 16 NV] = rows a (stride lda) of A times the packed panel bp; corr[i] = 128 * the
// row sum of A row i (mod 2^32). The last vector of each row is stored with last_mask.
template <int R, int NV>
void micro_tile(const int8_t* a, int64_t lda, const __m512i* bp, int64_t K, int32_t* c, int64_t ldc,
                const uint32_t* corr, __mmask16 last_mask) {
  __m512i acc[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();
  const int64_t K4 = K / 4;
  for (int64_t s = 0; s < K4; ++s) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_load_si512(bp + s * NV + v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512i av = _mm512_set1_epi32(load_i32(a + i * lda + 4 * s));  // vpbroadcastd
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) dpbusd(acc[i][v], b[v], av);
    }
  }
  if (const int tail = int(K - 4 * K4); tail > 0) {
    // The last 1..3 bytes of each row, zero-extended to a word: no read past the row.
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_load_si512(bp + K4 * NV + v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      int32_t w = 0;
      std::memcpy(&w, a + i * lda + 4 * K4, size_t(tail));
      const __m512i av = _mm512_set1_epi32(w);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) dpbusd(acc[i][v], b[v], av);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    // Vector subtraction wraps modulo 2^32; the true C fits in int32, so the result is exact.
    const __m512i ci = _mm512_set1_epi32(int32_t(corr[i]));
    for (int v = 0; v < NV - 1; ++v)
      _mm512_storeu_si512(c + i * ldc + 16 * v, _mm512_sub_epi32(acc[i][v], ci));
    _mm512_mask_storeu_epi32(c + i * ldc + 16 * (NV - 1), last_mask,
                             _mm512_sub_epi32(acc[i][NV - 1], ci));
  }
}

// micro_tile with the row count R as a run-time value in 1..kMR (the M edge).
template <int NV, int R = kMR>
void micro_tile_rows(int rows, const int8_t* a, int64_t lda, const __m512i* bp, int64_t K,
                     int32_t* c, int64_t ldc, const uint32_t* corr, __mmask16 last_mask) {
  if constexpr (R > 1)
    if (rows < R) return micro_tile_rows<NV, R - 1>(rows, a, lda, bp, K, c, ldc, corr, last_mask);
  micro_tile<R, NV>(a, lda, bp, K, c, ldc, corr, last_mask);
}

// One panel of nv vectors (template: the micro-tile keeps its accumulators in registers) against
// every row of A.
template <int NV>
void panel_times_a(const int8_t* A, const __m512i* bp, int32_t* C, int64_t M, int64_t N, int64_t K,
                   int64_t n0, const uint32_t* corr, __mmask16 last_mask) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    micro_tile<kMR, NV>(A + m * K, K, bp, K, C + m * N + n0, N, corr + m, last_mask);
  if (m < M)
    micro_tile_rows<NV>(int(M - m), A + m * K, K, bp, K, C + m * N + n0, N, corr + m, last_mask);
}

void gemm_packed(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                 int64_t n_begin, int64_t n_end) {
  // Per thread, reused across calls: the packed panel (kNR * ceil(K / 4) * 4 bytes, at most 4 MiB
  // at the wrapper's K bound) and the row-sum corrections. A fresh allocation of that size per
  // call would be served by mmap and pay a page fault per 4 KiB on every call.
  struct alignas(64) Vec64 {
    uint8_t bytes[64];
  };
  thread_local std::vector<Vec64> panel;
  thread_local std::vector<uint32_t> corr;
  const int64_t steps = (K + 3) / 4;
  if (int64_t(panel.size()) < steps * kNV) panel.resize(size_t(steps * kNV));
  __m512i* pp = reinterpret_cast<__m512i*>(panel.data());
  if (int64_t(corr.size()) < M) corr.resize(size_t(M));
  for (int64_t m = 0; m < M; ++m) corr[m] = 128u * uint32_t(row_sum(A + m * K, K));
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNR) {
    const int cols = int(std::min<int64_t>(kNR, n_end - n0));
    const int nv = (cols + 15) / 16;
    const __mmask16 last_mask = __mmask16((1u << (cols - 16 * (nv - 1))) - 1u);
    pack_panel(B, K, n0, cols, nv, pp);
    if (nv == kNV)
      panel_times_a<kNV>(A, pp, C, M, N, K, n0, corr.data(), last_mask);
    else
      panel_times_a<1>(A, pp, C, M, N, K, n0, corr.data(), last_mask);
  }
}

// ---- the dot-product kernel (small M) -----------------------------------------------------------

constexpr int64_t kMC = 64;

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

void gemm_dot(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
              int64_t n_begin, int64_t n_end) {
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

}  // namespace

void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  if (n_begin >= n_end || M <= 0) return;
  if (M >= packed_min_m.load(std::memory_order_relaxed))
    return gemm_packed(A, B, C, M, N, K, n_begin, n_end);
  gemm_dot(A, B, C, M, N, K, n_begin, n_end);
}

}  // namespace lowbit::cpu::avx512

extern "C" int64_t lowbit_cpu_int8_gemm_packed_min_m(int64_t m) {
  auto& t = lowbit::cpu::avx512::packed_min_m;
  return m < 0 ? t.load() : t.exchange(m);
}
