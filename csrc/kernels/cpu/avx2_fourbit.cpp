// 4-bit quantization, dequantization and the fused dequantize + product, AVX2 (+FMA+F16C).
// Codes and dequantized values are bit-identical to the generic kernels; products differ from
// them only by the order of the fp32 sums.
#include <algorithm>
#include <type_traits>

#include "avx2_util.h"
#include "fourbit_avx2.h"
#include "kernels.h"
#include "load_store.h"
#include "lowbit/codebook.h"

namespace lowbit::cpu::avx2 {

namespace {

// ---- quantize ----------------------------------------------------------------------------------

// #{bounds < x} over the 15 sorted bounds, 8 lanes at a time, in two levels (15 vector ops instead
// of 30 for 15 compares). Level 1: g = #{bound[3], bound[7], bound[11] < x} in 0..3 picks the
// group of 4 codes x falls in: bound[4g - 1] < x (all bounds below 4g are below x) and
// bound[4g + 3] >= x (none from 4g + 3 up is). Level 2 counts the group's own three,
// bound[4g + j] < x for j = 0..2, looked up per lane with vpermps. Bounds are sorted (midpoints of
// sorted values), which is all this needs. The counts come out negated (compare masks are -1):
// -(4g + c) in -15..0, and the tables are indexed by -g mod 8, so g = 0, 1, 2, 3 sit in lanes
// 0, 7, 6, 5.
struct Bucket16 {
  __m256 g3, g7, g11;  // level 1 bounds, broadcast
  __m256 t[3];         // t[j] lane (-g mod 8) = bound[4g + j]
  explicit Bucket16(const float* bound) {
    g3 = _mm256_set1_ps(bound[3]);
    g7 = _mm256_set1_ps(bound[7]);
    g11 = _mm256_set1_ps(bound[11]);
    for (int j = 0; j < 3; ++j)
      t[j] = _mm256_setr_ps(bound[j], 0.0f, 0.0f, 0.0f, 0.0f, bound[12 + j], bound[8 + j],
                            bound[4 + j]);
  }
  // Negated counts: -#{bounds < x} per lane.
  __m256i neg_count8(__m256 x) const {
    auto lt = [&](__m256 b) { return _mm256_castps_si256(_mm256_cmp_ps(b, x, _CMP_LT_OQ)); };
    const __m256i neg_g = _mm256_add_epi32(_mm256_add_epi32(lt(g3), lt(g7)), lt(g11));
    __m256i c = _mm256_slli_epi32(neg_g, 2);  // -4g
    for (int j = 0; j < 3; ++j) c = _mm256_add_epi32(c, lt(_mm256_permutevar8x32_ps(t[j], neg_g)));
    return c;
  }
};

// 32 normalised values -> 16 packed bytes. The four negated count vectors are narrowed with
// packs (which interleaves 128-bit lanes), negated back to 0..15, mapped through order[] with one
// pshufb, put back in element order with a dword permute, and paired: byte j = code[2j] << 4 |
// code[2j + 1].
inline void encode32(const Bucket16& bk, __m256i order, const __m256 x[4], uint8_t* out) {
  const __m256i k01 = _mm256_packs_epi32(bk.neg_count8(x[0]), bk.neg_count8(x[1]));
  const __m256i k23 = _mm256_packs_epi32(bk.neg_count8(x[2]), bk.neg_count8(x[3]));
  // Dwords now hold elements [0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31].
  const __m256i counts = _mm256_sub_epi8(_mm256_setzero_si256(), _mm256_packs_epi16(k01, k23));
  __m256i codes = _mm256_shuffle_epi8(order, counts);
  codes = _mm256_permutevar8x32_epi32(codes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // As 16-bit words (little endian) each holds (even code, odd code) = (low byte, high byte).
  const __m256i pair =
      _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(codes, _mm256_set1_epi16(0x00ff)), 4),
                      _mm256_srli_epi16(codes, 8));
  const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(pair, pair), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(bytes));
}

