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

// ---- 4-bit products with int8 activations (csrc/kernels/cpu/avx2_gemm4_q8.cpp) ---------------
// The fast small-M product of x86 CPUs with AVX2 (what llama.cpp does for Q4 x Q8): activations
// are quantized to int8 per 64-element chunk of each row, the 16 code values to integers in
// [-64, 64], and the dot products run on integer multiply-adds (vpmaddubsw) instead of fp32 FMAs:
// 2 shuffles instead of 24 per 64 weights, so the product runs at memory speed. The extra error
// (code values rounded to 1/128 of their range with the rounding made unbiased, activations to
// 1/254 of their chunk's absmax) is 13-15% of NF4's own rms error for Gaussian, ReLU, SiLU and
// mean-shifted activations (21% with 1% of activation columns 20x larger), i.e. +1-2% total error;
// LOWBIT_CPU_GEMV=fp32 turns it off (see lowbit/cpu_isa.h). reference.gemv_4bit_q8 is the
// pure-torch model of these numerics.
constexpr int64_t kQ8Chunk = 64;
// The weight codes enter vpmaddubsw as unsigned bytes u = code + kQ8WeightOffset in [0, 128].
constexpr int32_t kQ8WeightOffset = 64;

// The 16 code values as integers: code_u8[i] = q[i] + 64, q[i] = rne(code[i] * (64 / cmax)) with
// cmax = max |code[i]|, then made unbiased (see make_q8_codebook); the product is rescaled by
// `scale` = cmax / 64. ok = false for a NaN/Inf entry, an all-zero code, or 64 / cmax = Inf.
struct Q8Codebook {
  uint8_t code_u8[16];
  float scale;
  bool ok;
};
Q8Codebook make_q8_codebook(const float* code16);

// Rows [r_begin, r_end) of a [M, K] (fp32, K % 64 == 0) to int8 codes q [M, K], per-chunk scales
// [M, K / 64] and offset sums [M, 3, K / 64]. Chunk c of row m (elements x = a[m, 64c ..
// 64c + 63]): amax = max |x|, scale = amax / 127, code = rne(x * (127 / amax)) (all codes and the
// scale 0 when amax == 0). The codes are stored in two planes that match the nibble planes of a
// packed weight byte run:
//     q[m*K + 64c + j] = code of x[2j],  q[m*K + 64c + 32 + j] = code of x[2j + 1]  (j < 32).
// offsets[m][h][c] = scale * (64 * sum of the codes of: h = 0 the chunk, h = 1 its elements
// 0..31, h = 2 its elements 32..63): what the weight offset adds to the integer sums, subtracted
// once per output.
// Returns false if a row holds NaN or +-Inf, or a chunk whose nonzero absmax is below 2^-100
// (127 / amax would overflow or lose the chunk): the caller then takes the fp32 kernels, which
// give NaN/Inf and tiny values their exact meaning.
bool quantize_activations_q8(const float* a, int64_t K, int8_t* q, float* scales, float* offsets,
                             int64_t r_begin, int64_t r_end);

// Shapes the int8-activation product handles: K % 64 == 0 and a power-of-two block size >= 32 (each
// 64-element chunk then lies in one block, or exactly two when blocksize == 32).
bool gemm_4bit_q8_supported(int64_t K, int64_t blocksize);

// out[m, j] = sum_k x[m, k] * W[j, k] for j in [n_begin, n_end), with x given as
// quantize_activations_q8's outputs; out is fp32 [M, N].
void gemm_4bit_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                  int64_t K, const uint8_t* packed, const BlockAbsmax& scales,
                  const Q8Codebook& code, int64_t blocksize, float* out, int64_t N, int64_t n_begin,
                  int64_t n_end);

