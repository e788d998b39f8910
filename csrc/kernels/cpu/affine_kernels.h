// The per-ISA affine 4/8-bit kernels behind the entry points of lowbit/cpu_kernels.h (affine
// section); affine.cpp holds the generic set and picks one per call from active_isa().
#pragma once

#include "lowbit/cpu_kernels.h"

#define LOWBIT_CPU_AFFINE_DECLS                                                             \
  void dequantize_affine(const AffineWeight& w, FloatType t, void* out, int64_t g_begin,    \
                         int64_t g_end);                                                    \
  void gemm_affine(const float* a, int64_t M, int64_t K, const AffineWeight& w, float* out, \
                   int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch);

namespace lowbit::cpu {

namespace generic {
LOWBIT_CPU_AFFINE_DECLS
}  // namespace generic

#if defined(LOWBIT_CPU_X86)
namespace avx2 {
LOWBIT_CPU_AFFINE_DECLS
void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                    int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                    int64_t n_end);
}  // namespace avx2

namespace avx512 {
// VNNI (vpdpbusd): a block of two chunks per 512-bit step.
void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                    int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                    int64_t n_end);
}  // namespace avx512
#endif

}  // namespace lowbit::cpu
