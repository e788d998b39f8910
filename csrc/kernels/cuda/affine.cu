// Affine 4/8-bit weights (GPTQ / AWQ / HQQ / compressed-tensors, issue #13), CUDA: quantize,
// dequantize, and the product through the tiers of the 4-bit family (fourbit_gemv.cuh,
// fourbit_mma.cu with AffinePolicy, fourbit_decode.cuh).
//
// Semantics of csrc/kernels/cpu/affine.cpp and lowbit.reference (quantize_affine,
// dequantize_affine), bit for bit. Format (/work/affine-contract.md): W [N, K] of unsigned codes q,
// flattened index e = n * K + k, group g = e / group_size (group_size divides K); bits 4: element e
// in byte e >> 1, the HIGH nibble when e is even, i.e. q = (packed[e >> 1] >> ((~e & 1) << 2)) &
// 0xF; bits 8: q = packed[e]. Decode w = (float(q) - zeros[g]) * scales[g] in fp32: a subtract and
// a multiply, each rounded (never one FMA), then one rounding to the output type.
#include <type_traits>

#include "common.cuh"
#include "fourbit_internal.cuh"
#include "lowbit/cuda_kernels.h"

namespace lowbit::cuda {

namespace {

constexpr int kAffQuantWarps = 8;  // quantize pass 1: one group per warp at a time
constexpr int kAffThreads = 256;   // quantize pass 2, dequantize: elementwise
constexpr int kAffDequantPer = 8;  // dequantize: consecutive elements per thread
constexpr float kFltMax = 3.4028234663852886e38f;

__device__ __forceinline__ int affine_code(const uint8_t* packed, int bits, int64_t e) {
  if (bits == 8) return packed[e];
  return (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF;
}

// ---- quantize, pass 1: the scale and zero of each group -----------------------------------------
// Warp per group (grid stride). The range over the group's finite elements: lo starts at +0 and
// takes v only when v < lo (hi: v > hi), exactly the CPU's fold, so -0.0 never enters and max/min
// are order-free (no NaN reaches them: a non-finite element only sets `bad`). Then every lane
// holds the same hi / lo / bad (xor-shuffle reductions) and lane 0 writes the CPU's scale and
// zero, with the same operations in the same order (IEEE division __fdiv_rn, rintf = round half to
// even, std::nearbyint's rounding in the default mode).
template <typename T>
__global__ void __launch_bounds__(kAffQuantWarps * 32)
    quantize_affine_stats_kernel(const T* __restrict__ a, int64_t groups, int64_t gs, int bits,
                                 bool symmetric, float* __restrict__ scales,
                                 float* __restrict__ zeros) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float qmax = float((1 << bits) - 1);
  const float base_zero = symmetric ? float(1 << (bits - 1)) : 0.0f;
  for (int64_t g = int64_t(blockIdx.x) * kAffQuantWarps + warp; g < groups;
       g += int64_t(gridDim.x) * kAffQuantWarps) {
    const T* x = a + g * gs;
    float lo = 0.0f, hi = 0.0f;
    bool bad = false;
    for (int64_t i = lane; i < gs; i += 32) {
      const float v = load_f(x, i);
      const float av = fabsf(v);
      if (!(av <= kFltMax)) {
        bad = true;
        continue;
      }
      if (symmetric) {
        hi = av > hi ? av : hi;
      } else {
        hi = v > hi ? v : hi;
        lo = v < lo ? v : lo;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float h = __shfl_xor_sync(kFullMask, hi, o), l = __shfl_xor_sync(kFullMask, lo, o);
      hi = h > hi ? h : hi;
      lo = l < lo ? l : lo;
    }
    bad = warp_any(bad);
    if (lane != 0) continue;
    if (symmetric) lo = -hi;
    float scale = __fdiv_rn(__fsub_rn(hi, lo), qmax);
    if (isinf(scale)) scale = __fsub_rn(__fdiv_rn(hi, qmax), __fdiv_rn(lo, qmax));  // overflowed
    float zero = base_zero;
    const bool special = bad || !(scale > 0.0f);
    if (bad) {
      scale = __uint_as_float(0x7fc00000u);  // NaN: the group decodes to NaN (the CPU's bits)
    } else if (special) {
      scale = 0.0f;  // all zeros (or a range that underflows): decodes to zeros
    } else if (!symmetric) {
      // std::min(std::max(zr, 0.0f), qmax) + 0.0f as the CPU writes it (std::max(a, b) is
      // a < b ? b : a, std::min(a, b) is b < a ? b : a); the + 0.0 turns a -0.0 into +0.0.
      float zr = rintf(__fdiv_rn(-lo, scale));
      zr = zr < 0.0f ? 0.0f : zr;
      zr = qmax < zr ? qmax : zr;
      zero = __fadd_rn(zr, 0.0f);
    }
    scales[g] = scale;
    zeros[g] = zero;
  }
}

// ---- quantize, pass 2: the codes ----------------------------------------------------------------
// Thread per output byte (bits 4: elements 2j and 2j + 1, which may lie in two groups when
// group_size is odd; bits 8: element j), so no two threads write one byte. A group is special
// (non-finite or zero range) exactly when its stored scale is not > 0 (NaN or 0), and then every
// code is its zero; otherwise q = clamp(rint(x / scale) + zero, 0, qmax) with IEEE division.
__device__ __forceinline__ uint32_t affine_code_of(float x, float s, float z, float qmax) {
  if (!(s > 0.0f)) return uint32_t(z);
  float q = __fadd_rn(rintf(__fdiv_rn(x, s)), z);
  q = q < 0.0f ? 0.0f : q;  // no NaN here: x is finite in a non-special group
  q = qmax < q ? qmax : q;
  return uint32_t(q);
}

template <typename T>
__global__ void __launch_bounds__(kAffThreads)
    quantize_affine_codes_kernel(const T* __restrict__ a, int64_t n, int64_t gs, int bits,
                                 const float* __restrict__ scales, const float* __restrict__ zeros,
                                 uint8_t* __restrict__ packed) {
  const float qmax = float((1 << bits) - 1);
  const int64_t nbytes = bits == 4 ? (n + 1) >> 1 : n;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nbytes; j += stride) {
    if (bits == 8) {
      const int64_t g = j / gs;
      packed[j] = uint8_t(affine_code_of(load_f(a, j), scales[g], zeros[g], qmax));
    } else {
      const int64_t e = 2 * j;
      const int64_t g = e / gs;
      const uint32_t hi = affine_code_of(load_f(a, e), scales[g], zeros[g], qmax);
      uint32_t lo = 0;  // an odd n pads the last low nibble with 0, as the CPU does
      if (e + 1 < n) {
        const int64_t g1 = (e + 1) / gs;
        lo = affine_code_of(load_f(a, e + 1), scales[g1], zeros[g1], qmax);
      }
      packed[j] = uint8_t((hi << 4) | lo);
    }
  }
}

// a - b rounded on its own (never contracted), a NaN result with the CPU's NaN bits (common.cuh).
__device__ __forceinline__ float sub_cpu(float a, float b) {
  const float r = __fsub_rn(a, b);
  return r == r ? r : cpu_nan(a, b);
}

// ---- dequantize ---------------------------------------------------------------------------------
// Thread per run of kAffDequantPer = 8 consecutive elements (grid stride): one 64-bit division for
// the first element's group, then the group advances when an element crosses its end (a `while`:
// groups may be shorter than the run). Each value is (float(q) - z) * s with two explicit
// roundings, then one rounding to T (numeric.h, the CPU's conversion); a NaN scale (a non-finite
// group) gives the CPU's NaN bits (sub_cpu / mul_cpu). kVec (packed 8-byte and out 16-byte
// aligned): a full run loads its codes at once (bits 4: one 32-bit word = bytes e0/2 .. e0/2 + 3,
// byte b at bits [8b, 8b + 8) holding element 2b in its high nibble and 2b + 1 in its low one; bits
// 8: one 64-bit word, byte i = element i) and stores its 8 values as 16-byte vectors; otherwise
// (and for the run holding the tail) element by element, any alignment.
template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v) {
  if constexpr (std::is_same_v<T, float>) {
    float4* o = reinterpret_cast<float4*>(p);
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)  // element 2i in the low half of word i (little endian)
      w[i] = uint32_t(from_float<T>(v[2 * i]).bits) |
             (uint32_t(from_float<T>(v[2 * i + 1]).bits) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kAffThreads)
    dequantize_affine_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales,
                             const float* __restrict__ zeros, int bits, int64_t gs, int64_t n,
                             T* __restrict__ out) {
  static_assert(kAffDequantPer == 8, "the vector path loads and stores runs of 8 elements");
  const int64_t runs = (n + kAffDequantPer - 1) / kAffDequantPer;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < runs; r += stride) {
    const int64_t e0 = r * kAffDequantPer;
    const bool vec = kVec && e0 + kAffDequantPer <= n;
    uint32_t code[kAffDequantPer];
    if (vec && bits == 4) {
      const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(packed + (e0 >> 1)));
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        code[2 * b] = (w >> (8 * b + 4)) & 0xFu;
        code[2 * b + 1] = (w >> (8 * b)) & 0xFu;
      }
    } else if (vec) {
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(packed + e0));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        code[i] = (w.x >> (8 * i)) & 0xFFu;
        code[4 + i] = (w.y >> (8 * i)) & 0xFFu;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kAffDequantPer; ++i)
        code[i] = e0 + i < n ? uint32_t(affine_code(packed, bits, e0 + i)) : 0u;
    }
    int64_t g = e0 / gs;
    int64_t g_end = (g + 1) * gs;
    float s = scales[g], z = zeros[g];
    float v[kAffDequantPer];
