// 8-bit blockwise quantization, AVX2 (+FMA+F16C). Codes are bit-identical to the generic kernels.
//
// Quantizing needs #{bounds < x} over 255 sorted midpoints. A gather of 8 random dwords costs
// about as much as 12 cycles here (Zen 3), so the number of gathers per 8 elements sets the speed.
// Instead of an 8-step binary search (8 gathers), a table indexed by the top bits of x's fp32
// pattern narrows the answer: every such "cell" is an interval of reals, and for the cell of x
//     #{bounds < x} = lo[cell] + #{bounds inside the cell that are < x}
// where lo[cell] counts the bounds below the cell's smallest value.
//
// Fast table (one gather per 8 elements): cells are the top 16 bits (a bf16 pattern), 65536 of
// them. When no cell holds more than one bound (true for the dynamic map: its closest bounds are
// ~1.4% apart relatively, a bf16 cell is <= 0.8% wide), an entry packs lo (bits 16..23) with the
// low 16 bits of the cell's bound as an order key (bits 0..15; 0xffff when the cell has none).
// Within a cell the value order is the order of the low 16 bits, reversed for negative cells, so
// key(v) = (bits(v) ^ (sign ? 0xffff : 0)) & 0xffff and bound < x  <=>  key(bound) < key(x).
// (+-0.0: a bound of -0.0 sorts into cell 0x0000 with key 0, below every x there but +0.0; a
// bound of +0.0 into cell 0x8000 with key 0xffff, never below an x there: both exact.)
//
// Fallback table (codes with denser bounds): cells of the top 14 bits, lo[cell] plus C compares
// against bound[lo[cell] + j], C the most bounds any one cell holds; the bound list is padded
// with +Inf so the compares never read past it. Above 4 compares: binary search.
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>

#include "avx2_util.h"
#include "kernels.h"
#include "load_store.h"
#include "lowbit/codebook.h"

namespace lowbit::cpu::avx2 {

namespace {

constexpr int kCellShift = 18;                  // cell = fp32 bits >> 18
constexpr int kCells = 1 << (32 - kCellShift);  // 16384
constexpr int kMaxCompares = 4;                 // above this, binary search instead

struct BucketTable {
  float bound[255];                  // the midpoints the table was built for
  float padded[255 + kMaxCompares];  // the same, then +Inf
  int32_t lo[kCells];
  int compares;  // C; kMaxCompares + 1 when the table is not used
  bool valid = false;
};

// Built once per thread and per code: rebuilt only when the bounds change.
const BucketTable& bucket_table(const float* bound255) {
  static thread_local BucketTable t;
  if (t.valid && std::memcmp(t.bound, bound255, sizeof(t.bound)) == 0) return t;
  std::memcpy(t.bound, bound255, sizeof(t.bound));
  std::memcpy(t.padded, bound255, sizeof(t.bound));
  for (int j = 255; j < 255 + kMaxCompares; ++j) t.padded[j] = bits_float(0x7f800000u);
  int worst = 0;
  for (int c = 0; c < kCells; ++c) {
    const uint32_t first = uint32_t(c) << kCellShift, last = first | ((1u << kCellShift) - 1);
    // For negative floats a larger pattern is a smaller value.
    const bool neg = first & 0x80000000u;
    const float vmin = bits_float(neg ? last : first), vmax = bits_float(neg ? first : last);
    // NaN cells (never looked up: such blocks are special) compare false and get lo = hi.
    const int lo = bucket256(bound255, vmin);
    int hi = lo;
    while (hi < 255 && bound255[hi] <= vmax) ++hi;
    t.lo[c] = lo;
    worst = std::max(worst, hi - lo);
  }
  t.compares = worst;
  t.valid = true;
  return t;
}

struct Cell16Table {
  float bound[255];  // the midpoints the table was built for
  bool usable;       // no cell holds more than one bound
  uint32_t entry[65536];
};

// Built once per code and shared by all threads (256 KiB; the cells that normalised values reach,
// |x| <= 1, are a few KiB of it). The last kKeepTables codes' tables are kept, per thread and
// shared, so that callers alternating between codes (the 8-bit optimizers quantize their two
// states with two maps, on every thread) never rebuild one (~1 ms each); a new code replaces the
// oldest.
constexpr int kKeepTables = 4;
std::shared_ptr<const Cell16Table> cell16_table(const float* bound255) {
  static thread_local std::shared_ptr<const Cell16Table> mine[kKeepTables];
  static thread_local int mine_next = 0;
  for (const auto& t : mine)
    if (t && std::memcmp(t->bound, bound255, sizeof(t->bound)) == 0) return t;
  static std::mutex mu;
  static std::shared_ptr<const Cell16Table> shared[kKeepTables];
  static int shared_next = 0;
  std::shared_ptr<const Cell16Table> found;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& t : shared)
      if (t && std::memcmp(t->bound, bound255, sizeof(t->bound)) == 0) found = t;
    if (!found) {
      auto t = std::make_shared<Cell16Table>();
      std::memcpy(t->bound, bound255, sizeof(t->bound));
      t->usable = true;
      for (uint32_t c = 0; c < 65536; ++c) {
        const uint32_t first = c << 16, last = first | 0xffffu;
        const bool neg = c & 0x8000u;  // for negative floats a larger pattern is a smaller value
        const float vmin = bits_float(neg ? last : first), vmax = bits_float(neg ? first : last);
        // NaN cells (never looked up: such blocks are special) compare false: lo = hi = 0.
        const int lo = bucket256(bound255, vmin);
        int hi = lo;
        while (hi < 255 && bound255[hi] <= vmax) ++hi;
        if (hi - lo > 1) t->usable = false;
        const uint32_t key =
            hi > lo ? (float_bits(bound255[lo]) ^ (neg ? 0xffffu : 0u)) & 0xffffu : 0xffffu;
        t->entry[c] = uint32_t(lo) << 16 | key;
      }
      found = std::move(t);
      shared[shared_next] = found;
      shared_next = (shared_next + 1) % kKeepTables;
    }
  }
  mine[mine_next] = found;
  mine_next = (mine_next + 1) % kKeepTables;
  return found;
}

