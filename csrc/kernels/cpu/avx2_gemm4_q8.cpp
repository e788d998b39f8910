// The small-M 4-bit product with int8 activations, AVX2 (see gemm_4bit_q8 in lowbit/cpu_kernels.h).
//
// Per 64-element chunk of a weight row (32 packed bytes, one 256-bit load):
//   1. split the nibbles into two planes of 32 bytes: plane 0 = high nibbles = elements 2j,
//      plane 1 = low nibbles = elements 2j + 1 (j = byte index 0..31);
//   2. one vpshufb per plane turns nibbles into the offset weight codes u = w + 64 in [0, 128];
//   3. vpmaddubsw multiplies them (unsigned) by the activation codes (signed, |x| <= 127): a pair
//      sum is at most 2 * 128 * 127 = 32512, so int16 never saturates;
//   4. vpmaddwd with ones widens pairs of int16 to int32: int32 lane i (0..7) then holds the
//      products of plane bytes 4i..4i+3 of both planes, i.e. chunk elements 8i..8i+7.
// The offset adds 64 * sum(x) per chunk to the integer sums. That sum depends on the activations
// only, so it is computed once per call (quantize_activations_q8's half_sums) and subtracted once
// per output, scaled like the chunk: out = code_scale * (sum_c s_c * I_c - sum_c s_c * 64 * X_c).
// Without the offset, |w| would be the unsigned operand and the sign would move onto x (vpabsb +
// vpsignb per plane): measured 28.7 vs 45.8 G weights/s in cache on one Zen 3 core.
// The activations were quantized in the same two-plane order, so no permute is needed. Each
// chunk's 8 int32 sums are converted once and scaled by absmax(block) * activation_scale(chunk);
// for blocksize 32, lanes 0..3 (elements 0..31) belong to one block and lanes 4..7 to the next.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "avx2_util.h"
#include "kernels.h"

namespace lowbit::cpu::avx2 {

namespace {

// The hardware prefetcher alone leaves the core waiting on DRAM in this loop (measured 2.0x vs
// 1.2x over bf16 F.linear on one thread, 11008 x 4096): ask for the weight bytes this far ahead
// in every row stream. 2-8 KiB all measured the same; 1 KiB and less fell back.
constexpr int64_t kPrefetchBytes = 4096;
constexpr float kTinyAbsmax = 7.888609052210118e-31f;  // 2^-100
// Above this chunk absmax the fp32 scale and offset products could overflow to Inf (and Inf - Inf
// to NaN) where the exact sum is finite: such activations take the fp32 kernels too.
constexpr float kHugeAbsmax = 1.8446744073709552e19f;  // 2^64

// One chunk's offset weight codes, per plane (see the top of the file).
struct Chunk {
  __m256i u0, u1;
};

inline Chunk decode_chunk(__m256i table, const uint8_t* p) {
  // Integer arithmetic: the address may lie past the end of the weight, which a prefetch may
  // touch (it never faults) but pointer arithmetic may not form.
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes),
               _MM_HINT_T0);
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  // vpshufb reads index bits 0..3 and zeroes a byte whose bit 7 is set, so both planes are masked.
  return {_mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(w, 4), low4)),
          _mm256_shuffle_epi8(table, _mm256_and_si256(w, low4))};
}

// 8 int32 sums of u * x over one chunk: lane i covers chunk elements 8i..8i+7.
inline __m256i dot_chunk(const Chunk& w, __m256i x0, __m256i x1) {
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w.u0, x0), ones),
                          _mm256_madd_epi16(_mm256_maddubs_epi16(w.u1, x1), ones));
}

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

struct Activations {
  const int8_t* q;      // [M, K] codes, two planes per chunk
  const float* scale;   // [M, K / 64]
  const float* offset;  // [M, 3, K / 64]: chunk, first-half and second-half offset sums
  int64_t K, chunks;
};

// The general small-M tile: weight row j against MT activation rows from m0. Per chunk the scale
// is a vector (blocksize 32: one block per half chunk) and the offset correction is accumulated
// per output as a scalar.
template <int MT, bool kHalfChunkBlocks, typename Scales>
void tile(const Activations& x, const uint8_t* packed, const Scales& absmax, __m256i table,
          float code_scale, int log2_bs, float* out, int64_t N, int64_t m0, int64_t j) {
  __m256 acc[MT];
  float corr[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps(), corr[m] = 0.0f;
  const uint8_t* row = packed + j * (x.K / 2);  // K even: rows start on a byte
  for (int64_t c = 0; c < x.chunks; ++c) {
    const int64_t b = (j * x.K + 64 * c) >> log2_bs;  // block of the chunk's first element
    const float a0 = absmax[b], a1 = kHalfChunkBlocks ? absmax[b + 1] : a0;
    const Chunk w = decode_chunk(table, row + 32 * c);
    for (int m = 0; m < MT; ++m) {
      const int64_t r = m0 + m;
      const int8_t* xq = x.q + r * x.K + 64 * c;
      const __m256i isum = dot_chunk(w, load32(xq), load32(xq + 32));
      const float xs = x.scale[r * x.chunks + c];
      const __m256 s = kHalfChunkBlocks
                           ? _mm256_set_m128(_mm_set1_ps(a1 * xs), _mm_set1_ps(a0 * xs))
                           : _mm256_set1_ps(a0 * xs);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[m]);
      const float* off = x.offset + r * 3 * x.chunks + c;
      corr[m] += kHalfChunkBlocks ? a0 * off[x.chunks] + a1 * off[2 * x.chunks] : a0 * off[0];
    }
  }
  for (int m = 0; m < MT; ++m) out[(m0 + m) * N + j] = (simd::hsum(acc[m]) - corr[m]) * code_scale;
}

