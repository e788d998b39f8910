// The CPU 4-bit product behind gemv_4bit (any M); see cpu_gemm4.cpp for how it picks a kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "lowbit/blockscale.h"
#include "lowbit/cpu_kernels.h"

namespace lowbit::ops {

// out [M, N] (fp32, contiguous) = a [M, K] (any float dtype and strides) @ W^T, W [N, K] 4-bit
// packed with per-block scales `scales` (fp32 or double quantized) and the 16-entry code table
// code16. fp32 accumulation; bf16 activations may be multiplied by a bf16 BLAS (see .cpp).
void cpu_gemm_4bit(const at::Tensor& a, const uint8_t* packed, const BlockAbsmax& scales,
                   const float* code16, int64_t blocksize, at::Tensor& out);

// The same tiers for an affine 4/8-bit weight (w = (q - zero) * scale per group): out [M, N] fp32
// = a [M, K] @ W^T, a as above.
void cpu_gemm_affine(const at::Tensor& a, const cpu::AffineWeight& w, at::Tensor& out);

}  // namespace lowbit::ops
