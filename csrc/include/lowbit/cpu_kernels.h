// Torch-free CPU kernels. Every kernel works on a sub-range [begin, end) of independent work items
// (blocks, rows or output features) so that the ATen wrappers in csrc/ops can spread the range
// over torch's thread pool with at::parallel_for; kernels themselves never spawn threads.
//
// Float tensors are passed as (FloatType, pointer); all arithmetic is fp32.
#pragma once

#include <cstdint>

#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/numeric.h"

namespace lowbit::cpu {

// ---- 8-bit blockwise (csrc/kernels/cpu/blockwise.cpp) ----------------------------------------
// Blocks run over the flattened tensor of n elements; block b covers [b*bs, min(n, (b+1)*bs)).
// bound255: the 255 midpoints of the sorted 256-entry code (see codebook.h); zero_code: the code
// nearest 0.
void quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                        const float* bound255, uint8_t zero_code, uint8_t* q, float* absmax,
                        int64_t block_begin, int64_t block_end);
// out[i] = code[q[i]] * absmax[i / bs], rounded once to the output type.
void dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256, int64_t n,
                          int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                          int64_t block_end);

// ---- 4-bit (csrc/kernels/cpu/fourbit.cpp) ----------------------------------------------------
// Packing: element 2j in the HIGH nibble of byte j, element 2j+1 in the low nibble; an odd n
// leaves the last low nibble 0. Block sizes are even, so a block never splits a byte.
void quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize, const Codebook16& cb,
                   uint8_t* packed, float* absmax, int64_t block_begin, int64_t block_end);
void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* code16, int64_t n,
                     int64_t blocksize, FloatType t, void* out, int64_t block_begin,
                     int64_t block_end);
// out[m, j] = sum_k a[m, k] * W[j, k] for output features j in [n_begin, n_end), where W [N, K] is
// 4-bit packed over its flattened index j*K + k with blocks of `blocksize` on that index. Each W
// row is decoded once into `row_scratch` (K floats, owned by the calling thread) and reused for
// all M activation rows. a is fp32 [M, K]; out is fp32 [M, N]. scales: the per-block scale, fp32
// or double quantized (decoded per block inside the kernel, see blockscale.h).
void gemm_4bit(const float* a, int64_t M, int64_t K, const uint8_t* packed,
               const BlockAbsmax& scales, const float* code16, int64_t blocksize, float* out,
               int64_t N, int64_t n_begin, int64_t n_end, float* row_scratch);

// ---- LLM.int8() (csrc/kernels/cpu/int8.cpp) --------------------------------------------------
// Columns [c_begin, c_end) of a [rows, K]: mask[c] = 1 if any |a[r, c]| >= threshold.
void int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                          uint8_t* mask, int64_t c_begin, int64_t c_end);
// Rows [r_begin, r_end): row_stats[r] = max |a[r, c]| over elements with |a| < threshold (every
// element when threshold == 0); q = round-half-even(a * (127 / row_stats)), 0 for elements at or
// above the threshold and in columns flagged in col_mask (may be null). A row holding NaN/Inf
// below the threshold gets row_stats NaN and zero codes; an all-zero row gets 0 and zero codes.
void int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                           const uint8_t* col_mask, int8_t* q, float* row_stats, int64_t r_begin,
                           int64_t r_end);
// out[r, c] = q[r, c] * stats[r] / 127 in fp32.
void int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t K, float* out,
                             int64_t r_begin, int64_t r_end);
// C[m, n] = sum_k A[m, k] * B[n, k] (A [M, K], B [N, K], int32 accumulation) for n in
// [n_begin, n_end). |C| <= K * 127 * 127 (the wrapper bounds K) so int32 never overflows.
void int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
               int64_t n_begin, int64_t n_end);
// out[m, n] = float(C[m, n]) * (row[m] * col[n]) * (1 / 16129) + bias[n], rows [r_begin, r_end).
// bias may be null.
void int8_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats,
                     FloatType bias_t, const void* bias, int64_t N, FloatType out_t, void* out,
                     int64_t r_begin, int64_t r_end);

}  // namespace lowbit::cpu
