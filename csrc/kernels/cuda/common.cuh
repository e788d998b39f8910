// Helpers shared by the CUDA kernels (torch-free): element access, launch geometry, warp
// and block reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/numeric.h"

namespace lowbit::cuda {

using lowbit::dispatch_float;  // lowbit/numeric.h

// Device loads/stores of one element as fp32. The conversions are numeric.h's (round to nearest
// even, the same NaN bit patterns as the CPU kernels), not cuda_fp16's, so that even a NaN's bits
// match the CPU output.
template <typename T>
__device__ __forceinline__ float load_f(const T* p, int64_t i) {
  return to_float(p[i]);
}
template <typename T>
__device__ __forceinline__ void store_f(T* p, int64_t i, float v) {
  p[i] = from_float<T>(v);
}

// log2 of a power of two (block sizes), so block indices are shifts rather than 64-bit divisions.
inline int log2_pow2(int64_t x) {
  int s = 0;
  while ((int64_t(1) << s) < x) ++s;
  return s;
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for grid-stride loops: enough blocks to fill the machine, never above the hardware
// limit of gridDim.x (2^31 - 1); the kernels loop over whatever the grid does not cover.
inline unsigned grid_for(int64_t work_items, int64_t items_per_block,
                         int64_t cap = int64_t(1) << 20) {
  int64_t g = div_up(work_items, items_per_block);
  if (g > cap) g = cap;
  if (g < 1) g = 1;
  return unsigned(g);
}

// The row and column of the flat index i = row * cols + col of a grid-stride loop, kept up to date
// as i advances by `stride` without a 64-bit division per element (a 64-bit `/` is a long
// instruction sequence on the GPU, enough to make a memory-bound elementwise kernel ALU-bound):
// two divisions per thread at the start, then each step adds stride / cols rows and stride % cols
// columns, with one carry when the column passes cols (col and stride % cols are both < cols).
struct RowCol {
  int64_t row, col, drow, dcol, cols;
  __device__ __forceinline__ RowCol(int64_t i, int64_t stride, int64_t cols_) : cols(cols_) {
    row = i / cols;
    col = i - row * cols;
    drow = stride / cols;
    dcol = stride - drow * cols;
  }
  __device__ __forceinline__ void advance() {
    row += drow;
    col += dcol;
    if (col >= cols) col -= cols, ++row;
  }
};

// ---- NaN bits as the CPU kernels produce them ------------------------------------------------
// GPU fp32 arithmetic returns the one canonical NaN 0x7fffffff whatever the operands, while the
// CPU kernels' multiplies and adds (x86 SSE/AVX, aarch64 with FPCR.DN = 0) return the NaN operand,
// quieted, and the host's default NaN for an invalid operation (0 * Inf, Inf - Inf): 0xffc00000 on
// x86 (the "real indefinite"), 0x7fc00000 on aarch64. So a block or row whose stored absmax is NaN
// (0x7fc00000, blockscale.h) dequantized to 0x7fffffff on the GPU and 0x7fc00000 on the CPU (0x7fff
// vs 0x7fc0 in bf16). Every product or sum of an elementwise kernel that must match the CPU bit for
// bit goes through mul_cpu / add_cpu: the explicitly rounded operation (never contracted into an
// FMA), with a NaN result replaced by the CPU's. When both operands are NaN the CPU's choice
// depends on the operand order the host compiler picked (the operations are commutative); the
// first one is taken here.
#if defined(__aarch64__)
constexpr uint32_t kCpuDefaultNaN = 0x7fc00000u;
#else
constexpr uint32_t kCpuDefaultNaN = 0xffc00000u;
#endif

__device__ __forceinline__ bool is_nan_bits(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

__device__ __forceinline__ float cpu_nan(float a, float b) {
  const uint32_t ua = float_bits(a), ub = float_bits(b);
  if (is_nan_bits(ua)) return bits_float(ua | 0x00400000u);
  if (is_nan_bits(ub)) return bits_float(ub | 0x00400000u);
  return bits_float(kCpuDefaultNaN);
}

__device__ __forceinline__ float mul_cpu(float a, float b) {
  const float r = __fmul_rn(a, b);
  return r == r ? r : cpu_nan(a, b);
}

__device__ __forceinline__ float add_cpu(float a, float b) {
  const float r = __fadd_rn(a, b);
  return r == r ? r : cpu_nan(a, b);
}

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;  // inputs are never NaN (absmax_fold keeps NaN out of the max)
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ bool warp_any(bool b) { return __any_sync(kFullMask, b) != 0; }

}  // namespace lowbit::cuda
