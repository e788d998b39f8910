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
// AffinePolicy (below): the affine format of issue #13, w = (q - zero[g]) * scale[g], with
// kHasZero (the kernels subtract z only then, so the code-table formats pay nothing for it) and an
// fp32 bias added in the epilogue (kHasBias). 8-bit affine codes need another load stage (one code
// per byte) and are not covered by these kernels: affine.cu has its own GEMV for them at M <= 8 and
// dequantizes them for cuBLAS above.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "lowbit/blockscale.h"

namespace lowbit::cuda {

// Scales: `const float*` (plain fp32 absmax) or BlockAbsmax (plain or nested, decoded per block).
template <typename Scales>
struct CodeTablePolicy {
  static constexpr bool kHasZero = false;
  static constexpr bool kHasBias = false;
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

// ---- the affine format (issue #13, /work/affine-contract.md) ----------------------------------
// w = (float(q) - zeros[g]) * scales[g] with g = e / group_size over the flattened index e of
// W [N, K]; 4-bit codes packed as above. The fast kernels call group() at the first element of a
// 32-element vector (e a multiple of 32) and need group_size % 32 == 0, so g = (e / 32) / (gs / 32)
// is a 32-bit division of the vector index (plan_gemm_affine checks N * K / 32 < 2^32), done as a
// multiply-high and a shift (FastDiv32; group sizes need not be powers of two: 96, or K = 11008
// per channel). bias: fp32 [N] or null, added to the fp32 sum before the one rounding (epilogue).
//
// value(q) = float(q & 15) without a conversion instruction or a shuffle: the fp32 whose bits are
// 0x4B000000 | c is 2^23 + c exactly (c < 2^23 fills the low mantissa bits), and subtracting 2^23
// leaves c exactly; a LOP3 and an FADD, both full-rate ALU instructions.
struct FastDiv32 {
  uint32_t mul = 0, shr = 0;
  // n / d for every 32-bit n (Granlund-Montgomery with a 33-bit intermediate): l = ceil(log2 d),
  // mul = floor(2^32 * (2^l - d) / d) + 1, n / d = (umulhi(n, mul) + n) >> l.
  static FastDiv32 make(uint32_t d) {
    FastDiv32 f;
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    f.shr = l;
    f.mul = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << l) - d)) / d + 1);
    return f;
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return uint32_t((uint64_t(__umulhi(n, mul)) + n) >> shr);
  }
};

struct AffinePolicy {
  static constexpr bool kHasZero = true;
  static constexpr bool kHasBias = true;
  static constexpr bool kNested = false;
  const float* scales;      // device [N * K / group_size]
  const float* zeros;       // device [N * K / group_size]
  const float* bias;        // device fp32 [N], or null
  FastDiv32 vec_per_group;  // divides by group_size / 32

  __device__ __forceinline__ void setup(float*) {}
  __device__ __forceinline__ float value(uint32_t q) const {
    return __fsub_rn(__uint_as_float(0x4B000000u | (q & 15u)), 8388608.0f);
  }
  __device__ __forceinline__ void group(int64_t e, float& s, float& z) const {
    const uint32_t g = vec_per_group.div(uint32_t(e >> 5));
    s = __ldg(scales + g);
    z = __ldg(zeros + g);
  }
};

// The value stored for output column n: the fp32 sum, plus the policy's fp32 bias if it has one.
template <typename Policy>
__device__ __forceinline__ float epilogue(const Policy& p, int64_t n, float acc) {
  if constexpr (Policy::kHasBias)
    return p.bias != nullptr ? __fadd_rn(acc, __ldg(p.bias + n)) : acc;
  else
    return acc;
}
template <typename Policy>
inline const float* policy_bias(const Policy& p) {
  if constexpr (Policy::kHasBias)
    return p.bias;
  else
    return nullptr;
}

template <typename Policy>
__device__ __forceinline__ float decode_weight(const Policy& p, uint32_t q, float s, float z) {
  if constexpr (Policy::kHasZero)
    return __fmul_rn(__fsub_rn(p.value(q), z), s);  // the CPU's decode, two roundings
  else
    return p.value(q) * s;
}

}  // namespace lowbit::cuda