// ---- LLM.int8() (csrc/kernels/cpu/int8.cpp) --------------------------------------------------
// Columns [c_begin, c_end) of a [rows, K]: mask[c] = 1 if any |a[r, c]| >= threshold.
void int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                          uint8_t* mask, int64_t c_begin, int64_t c_end);
// Rows [r_begin, r_end): row_stats[r] = max |a[r, c]| over elements with |a| < threshold (every
// element when threshold == 0); q = round-half-even(a * (127 / row_stats)), 0 for elements at or
// above the threshold and in the n_zero_cols columns zero_cols (the outlier columns of the other
// rows; a list, not a mask: they are few, and a scan of a K-byte mask per row cost more than the
// quantization). A row holding NaN/Inf
// below the threshold gets row_stats NaN and zero codes; an all-zero row gets 0 and zero codes.
void int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                           const int64_t* zero_cols, int64_t n_zero_cols, int8_t* q,
                           float* row_stats, int64_t r_begin, int64_t r_end);
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

// ---- affine 4/8-bit (csrc/kernels/cpu/affine.cpp, avx2_affine.cpp), issue #13 -----------------
// A weight W [N, K] of unsigned codes q (bits 4: packed as NF4 above, element 2j in the high
// nibble of byte j of the flat index; bits 8: one byte each) with an fp32 scale and zero per group
// of group_size consecutive flat elements (group_size divides K, so groups never cross rows):
//     w = (float(q) - zero[g]) * scale[g]   in fp32, in this order (no FMA), one rounding after.
// The codebook kernels above decode code[q] * absmax; the affine map is the other way of decoding
// the same 4-bit code (DESIGN.md), and the kernels below share their packing, their activation
// quantizer and their dispatch tiers (csrc/ops/cpu_gemm4.cpp).
struct AffineWeight {
  const uint8_t* packed;
  const float* scales;  // [N * K / group_size]
  const float* zeros;   // [N * K / group_size]
  int bits;             // 4 or 8
  int64_t group_size;
};

// Groups [g_begin, g_end) of the flat tensor a (group_size elements each): the round-to-nearest
// min/max quantizer of lowbit.reference.quantize_affine (asymmetric: range [min(x, 0), max(x, 0)],
// zero = clamp(rne(-lo / scale), 0, qmax); symmetric: range [-max|x|, max|x|], zero 2^(bits-1);
// q = clamp(rne(x / scale) + zero, 0, qmax); NaN/Inf groups store scale NaN, zero-range groups
// scale 0, both with every code = zero). 4-bit codes are OR-ed into a zero-filled `packed`; with an
// odd group_size two groups share a byte, so the caller must not split such groups over threads.
void quantize_affine(FloatType t, const void* a, int64_t group_size, int bits, bool symmetric,
                     uint8_t* packed, float* scales, float* zeros, int64_t g_begin, int64_t g_end);
// out[e] = (float(q[e]) - zero[g]) * scale[g] for the elements e of groups [g_begin, g_end),
// rounded once to the output type (bit-identical on every ISA).
void dequantize_affine(const AffineWeight& w, FloatType t, void* out, int64_t g_begin,
                       int64_t g_end);
// out[m, j] = sum_k a[m, k] * W[j, k] for j in [n_begin, n_end): each W row is decoded once (as
// dequantize_affine does, into row_scratch: K floats owned by the calling thread) and reused for
// all M activation rows; a fp32 [M, K], out fp32 [M, N]. Exact up to the order of the fp32 sums.
void gemm_affine(const float* a, int64_t M, int64_t K, const AffineWeight& w, float* out, int64_t N,
                 int64_t n_begin, int64_t n_end, float* row_scratch);