template <typename T>
void quantize_impl(const T* a, int64_t n, int64_t bs, const Codebook16& cb, uint8_t* packed,
                   float* absmax, int64_t b0, int64_t b1) {
  const Bucket16 bk(cb.bound);
  // order[] in both 128-bit lanes for pshufb (counts are 0..15, so no index has bit 7 set).
  const __m256i order =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb.order)));
  // Two passes over groups of blocks: all absmax scans and scales first, then the codes. With
  // one pass, each small block (64 elements) waits on its own scan -> horizontal max -> divide ->
  // scale chain (~50 cycles of latency) that the next block cannot start early enough to hide.
  constexpr int64_t kGroup = 16;
  BlockScale scale[kGroup];
  for (int64_t g0 = b0; g0 < b1; g0 += kGroup) {
    const int64_t g1 = std::min(b1, g0 + kGroup);
    for (int64_t b = g0; b < g1; ++b) {
      const int64_t start = b * bs, len = std::min(n, start + bs) - start;
      float m;
      bool bad;
      simd::absmax_scan_bits(a + start, len, m, bad);
      scale[b - g0] = make_block_scale(m, bad);
      absmax[b] = scale[b - g0].absmax;
    }
    for (int64_t b = g0; b < g1; ++b) {
      const int64_t start = b * bs, len = std::min(n, start + bs) - start;
      const T* x = a + start;
      uint8_t* out = packed + start / 2;  // start is even: bs is even
      const BlockScale& s = scale[b - g0];
      if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) {
        std::fill(out, out + (len + 1) / 2, uint8_t(cb.zero_code * 17));  // zero code, both nibbles
        continue;
      }
      const bool divide = s.mode == BlockMode::divide;
      const __m256 inv = _mm256_set1_ps(s.inv), am = _mm256_set1_ps(s.absmax);
      int64_t i = 0;
      for (; i + 32 <= len; i += 32) {
        __m256 xn[4];
        for (int u = 0; u < 4; ++u) {
          const __m256 v = simd::load8(x + i + 8 * u);
          xn[u] = divide ? _mm256_div_ps(v, am) : _mm256_mul_ps(v, inv);
        }
        encode32(bk, order, xn, out + i / 2);
      }
      // Tail (< 32 elements, i even): scalar, the odd last element paired with the zero code.
      for (; i < len; i += 2) {
        const int c0 = cb.order[bucket16(cb.bound, normalize(to_float(x[i]), s))];
        const int c1 = i + 1 < len ? cb.order[bucket16(cb.bound, normalize(to_float(x[i + 1]), s))]
                                   : cb.zero_code;
        out[i / 2] = uint8_t((c0 << 4) | c1);
      }
    }
  }
}

// ---- dequantize --------------------------------------------------------------------------------

// Scales: const float* (fp32 absmax) or BlockAbsmax (read once per block segment).
template <typename T, typename Scales>
void decode_range(const uint8_t* packed, const Scales& absmax, const float* code, int64_t bs,
                  int64_t e0, int64_t e1, T* dst) {
  const simd::Lut16 lut(code);
  int64_t e = e0;
  while (e < e1) {
    const int64_t b = e / bs;
    const int64_t seg_end = std::min(e1, (b + 1) * bs);
    const float s = absmax[b];
    if (e & 1) {  // odd start: one low nibble first
      *dst++ = from_float<T>(code[packed[e >> 1] & 0xF] * s);
      ++e;
    }
    const __m256 sv = _mm256_set1_ps(s);
    const uint8_t* p = packed + (e >> 1);
    const int64_t chunks = (seg_end - e) / 16;
    for (int64_t c = 0; c < chunks; ++c, p += 8, dst += 16) {
      __m256 lo, hi;
      decode16(lut, p, lo, hi);
      simd::store8(dst, _mm256_mul_ps(lo, sv));
      simd::store8(dst + 8, _mm256_mul_ps(hi, sv));
    }
    e += 16 * chunks;
    for (; e + 1 < seg_end; e += 2, ++p) {
      *dst++ = from_float<T>(code[*p >> 4] * s);
      *dst++ = from_float<T>(code[*p & 0xF] * s);
    }
    if (e < seg_end) {  // odd end: one high nibble
      *dst++ = from_float<T>(code[*p >> 4] * s);
      ++e;
    }
  }
}

