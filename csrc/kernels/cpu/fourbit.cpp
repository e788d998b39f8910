// 4-bit quantization over a 16-entry codebook (NF4, FP4 or any other) with one fp32 scale per
// block, and the fused dequantize + product used for small batches.
#include <algorithm>

#include "kernels.h"
#include "load_store.h"
#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"

namespace lowbit::cpu::generic {

namespace {

// Nibble of flat element e: even elements sit in the high nibble of byte e / 2.
inline int nibble(const uint8_t* packed, int64_t e) {
  return (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF;
}

// dst[e - e0] = code[nibble(e)] * absmax[e / bs] for e in [e0, e1): walked one block segment at a
// time so the scale is loaded (or, double quantized, decoded) once per segment and the inner loops
// have no division. Scales: const float* (fp32 absmax) or BlockAbsmax.
template <typename T, typename Scales>
void decode_range(const uint8_t* packed, const Scales& absmax, const float* code, int64_t bs,
                  int64_t e0, int64_t e1, T* dst) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t b = e / bs;
    const int64_t seg_end = std::min(e1, (b + 1) * bs);
    const float s = absmax[b];
    if (e & 1) {  // odd start: one low nibble first
      *dst++ = from_float<T>(code[packed[e >> 1] & 0xF] * s);
      ++e;
    }
    const int64_t pairs = (seg_end - e) >> 1;
    const uint8_t* p = packed + (e >> 1);
    for (int64_t j = 0; j < pairs; ++j) {
      dst[2 * j] = from_float<T>(code[p[j] >> 4] * s);
      dst[2 * j + 1] = from_float<T>(code[p[j] & 0xF] * s);
    }
    dst += 2 * pairs;
    e += 2 * pairs;
    if (e < seg_end) {  // odd end: one high nibble
      *dst++ = from_float<T>(code[nibble(packed, e)] * s);
      ++e;
    }
  }
}

template <typename T>
void quantize_4bit_impl(const T* a, int64_t n, int64_t bs, const Codebook16& cb, uint8_t* packed,
                        float* absmax, int64_t b0, int64_t b1) {
  // Codes for one block, then packed two by two. bs <= 4096 (checked by the wrapper).
  uint8_t codes[4096];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, end = std::min(n, start + bs), len = end - start;
    float m = 0.0f;
    bool bad = false;
    for (int64_t i = 0; i < len; ++i) absmax_fold(to_float(a[start + i]), m, bad);
    const BlockScale s = make_block_scale(m, bad);
    absmax[b] = s.absmax;
    if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) {
      std::fill(codes, codes + len, cb.zero_code);
    } else {
      for (int64_t i = 0; i < len; ++i)
        codes[i] = cb.order[bucket16(cb.bound, normalize(to_float(a[start + i]), s))];
    }
    // An odd tail is padded with the code of 0.0, as bitsandbytes pads with a zero element.
    if (len & 1) codes[len] = cb.zero_code;
    uint8_t* out = packed + start / 2;  // start is even: bs is even
    for (int64_t j = 0; j < (len + 1) / 2; ++j)
      out[j] = uint8_t((codes[2 * j] << 4) | codes[2 * j + 1]);
  }
}

}  // namespace

void quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize, const Codebook16& cb,
                   uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_4bit_impl(static_cast<const T*>(a), n, blocksize, cb, packed, absmax, block_begin,
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
    decode_range(packed, absmax, code16, blocksize, e0, e1, static_cast<T*>(out) + e0);
  });
}

void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,
               const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,
               int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch) {
  for (int64_t j = n_begin; j < n_end; ++j) {
    if (scales.nested())
      decode_range(packed, scales, code16, blocksize, j * K, (j + 1) * K, row_scratch);
    else
      decode_range(packed, scales.absmax, code16, blocksize, j * K, (j + 1) * K, row_scratch);
    for (int64_t m = 0; m < M; ++m) out[m * N + j] = dot_f32(a + m * K, row_scratch, K);
  }
}

}  // namespace lowbit::cpu::generic
