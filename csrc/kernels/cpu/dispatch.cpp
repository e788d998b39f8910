// The public kernel entry points (lowbit/cpu_kernels.h): each forwards to the kernel set of the
// active ISA (lowbit/cpu_isa.h). The ISA is fixed at the first call, so the switch is a
// well-predicted branch on a constant.
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "lowbit/cpu_isa.h"

namespace lowbit::cpu {

#if defined(LOWBIT_CPU_X86)
// Calls NS::NAME(args) for the active ISA; avx512 falls back to avx2 for kernels it lacks.
#define LOWBIT_DISPATCH(NAME, ...)       \
  switch (active_isa()) {                \
    case Isa::avx512:                    \
    case Isa::avx2:                      \
      return avx2::NAME(__VA_ARGS__);    \
    default:                             \
      return generic::NAME(__VA_ARGS__); \
  }
#define LOWBIT_DISPATCH_512(NAME, ...)   \
  switch (active_isa()) {                \
    case Isa::avx512:                    \
      return avx512::NAME(__VA_ARGS__);  \
    case Isa::avx2:                      \
      return avx2::NAME(__VA_ARGS__);    \
    default:                             \
      return generic::NAME(__VA_ARGS__); \
  }
#else
#define LOWBIT_DISPATCH(NAME, ...) return generic::NAME(__VA_ARGS__);
#define LOWBIT_DISPATCH_512(NAME, ...) return generic::NAME(__VA_ARGS__);
#endif

void quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                        const float* bound255, uint8_t zero_code, uint8_t* q, float* absmax,
                        int64_t block_begin, int64_t block_end) {
  LOWBIT_DISPATCH(quantize_blockwise, t, a, n, blocksize, bound255, zero_code, q, absmax,
                  block_begin, block_end)
}

void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256, int64_t n,
                          int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                          int64_t block_end) {
  LOWBIT_DISPATCH(dequantize_blockwise, q, absmax, code256, n, blocksize, t, out, block_begin,
                  block_end)
}

void quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize, const Codebook16& cb,
                   uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end) {
  LOWBIT_DISPATCH(quantize_4bit, t, a, n, blocksize, cb, packed, absmax, block_begin, block_end)
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16, int64_t n,
                     int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                     int64_t block_end) {
  LOWBIT_DISPATCH(dequantize_4bit, packed, absmax, code16, n, blocksize, t, out, block_begin,
                  block_end)
}

void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,
               const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,
               int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch){
    LOWBIT_DISPATCH_512(gemm_4bit, a, M, K, packed, scales, code16, blocksize, out, N, n_begin,
                        n_end, row_scratch)}

Q8Codebook make_q8_codebook(const float* code16) {
  Q8Codebook cb{};
  float cmax = 0.0f;
  bool finite = true;
  for (int i = 0; i < 16; ++i) {
    finite = finite && std::isfinite(code16[i]);
    cmax = std::max(cmax, std::fabs(code16[i]));
  }
  const float inv = float(kQ8WeightOffset) / cmax;
  // A NaN/Inf entry, an all-zero code, or one so small that 64 / cmax overflows: the fp32 kernels.
  cb.ok = finite && cmax > 0.0f && std::isfinite(inv);
  if (!cb.ok) return cb;
  // Round to nearest (even), then make the rounding unbiased: the 16 codes are equally likely by
  // design (NF4's quantiles), and a grid error whose mean is not zero adds up coherently over K
  // whenever the activations have a nonzero mean (ReLU/GELU outputs): on NF4 plain rounding errs
  // by -0.06 grid steps per code on average, which tripled the path's error for randn + 1
  // activations. While the summed error exceeds half a step, the code rounded farthest in its
  // direction is rounded the other way (lowest index on ties); every code stays within one step of
  // its value, so in [-64, 64]. reference.q8_weight_codes does the same in the same order.
  double err[16], total = 0.0;
  int q[16];
  for (int i = 0; i < 16; ++i) {
    const float v = code16[i] * inv;  // |v| <= 64 (+ulps)
    q[i] = int(std::nearbyint(v));
    err[i] = double(q[i]) - double(v);
    total += err[i];
  }
  while (std::fabs(total) > 0.5) {
    const int sign = total > 0 ? 1 : -1;
    int pick = -1;
    for (int i = 0; i < 16; ++i)
      if (err[i] * sign > 0 && (pick < 0 || std::fabs(err[i]) > std::fabs(err[pick]))) pick = i;
    q[pick] -= sign;
    err[pick] -= sign;
    total -= sign;
  }
  for (int i = 0; i < 16; ++i) cb.code_u8[i] = uint8_t(q[i] + kQ8WeightOffset);
  cb.scale = cmax / float(kQ8WeightOffset);
  return cb;
}

bool gemm_4bit_q8_supported(int64_t K, int64_t blocksize) {
  return K > 0 && K % kQ8Chunk == 0 && blocksize >= 32 && (blocksize & (blocksize - 1)) == 0;
}

bool quantize_activations_q8(const float* a, int64_t K, int8_t* q, float* scales, float* offsets,
                             int64_t r_begin, int64_t r_end) {
#if defined(LOWBIT_CPU_X86)
  if (active_isa() != Isa::generic)
    return avx2::quantize_activations_q8(a, K, q, scales, offsets, r_begin, r_end);
#endif
  (void)a, (void)K, (void)q, (void)scales, (void)offsets, (void)r_begin, (void)r_end;
  return false;  // no int8 kernels for this ISA: the caller takes the fp32 ones
}

void gemm_4bit_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                  int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
                  const Q8Codebook& code, int64_t blocksize, float* out, int64_t N, int64_t n_begin,
                  int64_t n_end) {
#if defined(LOWBIT_CPU_X86)
  avx2::gemm_4bit_q8(q, q_scales, offsets, M, K, packed, scales, code, blocksize, out, N, n_begin,
                     n_end);
#else
  // Unreachable: quantize_activations_q8 returned false, so no caller gets here.
  (void)q, (void)q_scales, (void)offsets, (void)M, (void)K, (void)packed, (void)scales;
  (void)code, (void)blocksize, (void)out, (void)N, (void)n_begin, (void)n_end;
#endif
}

void int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                          uint8_t* mask, int64_t c_begin, int64_t c_end) {
  LOWBIT_DISPATCH(int8_outlier_columns, t, a, rows, K, threshold, mask, c_begin, c_end)
}

void int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                           const int64_t* zero_cols, int64_t n_zero_cols, int8_t* q,
                           float* row_stats, int64_t r_begin, int64_t r_end) {
  LOWBIT_DISPATCH(int8_vectorwise_quant, t, a, rows, K, threshold, zero_cols, n_zero_cols, q,
                  row_stats, r_begin, r_end)
}

void int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t K, float* out,
                             int64_t r_begin, int64_t r_end) {
  LOWBIT_DISPATCH(int8_vectorwise_dequant, q, stats, K, out, r_begin, r_end)
}

void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end) {
  LOWBIT_DISPATCH_512(int8_gemm, A, B, C, M, N, K, n_begin, n_end)
}

void int8_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats,
                     FloatType bias_t, const void* bias, int64_t N, FloatType out_t, void* out,
                     int64_t r_begin, int64_t r_end) {
  LOWBIT_DISPATCH(int8_mm_dequant, C, row_stats, col_stats, bias_t, bias, N, out_t, out, r_begin,
                  r_end)
}

}  // namespace lowbit::cpu