// 16-bit outputs (bf16, fp16) through a per-block table: the block's 16 finished outputs,
// from_float<T>(code[i] * s) (the SIMD roundings match from_float), split into a low-byte and a
// high-byte table of 16 entries each, so that one pshufb per byte plane decodes 32 nibbles.
inline __m256i bits16_of8(__m256 v, bfloat16_t) { return simd::to_bf16_bits(v); }
inline __m256i bits16_of8(__m256 v, half_t) {
  return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

struct ByteTables {
  __m256i lo, hi;  // byte i (in both 128-bit lanes) = low / high byte of output value i
};

template <typename T>
inline ByteTables byte_tables(const __m256 code[2], float s) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i w0 = bits16_of8(_mm256_mul_ps(code[0], sv), T{});
  const __m256i w1 = bits16_of8(_mm256_mul_ps(code[1], sv), T{});
  // packus (values are 0..0xffff) interleaves halves: qwords [w0 0-3, w1 0-3, w0 4-7, w1 4-7];
  // the permute puts the 16 words in order.
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(w0, w1), 0xd8);
  // Per 128-bit lane: low bytes of its 8 words, then high bytes.
  const __m256i split = _mm256_shuffle_epi8(
      words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8,
                              10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  // qwords [lo 0-7, hi 0-7, lo 8-15, hi 8-15] -> [lo 0-15 | hi 0-15].
  const __m256i planes = _mm256_permute4x64_epi64(split, 0xd8);
  return {_mm256_permute2x128_si256(planes, planes, 0x00),
          _mm256_permute2x128_si256(planes, planes, 0x11)};
}

// 16 packed bytes (32 elements) -> 32 outputs at dst.
inline void decode32_bytes(const ByteTables& t, const uint8_t* p, uint16_t* dst) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib), lo = _mm_and_si128(b, nib);
  // Element 2j is byte j's high nibble: interleaving (hi, lo) gives the indices in order.
  const __m256i idx =
      _mm256_setr_m128i(_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo));  // 0-15 | 16-31
  const __m256i L = _mm256_shuffle_epi8(t.lo, idx), H = _mm256_shuffle_epi8(t.hi, idx);
  // Within each lane, (low, high) byte pairs: words [0-7 | 16-23] and [8-15 | 24-31].
  const __m256i w0 = _mm256_unpacklo_epi8(L, H), w1 = _mm256_unpackhi_epi8(L, H);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(w0, w1, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16),
                      _mm256_permute2x128_si256(w0, w1, 0x31));
}

// dst[e - e0] for e in [e0, e1), e0 even (a block start): one table per block segment.
template <typename T>
void decode_range16(const uint8_t* packed, const float* absmax, const float* code, int64_t bs,
                    int64_t e0, int64_t e1, T* dst) {
  const __m256 cv[2] = {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)};
  alignas(32) uint16_t vals[32];
  int64_t e = e0;
  while (e < e1) {
    const int64_t b = e / bs;
    const int64_t seg_end = std::min(e1, (b + 1) * bs);
    const ByteTables t = byte_tables<T>(cv, absmax[b]);
    const uint8_t* p = packed + (e >> 1);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (; e + 32 <= seg_end; e += 32, p += 16, d += 32) decode32_bytes(t, p, d);
    if (e < seg_end) {  // partial last chunk: decode a full one into scratch, copy what exists
      alignas(16) uint8_t tail[16] = {};
      const int64_t cnt = seg_end - e;
      std::copy(p, p + (cnt + 1) / 2, tail);
      decode32_bytes(t, tail, vals);
      std::copy(vals, vals + cnt, d);
      d += cnt;
      e = seg_end;
    }
    dst = reinterpret_cast<T*>(d);
  }
}

}  // namespace

void quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize, const Codebook16& cb,
                   uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_impl(static_cast<const T*>(a), n, blocksize, cb, packed, absmax, block_begin,
                  block_end);
  });
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16, int64_t n,
                     int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                     int64_t block_end) {
  const int64_t e0 = block_begin * blocksize, e1 = std::min(n, block_end * blocksize);
  if (e0 >= e1) return;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>)
      decode_range(packed, absmax, code16, blocksize, e0, e1, static_cast<T*>(out) + e0);
    else
      decode_range16(packed, absmax, code16, blocksize, e0, e1, static_cast<T*>(out) + e0);
  });
}

void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,
               const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,
               int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch) {
  if (M == 1 && gemv_fast_path_ok(K, blocksize)) {
    gemv_4bit_avx2(a, K, packed, scales, code16, blocksize, out, n_begin, n_end, row_scratch);
    return;
  }
  // General shapes: decode each weight row once, then one dot product per activation row.
  for (int64_t j = n_begin; j < n_end; ++j) {
    if (scales.nested())
      decode_range(packed, scales, code16, blocksize, j * K, (j + 1) * K, row_scratch);
    else
      decode_range(packed, scales.absmax, code16, blocksize, j * K, (j + 1) * K, row_scratch);
    for (int64_t m = 0; m < M; ++m) out[m * N + j] = simd::dot_f32(a + m * K, row_scratch, K);
  }
}

}  // namespace lowbit::cpu::avx2