// Codes of 8 normalised values (finite) with the fast table: one gather.
inline __m256i bucket8_cell16(const Cell16Table& t, __m256 x) {
  const __m256i xb = _mm256_castps_si256(x);
  const __m256i e =
      simd::gather_epi32(reinterpret_cast<const int32_t*>(t.entry), _mm256_srli_epi32(xb, 16));
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  // key(x): the low 16 bits, complemented when x is negative (srai gives all ones then).
  const __m256i key = _mm256_and_si256(_mm256_xor_si256(xb, _mm256_srai_epi32(xb, 31)), low16);
  // -1 where key(bound) < key(x) (both 0..0xffff): subtracting it adds one to lo.
  const __m256i below = _mm256_cmpgt_epi32(key, _mm256_and_si256(e, low16));
  return _mm256_sub_epi32(_mm256_srli_epi32(e, 16), below);
}

// Codes of 8 normalised values (finite, |x| <= ~1) as int32 lanes; C = t.compares, a template
// argument so that the compares unroll.
template <int C>
inline __m256i bucket8(const BucketTable& t, __m256 x) {
  const __m256i cell = _mm256_srli_epi32(_mm256_castps_si256(x), kCellShift);
  const __m256i base = simd::gather_epi32(t.lo, cell);
  __m256i idx = base;
  for (int j = 0; j < C; ++j) {
    const __m256 b = simd::gather_ps(t.padded + j, base);
    // The compare mask is -1 where bound < x: subtracting it adds one.
    idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(b, x, _CMP_LT_OQ)));
  }
  return idx;
}

// Binary search over 255 bounds, 8 lanes at a time (codes whose cells hold many bounds).
inline __m256i bucket8_search(const float* bound255, __m256 x) {
  __m256i lo = _mm256_setzero_si256();
  for (int step = 128; step >= 1; step >>= 1) {
    const __m256 b = simd::gather_ps(bound255 + step - 1, lo);
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(b, x, _CMP_LT_OQ));
    lo = _mm256_add_epi32(lo, _mm256_and_si256(below, _mm256_set1_epi32(step)));
  }
  return lo;
}

// 16 int32 lanes (each 0..255, in two vectors) -> 16 bytes in element order.
inline void store_codes16(uint8_t* q, __m256i v0, __m256i v1) {
  // packus works within 128-bit halves: words [v0 0-3, v1 0-3 | v0 4-7, v1 4-7], then bytes
  // [v0 0-3, v1 0-3, [same] | v0 4-7, v1 4-7, [same]]: dwords 0, 4, 1, 5 are elements 0..15.
  const __m256i w = _mm256_packus_epi32(v0, v1);
  const __m256i b = _mm256_packus_epi16(w, w);
  const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm256_castsi256_si128(ordered));
}