// scale[c] = absmax(block of chunk c) * activation scale(c) for every chunk of the row that starts
// at element e0;
// returns the row's offset correction sum_c absmax(block of c) * offset(c). Blocksize 64 (the
// common case) runs 8 chunks per step; a double-quantized absmax takes the same steps, so its
// results equal those of the decoded fp32 absmax bit for bit.
template <typename Scales>
float row_scales(const Activations& x, const Scales& absmax, int64_t e0, int log2_bs,
                 float* scale) {
  int64_t c = 0;
  float corr = 0.0f;
  if (log2_bs == 6) {  // blocksize 64: chunk c is block e0 / 64 + c
    const int64_t b0 = e0 >> 6;
    __m256 cv = _mm256_setzero_ps();
    for (; c + 8 <= x.chunks; c += 8) {
      __m256 a;
      if constexpr (std::is_same_v<Scales, const float*>) {
        a = _mm256_loadu_ps(absmax + b0 + c);
      } else {  // double quantized: decode 8 scales, then the same vector steps (same sums)
        alignas(32) float t[8];
        for (int i = 0; i < 8; ++i) t[i] = absmax[b0 + c + i];
        a = _mm256_load_ps(t);
      }
      _mm256_storeu_ps(scale + c, _mm256_mul_ps(a, _mm256_loadu_ps(x.scale + c)));
      cv = _mm256_fmadd_ps(a, _mm256_loadu_ps(x.offset + c), cv);
    }
    corr = simd::hsum(cv);
  }
  for (; c < x.chunks; ++c) {
    // The row may start inside a block (K % blocksize != 0): index from the element, not the row.
    const float a = absmax[(e0 + 64 * c) >> log2_bs];
    scale[c] = a * x.scale[c];
    corr += a * x.offset[c];
  }
  return corr;
}

// M = 1 with one block per chunk (blocksize >= 64): rows j0 + i + r * stride (r < RT) for i in
// [0, stride), the hot path of token-by-token generation. A pass over each row's scales first gives
// scale[c] = absmax(block of chunk c) * activation scale of chunk c and the row's offset
// correction, so the inner loop is decode, 2 multiply-adds, one convert and one FMA with a
// broadcast load.
template <int RT, typename Scales>
void gemv_rows(const Activations& x, const uint8_t* packed, const Scales& absmax, __m256i table,
               float code_scale, int log2_bs, float* out, int64_t j0, int64_t stride,
               float* scale) {
  const int64_t chunks = x.chunks, K = x.K;
  for (int64_t j = j0; j < j0 + stride; ++j) {
    float corr[RT];
    for (int r = 0; r < RT; ++r)
      corr[r] = row_scales(x, absmax, (j + r * stride) * K, log2_bs, scale + r * chunks);
    __m256 acc[RT];
    for (auto& v : acc) v = _mm256_setzero_ps();
    const uint8_t* rows = packed + j * (K / 2);
    const int64_t row_step = stride * (K / 2);
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i x0 = load32(x.q + 64 * c), x1 = load32(x.q + 64 * c + 32);
      for (int r = 0; r < RT; ++r) {
        const __m256i isum = dot_chunk(decode_chunk(table, rows + r * row_step + 32 * c), x0, x1);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum),
                                 _mm256_broadcast_ss(scale + r * chunks + c), acc[r]);
      }
    }
    for (int r = 0; r < RT; ++r) out[j + r * stride] = (simd::hsum(acc[r]) - corr[r]) * code_scale;
  }
}

