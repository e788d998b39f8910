// Decode policies of the fast 4-bit product kernels (fourbit_gemv.cu, fourbit_mma.cu).
//
// A 4-bit weight W [N, K] is packed two per byte over its flattened index e = n*K + k (element 2j
// in the HIGH nibble of byte j). The kernels only ever ask a policy two things:
//   * value(q): the fp32 value of the 4-bit code q (q in the low bits of a word; bits 4 and up are
//     garbage from the neighbouring nibble and must be ignored), and
//   * group(e, s, z): the scale s and zero z of the group that holds element e,
// and compute w = (value(q) - z) * s (kHasZero) or w = value(q) * s (!kHasZero), fp32.
//
// The fast kernels read 32 consecutive elements of one row at a time (one 16-byte vector), and
// require every group to contain whole such vectors: group sizes are multiples of 32 and rows
// start on a vector (K % 32 == 0), so one group() call serves a whole vector.
//
// CodeTablePolicy (NF4, FP4, any 16-entry code; plain fp32 absmax or double quantized):
//   value(q) = code[q], read with a warp shuffle from the lane that holds it: lane l keeps
//   code[l & 15] in a register, so the table occupies one register per lane, and because the
//   table is replicated in both half-warps, a shuffle index that still carries bit 4 of the next
//   nibble reads the same value (__shfl_sync takes its lane index modulo 32, i.e. only bits 0-4).
//   group(e) = scales[e >> bs_log2] (BlockAbsmax decodes a nested absmax), z = 0.
//
// Plugging in the affine format (/work/affine-contract.md, w = (q - zero[g]) * scale[g], groups of
// group_size along K, g = e / group_size, 4-bit codes packed exactly as here):
//   struct AffinePolicy {
//     static constexpr bool kHasZero = true;
//     const float* scales; const float* zeros; int g_log2;  // or a divisor for non-power-of-two
//     float tab;                                             // lane l: float(l & 15)
//     __device__ void setup(float*) { tab = float(threadIdx.x & 15); }
//     __device__ float value(uint32_t q) const { return __shfl_sync(~0u, tab, int(q)); }
//     __device__ void group(int64_t e, float& s, float& z) const {
//       const int64_t g = e >> g_log2; s = scales[g]; z = zeros[g]; }
//   };
// and instantiate gemv_4bit_fast / mma_4bit with it (one more branch in the two launchers). The
// kernels subtract z only when kHasZero, so the code-table formats pay nothing for it. 8-bit
// affine codes need another load stage (one code per byte) and are not covered by these kernels.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "lowbit/blockscale.h"

namespace lowbit::cuda {

// Scales: `const float*` (plain fp32 absmax) or BlockAbsmax (plain or nested, decoded per block).
template <typename Scales>
struct CodeTablePolicy {
  static constexpr bool kHasZero = false;
  static constexpr bool kNested = std::is_same_v<Scales, BlockAbsmax>;
  Scales scales;
  const float* code16;  // device [16]
  int bs_log2;
  float tab;  // this lane's table entry, code16[lane & 15]

  // Called by every thread of the block before its first __syncthreads(); smem: 256 floats of
  // shared memory when kNested (the nested code is staged there), unused otherwise.
  __device__ __forceinline__ void setup(float* smem) {
    tab = __ldg(code16 + (threadIdx.x & 15));
    if constexpr (kNested) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) smem[i] = scales.nested_code[i];
      scales.nested_code = smem;
      scales.absmax = nullptr;  // null already (nested); now the compiler knows it too
    }
  }
  __device__ __forceinline__ float value(uint32_t q) const {
    return __shfl_sync(kFullMask, tab, int(q));
  }
  __device__ __forceinline__ void group(int64_t e, float& s, float& z) const {
    if constexpr (kNested)
      s = scales[e >> bs_log2];
    else
      s = __ldg(scales + (e >> bs_log2));
    z = 0.0f;
  }
};

template <typename Policy>
__device__ __forceinline__ float decode_weight(const Policy& p, uint32_t q, float s, float z) {
  if constexpr (Policy::kHasZero)
    return (p.value(q) - z) * s;
  else
    return p.value(q) * s;
}

}  // namespace lowbit::cuda