// Quantizes blocks [b0, b1); Bucket(x) gives the codes of 8 normalised values.
template <typename T, typename Bucket>
void quantize_blocks(const T* a, int64_t n, int64_t bs, const float* bound255, uint8_t zero_code,
                     uint8_t* q, float* absmax, int64_t b0, int64_t b1, Bucket bucket) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = std::min(n, start + bs) - start;
    const T* x = a + start;
    uint8_t* qb = q + start;
    float m;
    bool bad;
    simd::absmax_scan_bits(x, len, m, bad);
    const BlockScale s = make_block_scale(m, bad);
    absmax[b] = s.absmax;
    if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) {
      std::memset(qb, zero_code, size_t(len));
      continue;
    }
    const bool divide = s.mode == BlockMode::divide;
    const __m256 inv = _mm256_set1_ps(s.inv), am = _mm256_set1_ps(s.absmax);
    auto norm = [&](__m256 v) { return divide ? _mm256_div_ps(v, am) : _mm256_mul_ps(v, inv); };
    int64_t i = 0;
    // 16 per step: two independent gather chains in flight.
    for (; i + 16 <= len; i += 16)
      store_codes16(qb + i, bucket(norm(simd::load8(x + i))), bucket(norm(simd::load8(x + i + 8))));
    for (; i < len; ++i) qb[i] = uint8_t(bucket256(bound255, normalize(to_float(x[i]), s)));
  }
}

template <typename T>
void quantize_impl(const T* a, int64_t n, int64_t bs, const float* bound255, uint8_t zero_code,
                   uint8_t* q, float* absmax, int64_t b0, int64_t b1) {
  auto run = [&](auto bucket) {
    quantize_blocks(a, n, bs, bound255, zero_code, q, absmax, b0, b1, bucket);
  };
  const std::shared_ptr<const Cell16Table> fast = cell16_table(bound255);
  if (fast->usable) return run([&](__m256 x) { return bucket8_cell16(*fast, x); });
  const BucketTable& t = bucket_table(bound255);
  switch (t.compares) {  // the dynamic map needs 2
    case 0:
      return run([&](__m256 x) { return bucket8<0>(t, x); });
    case 1:
      return run([&](__m256 x) { return bucket8<1>(t, x); });
    case 2:
      return run([&](__m256 x) { return bucket8<2>(t, x); });
    case 3:
      return run([&](__m256 x) { return bucket8<3>(t, x); });
    case 4:
      return run([&](__m256 x) { return bucket8<4>(t, x); });
    default:
      return run([&](__m256 x) { return bucket8_search(bound255, x); });
  }
}

// ---- dequantize --------------------------------------------------------------------------------

// The output bits of code[i] * s for all 256 codes, one int32 lane each (16-bit types in the low
// half): from_float<T>(code[i] * s), the SIMD stores round exactly as from_float does.
inline void scaled_table(const float* code, float s, float* tab) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int i = 0; i < 256; i += 8)
    _mm256_storeu_ps(tab + i, _mm256_mul_ps(_mm256_loadu_ps(code + i), sv));
}
// 16-bit outputs: the same 256 finished values as two byte planes (lo[i], hi[i] = low / high byte
// of value i), so that 16-entry pieces of them serve as pshufb tables.
inline __m256i bits16_of8(__m256 v, bfloat16_t) { return simd::to_bf16_bits(v); }
inline __m256i bits16_of8(__m256 v, half_t) {
  return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
template <typename T>
inline void scaled_planes(const float* code, float s, uint8_t* lo, uint8_t* hi) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2,
                                         4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int i = 0; i < 256; i += 16) {
    const __m256i w0 = bits16_of8(_mm256_mul_ps(_mm256_loadu_ps(code + i), sv), T{});
    const __m256i w1 = bits16_of8(_mm256_mul_ps(_mm256_loadu_ps(code + i + 8), sv), T{});
    // packus (lanes are 0..0xffff) gives qwords [w0 0-3, w1 0-3, w0 4-7, w1 4-7]; 0xd8 orders
    // them. Then per 128-bit lane: low bytes of its 8 words, high bytes; 0xd8 again gathers the
    // low bytes of all 16 words in the low half and the high bytes in the high half.
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(w0, w1), 0xd8);
    const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(words, split), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i), _mm256_castsi256_si128(planes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + i), _mm256_extracti128_si256(planes, 1));
  }
}

