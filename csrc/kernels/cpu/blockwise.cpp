// 8-bit blockwise quantization over a sorted 256-entry code (the dynamic map by default).
#include <algorithm>

#include "kernels.h"
#include "load_store.h"
#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"

namespace lowbit::cpu::generic {

namespace {

template <typename T>
void quantize_blockwise_impl(const T* a, int64_t n, int64_t bs, const float* bound255,
                             uint8_t zero_code, uint8_t* q, float* absmax, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, end = std::min(n, start + bs);
    float m = 0.0f;
    bool bad = false;
    for (int64_t i = start; i < end; ++i) absmax_fold(to_float(a[i]), m, bad);
    const BlockScale s = make_block_scale(m, bad);
    absmax[b] = s.absmax;
    if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) {
      std::fill(q + start, q + end, zero_code);
      continue;
    }
    for (int64_t i = start; i < end; ++i)
      q[i] = uint8_t(bucket256(bound255, normalize(to_float(a[i]), s)));
  }
}

template <typename T>
void dequantize_blockwise_impl(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                               int64_t bs, T* out, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs, end = std::min(n, start + bs);
    const float s = absmax[b];
    for (int64_t i = start; i < end; ++i) out[i] = from_float<T>(code[q[i]] * s);
  }
}

}  // namespace

void quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                        const float* bound255, uint8_t zero_code, uint8_t* q, float* absmax,
                        int64_t block_begin, int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_blockwise_impl(static_cast<const T*>(a), n, blocksize, bound255, zero_code, q, absmax,
                            block_begin, block_end);
  });
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256, int64_t n,
                          int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                          int64_t block_end) {
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    dequantize_blockwise_impl(q, absmax, code256, n, blocksize, static_cast<T*>(out), block_begin,
                              block_end);
  });
}

}  // namespace lowbit::cpu::generic