#pragma unroll
    for (int i = 0; i < kAffDequantPer; ++i) {
      const int64_t e = e0 + i;
      v[i] = 0.0f;
      if (e >= n) continue;
      if (e >= g_end) {
        while (e >= g_end) ++g, g_end += gs;
        s = scales[g], z = zeros[g];
      }
      v[i] = mul_cpu(sub_cpu(float(code[i]), z), s);
    }
    if (vec) {
      store8(out + e0, v);
    } else {
#pragma unroll
      for (int i = 0; i < kAffDequantPer; ++i)
        if (e0 + i < n) store_f(out, e0 + i, v[i]);
    }
  }
}

// The fast tiers need 32-element vectors inside one group, and the vector index as 32 bits.
bool affine_fast_ok(int bits, int64_t group_size, int64_t N, int64_t K) {
  return bits == 4 && group_size > 0 && group_size % 32 == 0 && K % 32 == 0 &&
         N * K / 32 < (int64_t(1) << 32);
}

}  // namespace

cudaError_t quantize_affine(FloatType t, const void* a, int64_t n, int64_t group_size, int bits,
                            bool symmetric, uint8_t* packed, float* scales, float* zeros,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (group_size <= 0 || n % group_size != 0 || (bits != 4 && bits != 8))
    return cudaErrorInvalidValue;
  const int64_t groups = n / group_size;
  const int64_t nbytes = bits == 4 ? (n + 1) / 2 : n;
  cudaError_t err = cudaSuccess;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* ap = static_cast<const T*>(a);
    quantize_affine_stats_kernel<T>
        <<<grid_for(groups, kAffQuantWarps, int64_t(1) << 16), kAffQuantWarps * 32, 0, stream>>>(
            ap, groups, group_size, bits, symmetric, scales, zeros);
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    quantize_affine_codes_kernel<T>
        <<<grid_for(nbytes, kAffThreads * 4, int64_t(1) << 16), kAffThreads, 0, stream>>>(
            ap, n, group_size, bits, scales, zeros, packed);
    err = cudaGetLastError();
  });
  return err;
}