// 32 codes -> one byte plane of their values. pshufb reads bits 0..3 of an index and zeroes the
// byte when bit 7 is set, so piece k (plane[16k .. 16k + 15]) looked up with the code itself
// gives value bytes for codes < 128 and zeros above, and piece k + 8 looked up with code ^ 0x80
// the reverse: OR-ing the two answers for codes whose bits 4..6 equal k. A tree of 7 byte blends
// then picks by bits 4, 5, 6, each moved to bit 7 (what pblendvb reads) by a 16-bit shift (bits
// shifted in from the neighbouring byte land below bit 7 and are ignored). 16 pshufb, 8 OR and 7
// blends per 32 bytes: the shuffles, on two ports, bound it.
inline __m256i piece(const uint8_t* plane, int k) {
  return _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(plane + 16 * k)));
}
inline __m256i plane_lookup32(const uint8_t* plane, __m256i c, __m256i c_flip,
                              const __m256i sel[3]) {
  __m256i r[8];
  for (int k = 0; k < 8; ++k)
    r[k] = _mm256_or_si256(_mm256_shuffle_epi8(piece(plane, k), c),
                           _mm256_shuffle_epi8(piece(plane, k + 8), c_flip));
  for (int level = 0, width = 8; width > 1; ++level, width /= 2)
    for (int j = 0; j < width / 2; ++j)
      r[j] = _mm256_blendv_epi8(r[2 * j], r[2 * j + 1], sel[level]);
  return r[0];
}

// 32 codes at q -> 32 16-bit outputs at dst.
inline void decode32_planes(const uint8_t* lo, const uint8_t* hi, const uint8_t* q, uint16_t* dst) {
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i c_flip = _mm256_xor_si256(c, _mm256_set1_epi8(char(0x80)));
  const __m256i sel[3] = {_mm256_slli_epi16(c, 3), _mm256_slli_epi16(c, 2),
                          _mm256_slli_epi16(c, 1)};
  const __m256i L = plane_lookup32(lo, c, c_flip, sel), H = plane_lookup32(hi, c, c_flip, sel);
  // Within each 128-bit lane, (low, high) byte pairs: words [0-7 | 16-23] and [8-15 | 24-31].
  const __m256i w0 = _mm256_unpacklo_epi8(L, H), w1 = _mm256_unpackhi_epi8(L, H);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(w0, w1, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16),
                      _mm256_permute2x128_si256(w0, w1, 0x31));
}

// 16 codes -> their two index vectors (elements 0..7 and 8..15).
inline void load_idx16(const uint8_t* q, __m256i& i0, __m256i& i1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  i0 = _mm256_cvtepu8_epi32(b);
  i1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b));
}

// Blocks of at least this many elements dequantize through a per-block table of finished output
// values (256 multiplies and roundings per block), with no per-element arithmetic: fp32 outputs
// gather from it (one gather per 8), 16-bit ones look its byte planes up with pshufb (a gather of
// 8 random dwords costs ~12 cycles here; the 62 shuffles and blends per 32 outputs cost less).
constexpr int64_t kTableMinBlock = 1024;

template <typename T>
void dequantize_impl(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                     int64_t bs, T* out, int64_t b0, int64_t b1) {
  alignas(32) float ftab[256];
  alignas(32) uint8_t plo[256], phi[256];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, len = std::min(n, start + bs) - start;
    const float s = absmax[b];
    const uint8_t* qb = q + start;
    T* ob = out + start;
    int64_t i = 0;
    if (len >= kTableMinBlock) {
      if constexpr (std::is_same_v<T, float>) {
        scaled_table(code, s, ftab);
        for (; i + 16 <= len; i += 16) {
          __m256i i0, i1;
          load_idx16(qb + i, i0, i1);
          _mm256_storeu_ps(ob + i, simd::gather_ps(ftab, i0));
          _mm256_storeu_ps(ob + i + 8, simd::gather_ps(ftab, i1));
        }
      } else {
        scaled_planes<T>(code, s, plo, phi);
        uint16_t* d = reinterpret_cast<uint16_t*>(ob);
        for (; i + 32 <= len; i += 32) decode32_planes(plo, phi, qb + i, d + i);
      }
    } else {
      const __m256 sv = _mm256_set1_ps(s);
      for (; i + 8 <= len; i += 8) {
        const __m256i idx =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + i)));
        simd::store8(ob + i, _mm256_mul_ps(simd::gather_ps(code, idx), sv));
      }
    }
    for (; i < len; ++i) ob[i] = from_float<T>(code[qb[i]] * s);
  }
}

}  // namespace

void quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                        const float* bound255, uint8_t zero_code, uint8_t* q, float* absmax,
                        int64_t block_begin, int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_impl(static_cast<const T*>(a), n, blocksize, bound255, zero_code, q, absmax,
                  block_begin, block_end);
  });
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256, int64_t n,
                          int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                          int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    dequantize_impl(q, absmax, code256, n, blocksize, static_cast<T*>(out), block_begin, block_end);
  });
}

}  // namespace lowbit::cpu::avx2
