// The per-ISA kernel sets behind the public entry points of lowbit/cpu_kernels.h. Each namespace
// (generic, avx2, avx512) declares the kernels it implements with the public signatures;
// dispatch.cpp picks one set per call from active_isa(). avx512 implements only the kernels where
// 512-bit registers or VNNI pay off and forwards the rest to avx2.
#pragma once

#include "lowbit/cpu_kernels.h"

// The full kernel list, declared once per namespace.
#define LOWBIT_CPU_KERNEL_DECLS                                                                    \
  void quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,                \
                          const float* bound255, uint8_t zero_code, uint8_t* q, float* absmax,     \
                          int64_t block_begin, int64_t block_end);                                 \
  void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256,           \
                            int64_t n, int64_t blocksize, FloatType t, void* out,                  \
                            int64_t block_begin, int64_t block_end);                               \
  void quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize,                     \
                     const Codebook16& cb, uint8_t* packed, float* absmax, int64_t block_begin,    \
                     int64_t block_end);                                                           \
  void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16, int64_t n, \
                       int64_t blocksize, FloatType t, void* out, int64_t block_begin,             \
                       int64_t block_end);                                                         \
  void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,                      \
                 const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,    \
                 int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch);                   \
  void int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,  \
                            uint8_t* mask, int64_t c_begin, int64_t c_end);                        \
  void int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold, \
                             const int64_t* zero_cols, int64_t n_zero_cols, int8_t* q,             \
                             float* row_stats, int64_t r_begin, int64_t r_end);                    \
  void int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t K, float* out,         \
                               int64_t r_begin, int64_t r_end);                                    \
  void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,    \
                 int64_t n_begin, int64_t n_end);                                                  \
  void int8_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats,           \
                       FloatType bias_t, const void* bias, int64_t N, FloatType out_t, void* out,  \
                       int64_t r_begin, int64_t r_end);

namespace lowbit::cpu {

namespace generic {
LOWBIT_CPU_KERNEL_DECLS
}  // namespace generic

#if defined(LOWBIT_CPU_X86)
namespace avx2 {
LOWBIT_CPU_KERNEL_DECLS
// Only SIMD versions exist: the int8-activation product is a speed path, never the only one.
bool quantize_activations_q8(const float* a, int64_t K, int8_t* q, float* scales, float* offsets,
                             int64_t r_begin, int64_t r_end);
void gemm_4bit_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                  int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
                  const Q8Codebook& code, int64_t blocksize, float* out, int64_t N, int64_t n_begin,
                  int64_t n_end);
}  // namespace avx2

namespace avx512 {
void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,
               const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,
               int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch);
// M >= packed_min_m: the packed outer-product kernel; smaller M: the dot-product kernel.
void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end);
}  // namespace avx512
#endif

}  // namespace lowbit::cpu

#if defined(LOWBIT_CPU_X86)
// Test and benchmark hook (Python's ctypes, tests/test_ops_int8.py): sets the smallest M at which
// the AVX-512 int8 GEMM takes its packed kernel (1: always; a huge value: never) when m >= 0 and
// returns the previous value; m < 0 only returns the current one. Process-wide; not for
// production use.
extern "C" __attribute__((visibility("default"))) int64_t
lowbit_cpu_int8_gemm_packed_min_m(int64_t m);
#endif