cudaError_t dequantize_affine(const uint8_t* packed, const float* scales, const float* zeros,
                              int bits, int64_t group_size, int64_t n, FloatType t, void* out,
                              cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (group_size <= 0 || (bits != 4 && bits != 8)) return cudaErrorInvalidValue;
  const unsigned grid = grid_for(div_up(n, kAffDequantPer), kAffThreads, int64_t(1) << 16);
  const bool vec =
      reinterpret_cast<uintptr_t>(packed) % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if (vec)
      dequantize_affine_kernel<T, true><<<grid, kAffThreads, 0, stream>>>(
          packed, scales, zeros, bits, group_size, n, static_cast<T*>(out));
    else
      dequantize_affine_kernel<T, false><<<grid, kAffThreads, 0, stream>>>(
          packed, scales, zeros, bits, group_size, n, static_cast<T*>(out));
  });
  return cudaGetLastError();
}

Gemm4Plan plan_gemm_affine(FloatType t, int64_t M, int64_t N, int64_t K, int bits,
                           int64_t group_size, bool a_aligned16, bool packed_aligned16, int cc,
                           int sm_count, const char* force) {
  Gemm4Plan p;
  p.tier = Gemm4Tier::dequant_gemm;
  if (!affine_fast_ok(bits, group_size, N, K)) return p;
  p = plan_gemm_4bit(t, M, N, K, a_aligned16, packed_aligned16, cc, sm_count, force);
  // The affine format has no generic kernel: its dequantize kernel takes any shape and alignment,
  // so every case the 4-bit table sends to "generic" runs dequantize + cuBLAS.
  if (p.tier == Gemm4Tier::generic) p = Gemm4Plan{Gemm4Tier::dequant_gemm, 0, 1, 0};
  return p;
}

cudaError_t gemm_affine(const Gemm4Plan& plan, FloatType t, const void* a, int64_t M, int64_t K,
                        const uint8_t* packed, const float* scales, const float* zeros,
                        int64_t group_size, const float* bias, void* out, int64_t N,
                        float* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (plan.tier != Gemm4Tier::gemv && plan.tier != Gemm4Tier::mma) return cudaErrorInvalidValue;
  if (!affine_fast_ok(4, group_size, N, K)) return cudaErrorInvalidValue;
  const AffinePolicy pol{scales, zeros, bias, FastDiv32::make(uint32_t(group_size / 32))};
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* ap = static_cast<const T*>(a);
    T* ot = static_cast<T*>(out);
    if (plan.tier == Gemm4Tier::gemv) {
      err = launch_gemv_fast<T, AffinePolicy>(ap, M, K, packed, pol, ot, N, plan.config, stream);
    } else if constexpr (!std::is_same_v<T, float>) {
      err = launch_mma<T, AffinePolicy>(ap, M, K, packed, pol, ot, workspace, plan.split, N,
                                        plan.config, stream);
    }
  });
  return err;
}

}  // namespace lowbit::cuda