// The int8-activation product for 4-bit and 8-bit affine weights (small M; AVX2, and AVX-512 VNNI
// in avx512_affine.cpp): the activations come from quantize_activations_q8 above (int8 per
// 64-element chunk, two planes). The weight needs no rounding at all: its codes are small unsigned
// integers, so per set of elements of one chunk inside one group g the kernel forms the EXACT
// integer sums
//     I = sum_k x_q[k] * q[k]   (4-bit: vpmaddubsw, q <= 15, |pair| <= 3810; 8-bit: vpdpbusd on
//                                the raw bytes, or vpmaddwd on codes widened to int16 on AVX2)
//     X = sum_k x_q[k]          (activation side, once per call)
// and adds  x_scale[c] * scale[g] * (I - zero[g] * X).  4-bit: over 32-element half chunks, the
// zero term subtracted once per output as  sum_h (scale[g] * zero[g]) * x_scale * X_h.  8-bit:
// per SIMD lane (8-16 elements), T = fma(-zero, X, float(I)) in one rounding (exact for integer
// zeros), so that sum x * q and zero * sum x, both near 255 * sum x, never cancel in fp32 (see
// avx512_affine.cpp). So the only error beyond fp32 rounding
// of the scales and partial sums is the activations' int8 rounding (1/254 of each chunk's absmax):
// measured 0.5-0.8% relative rms of the product for Gaussian, ReLU, SiLU and mean-shifted
// activations (1.5% with 1% of the activation columns 20x larger), i.e. 5-10% of int4 g32/g128's
// own rms error (15-20% with those outliers); the errors add in quadrature, so the total grows by
// < 2%. 8-bit weights err ~16x less on their own (0.6% relative rms of the product at g128), so
// there the activations' rounding is as large as the weight's: the total grows ~1.4x (0.59% ->
// 0.84% for Gaussian activations, 0.57% -> 1.7% with those outlier columns), the price of the
// integer product (what llama.cpp's Q8_0 x Q8_0 dot pays too). LOWBIT_CPU_GEMV=fp32 turns it off
// (the exact product); reference.gemm_affine_q8 is the pure-torch model.
// Shapes: bits 4 or 8, K % 64 == 0, group_size % 32 == 0 (every half chunk inside one group).
bool gemm_affine_q8_supported(int64_t K, int bits, int64_t group_size);
void gemm_affine_q8(const int8_t* q, const float* q_scales, const float* offsets, int64_t M,
                    int64_t K, const AffineWeight& w, float* out, int64_t N, int64_t n_begin,
                    int64_t n_end);

}  // namespace lowbit::cpu

// ---- 8-bit and 32-bit optimizers (csrc/kernels/cpu/optim.cpp, optim_avx2.cpp) ----------------
// The per-element update is lowbit/optim.h's; these run it over a parameter of n elements.
#include "lowbit/optim.h"

namespace lowbit::cpu {

// One blockwise 8-bit optimizer state: q (uint8 [n]) indexes code256, scaled per block of
// kOptimBlock elements by absmax (fp32 [ceil(n / kOptimBlock)]). bound255 / zero_code: the
// quantization rule of the code (codebook.h), prepared by the caller.
constexpr int64_t kOptimBlock = 256;
struct OptimState8 {
  uint8_t* q;
  float* absmax;
  const float* code256;
  const float* bound255;
  uint8_t zero_code;
};

// Blocks [block_begin, block_end) of kOptimBlock elements: decode both states of the blocks into
// fp32 scratch on the stack (at most 16 blocks at a time, never the whole state), update them and
// the parameter with optim_update_element, then quantize the states again with each block's new
// absmax (exactly quantize_blockwise). s2 is null for one-state optimizers.
void optimizer_update_8bit_blockwise(const OptimScalars& s, FloatType gt, const void* g,
                                     FloatType pt, void* p, int64_t n, const OptimState8& s1,
                                     const OptimState8* s2, int64_t block_begin, int64_t block_end);
// Elements [begin, end) with fp32 states s1 [n] and s2 [n] (s2 null for one-state optimizers).
void optimizer_update_32bit(const OptimScalars& s, FloatType gt, const void* g, FloatType pt,
                            void* p, float* s1, float* s2, int64_t begin, int64_t end);
// True if a[begin, end) holds no NaN or +-Inf.
bool all_finite(FloatType t, const void* a, int64_t begin, int64_t end);

}  // namespace lowbit::cpu