template <bool kHalfChunkBlocks, typename Scales>
void gemm_rows(const Activations& x, int64_t M, const uint8_t* packed, const Scales& absmax,
               __m256i table, float code_scale, int log2_bs, float* out, int64_t N, int64_t n_begin,
               int64_t n_end) {
  if (M == 1 && !kHalfChunkBlocks) {
    // 2 rows half the range apart: two independent DRAM streams per thread keep about twice the
    // cache misses in flight of one (measured 30 vs 18 GB/s on 11008 x 4096, 2 threads; adjacent
    // rows look like one stream to the prefetchers). 4 streams measured the same as 2.
    constexpr int RT = 2;
    std::vector<float> scale(static_cast<size_t>(RT * x.chunks));
    const int64_t stride = (n_end - n_begin) / RT;
    const int64_t whole = n_begin + RT * stride;
    if (stride > 0)
      gemv_rows<RT>(x, packed, absmax, table, code_scale, log2_bs, out, n_begin, stride,
                    scale.data());
    for (int64_t j = whole; j < n_end; ++j)
      tile<1, false>(x, packed, absmax, table, code_scale, log2_bs, out, N, 0, j);
    return;
  }
  // Several activation rows: each weight chunk is decoded once per group of up to 4.
  for (int64_t j = n_begin; j < n_end; ++j) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      tile<4, kHalfChunkBlocks>(x, packed, absmax, table, code_scale, log2_bs, out, N, m, j);
    for (; m + 2 <= M; m += 2)
      tile<2, kHalfChunkBlocks>(x, packed, absmax, table, code_scale, log2_bs, out, N, m, j);
    for (; m < M; ++m)
      tile<1, kHalfChunkBlocks>(x, packed, absmax, table, code_scale, log2_bs, out, N, m, j);
  }
}

template <typename Scales>
void gemm_any_blocksize(const Activations& x, int64_t M, const uint8_t* packed,
                        const Scales& absmax, __m256i table, float code_scale, int64_t blocksize,
                        float* out, int64_t N, int64_t n_begin, int64_t n_end) {
  int log2_bs = 0;
  while ((int64_t(1) << log2_bs) < blocksize) ++log2_bs;
  if (blocksize == 32)
    gemm_rows<true>(x, M, packed, absmax, table, code_scale, log2_bs, out, N, n_begin, n_end);
  else
    gemm_rows<false>(x, M, packed, absmax, table, code_scale, log2_bs, out, N, n_begin, n_end);
}

}  // namespace

bool quantize_activations_q8(const float* a, int64_t K, int8_t* q, float* scales, float* offsets,
                             int64_t r_begin, int64_t r_end) {
  const int64_t chunks = K / kQ8Chunk;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 big = _mm256_set1_ps(3.4028234663852886e38f);
  for (int64_t m = r_begin; m < r_end; ++m) {
    for (int64_t c = 0; c < chunks; ++c) {
      const float* x = a + m * K + 64 * c;
      int8_t* out = q + m * K + 64 * c;
      float* off = offsets + m * 3 * chunks + c;  // [3][chunks] per row
      __m256 v[8];
      __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        const __m256 av = _mm256_andnot_ps(sign, v[i]);
        mx = _mm256_max_ps(mx, av);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(av, big, _CMP_NLE_UQ));  // NaN or +-Inf
      }
      if (_mm256_movemask_ps(bad) != 0) return false;
      const float amax = simd::hmax(mx);
      if (amax == 0.0f) {
        std::fill(out, out + 64, int8_t(0));
        scales[m * chunks + c] = 0.0f;
        off[0] = off[chunks] = off[2 * chunks] = 0.0f;
        continue;
      }
      if (amax < kTinyAbsmax || amax > kHugeAbsmax) return false;
      const __m256 inv = _mm256_set1_ps(127.0f / amax);
      alignas(32) int32_t codes[64];
      for (int i = 0; i < 8; ++i)  // vcvtps2dq rounds to nearest-even (the default MXCSR mode)
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes + 8 * i),
                           _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
      // Two planes: even elements, then odd ones (see lowbit/cpu_kernels.h).
      int32_t sum0 = 0, sum1 = 0;
      for (int j = 0; j < 32; ++j) {
        out[j] = int8_t(codes[2 * j]);
        out[32 + j] = int8_t(codes[2 * j + 1]);
      }
      for (int e = 0; e < 32; ++e) sum0 += codes[e], sum1 += codes[32 + e];
      const float s = amax / 127.0f;
      scales[m * chunks + c] = s;
      // |64 * sum| <= 64 * 64 * 127 < 2^24: exact in fp32 before the one rounding by s.
      off[0] = s * float(kQ8WeightOffset * (sum0 + sum1));
      off[chunks] = s * float(kQ8WeightOffset * sum0);
      off[2 * chunks] = s * float(kQ8WeightOffset * sum1);
    }
  }
  return true;
}

void gemm_4bit_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                  int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
                  const Q8Codebook& code, int64_t blocksize, float* out, int64_t N, int64_t n_begin,
                  int64_t n_end) {
  alignas(16) uint8_t t[16];
  std::copy(code.code_u8, code.code_u8 + 16, t);
  const __m256i table =
      _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
  const Activations x{q, q_scales, offsets, K, K / kQ8Chunk};
  if (scales.nested())
    gemm_any_blocksize(x, M, packed, scales, table, code.scale, blocksize, out, N, n_begin, n_end);
  else
    gemm_any_blocksize(x, M, packed, scales.absmax, table, code.scale, blocksize, out, N, n_begin,
                       n_end);
}

}  // namespace lowbit::cpu::avx2
