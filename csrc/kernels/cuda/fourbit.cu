// 4-bit quantization over a 16-entry codebook (NF4, FP4 or any other) with one fp32 scale per
// block, and the fused dequantize + product (gemv_4bit), CUDA.
//
// Semantics of csrc/kernels/cpu/fourbit.cpp. Bit layout (bitsandbytes'): the flattened element e
// lives in byte e >> 1, in the HIGH nibble when e is even and the low nibble when e is odd, i.e.
//     nibble(e) = (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF.
// Quantization blocks are powers of two >= 32 over the same flattened index, so a block never
// splits a byte and block b owns bytes [b*bs/2, (b*bs + len + 1)/2).
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "fourbit_internal.cuh"
#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"

namespace lowbit::cuda {

namespace {

constexpr int kQuantWarps = 8;        // quantize: one block per warp at a time
constexpr int kDequantThreads = 256;  // dequantize: one packed byte per thread per step
constexpr int kGemvWarps = 4;         // gemv: one output feature (W row) per warp at a time
constexpr int kGemmRows = 8;          // generic gemv: activation rows accumulated together

// ---- quantize -----------------------------------------------------------------------------------

// Warp w of thread block g quantizes blocks g * kQuantWarps + w (+ grid stride). Pass 1: the
// absmax (a max, order-free). Pass 2: lane l packs bytes l, l + 32, ... of the block: the codes of
// elements 2j and 2j+1 into one byte, the even one high; a missing odd tail gets zero_code, as
// the CPU kernel pads.
// Min 4 blocks per SM (at most 64 registers): left to itself, ptxas aimed at 48 registers and
// spilled 8 bytes (tools/cuda_resources.sh); 4 blocks of 8 warps still fill the SM.
template <typename T>
__global__ void __launch_bounds__(kQuantWarps * 32, 4)
    quantize_4bit_kernel(const T* __restrict__ a, int64_t n, int64_t nblocks, int bs_log2,
                         const __grid_constant__ Codebook16 cb_param, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax) {
  // The boundaries are read with a warp-uniform index (broadcast), the order table with a
  // per-lane index: both from shared memory.
  __shared__ Codebook16 cb;
  if (threadIdx.x == 0) cb = cb_param;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bs = int64_t(1) << bs_log2;
  for (int64_t b = int64_t(blockIdx.x) * kQuantWarps + warp; b < nblocks;
       b += int64_t(gridDim.x) * kQuantWarps) {
    const int64_t start = b << bs_log2;
    const int64_t end = start + bs < n ? start + bs : n;
    float m = 0.0f;
    bool bad = false;
    for (int64_t i = start + lane; i < end; i += 32) absmax_fold(load_f(a, i), m, bad);
    m = warp_max(m);
    bad = warp_any(bad);
    const BlockScale s = make_block_scale(m, bad);
    if (lane == 0) absmax[b] = s.absmax;
    const bool flat = s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite;
    const int64_t nbytes = (end - start + 1) >> 1;
    uint8_t* out = packed + (start >> 1);  // start is a multiple of bs, hence even
    for (int64_t jb = lane; jb < nbytes; jb += 32) {
      const int64_t e = start + 2 * jb;
      uint8_t hi = cb.zero_code, lo = cb.zero_code;
      if (!flat) {
        hi = cb.order[bucket16(cb.bound, normalize(load_f(a, e), s))];
        if (e + 1 < end) lo = cb.order[bucket16(cb.bound, normalize(load_f(a, e + 1), s))];
      }
      out[jb] = uint8_t((hi << 4) | lo);
    }
  }
}

// Vectorised quantize for blocks of 32 .. 512 elements (the common 64/128/256): thread t owns the
// 16 elements [16t, 16t + 16) (one or two 16-byte loads per 8 elements), so a block of bs
// elements is LPB = bs / 16 consecutive lanes of one warp. One read of the input: the lanes of a
// block fold their 16 values into (max, nonfinite), combine them with xor shuffles inside the
// LPB-lane group, and quantize from registers; each thread writes its 8 packed bytes at once
// (element 16t + 2i in the HIGH nibble of byte i, the same layout as the scalar kernel). The
// chunk that holds the end of the tensor (n % 16 != 0) loads and stores element by element,
// padding an odd last byte's low nibble with zero_code. Needs `a` 16-byte aligned and `packed`
// 8-byte aligned. Threads past the end still take part in the shuffles (with nothing to add).
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* x) {
  if constexpr (std::is_same_v<T, float>) {
    const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 v = __ldg(q + i);
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
  } else {
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 u = __ldg(q + h);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // word i: element 2i in its low half (little endian)
        x[8 * h + 2 * i] = widen(T{uint16_t(w[i] & 0xFFFFu)});
        x[8 * h + 2 * i + 1] = widen(T{uint16_t(w[i] >> 16)});
      }
    }
  }
}

template <typename T, int LPB>
__global__ void __launch_bounds__(256)
    quantize_4bit_vec_kernel(const T* __restrict__ a, int64_t n, int bs_log2,
                             const __grid_constant__ Codebook16 cb_param,
                             uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ Codebook16 cb;
  if (threadIdx.x == 0) cb = cb_param;
  __syncthreads();
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t e0 = t << 4;
  const int64_t len = e0 < n ? (n - e0 < 16 ? n - e0 : 16) : 0;
  float x[16];
  if (len == 16) {
    load16(a + e0, x);
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) x[i] = i < len ? load_f(a, e0 + i) : 0.0f;
  }
  float m = 0.0f;
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (i < len) absmax_fold(x[i], m, bad);
#pragma unroll
  for (int o = LPB / 2; o > 0; o >>= 1) {  // the LPB lanes of one block: an aligned lane group
    const float w = __shfl_xor_sync(kFullMask, m, o);
    m = w > m ? w : m;  // never NaN (absmax_fold keeps NaN out of the max)
    bad = (__shfl_xor_sync(kFullMask, int(bad), o) != 0) || bad;
  }
  if (len == 0) return;  // after the shuffles: every lane took part
  const BlockScale s = make_block_scale(m, bad);
  if ((t & (LPB - 1)) == 0) absmax[e0 >> bs_log2] = s.absmax;
  const bool flat = s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite;
  uint32_t code[16];
#pragma unroll
  for (int i = 0; i < 16; ++i)
    code[i] = (flat || i >= len) ? cb.zero_code : cb.order[bucket16(cb.bound, normalize(x[i], s))];
  if (len == 16) {
    uint32_t w[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 8; ++i)  // byte i = (code[2i] << 4) | code[2i + 1], at bits [8i, 8i+8)
      w[i >> 2] |= ((code[2 * i] << 4) | code[2 * i + 1]) << (8 * (i & 3));
    *reinterpret_cast<uint2*>(packed + (e0 >> 1)) = make_uint2(w[0], w[1]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (2 * i < len) packed[(e0 >> 1) + i] = uint8_t((code[2 * i] << 4) | code[2 * i + 1]);
  }
}

// ---- dequantize ---------------------------------------------------------------------------------

// Thread per packed byte j: elements 2j (high nibble) and 2j+1 (low nibble, if < n), both in
// block (2j) >> bs_log2 because blocks are even. Each value is code * absmax rounded once to T
// (mul_cpu: a NaN block gives the CPU's NaN bits, common.cuh).
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           const __grid_constant__ Code16 code, int64_t n, int bs_log2,
                           T* __restrict__ out) {
  __shared__ float c[16];
  if (threadIdx.x < 16) c[threadIdx.x] = code.v[threadIdx.x];
  __syncthreads();
  const int64_t nbytes = (n + 1) >> 1;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nbytes; j += stride) {
    const int64_t e = 2 * j;
    const uint8_t byte = packed[j];
    const float s = absmax[e >> bs_log2];
    store_f(out, e, mul_cpu(c[byte >> 4], s));
    if (e + 1 < n) store_f(out, e + 1, mul_cpu(c[byte & 0xF], s));
  }
}

// Vectorised: thread i writes elements [16i, 16i + 16) from packed bytes [8i, 8i + 8) (one 8-byte
// load). 16 | 16i and blocks are >= 32 elements, so the 16 elements share one scale. Needs packed
// 8-byte aligned and out 16-byte aligned; the thread that holds the tail (n % 16 != 0) writes its
// elements one at a time.
template <typename T>
__device__ __forceinline__ void store16(T* out, int64_t e, const float* v) {
  if constexpr (std::is_same_v<T, float>) {
    float4* o = reinterpret_cast<float4*>(out + e);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  } else {
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)  // element 2i in the low half of word i (little endian)
      w[i] = uint32_t(from_float<T>(v[2 * i]).bits) |
             (uint32_t(from_float<T>(v[2 * i + 1]).bits) << 16);
    uint4* o = reinterpret_cast<uint4*>(out + e);
    o[0] = make_uint4(w[0], w[1], w[2], w[3]);
    o[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

// ---- gemv ---------------------------------------------------------------------------------------

// The per-block scales of a gemv: Scales is `const float*` (a plain fp32 absmax) or BlockAbsmax (a
// double quantized one, blockscale.h). BlockAbsmax::operator[] decodes block b as
//     __fadd_rn(__fmul_rn(nested_code[q[b]], nested_absmax[b >> nested_log2]), nested_offset)
// the CPU kernels' expression with the same two roundings (never one FMA), so the fused scale is
// bit-identical to the CPU decode and to dequantize_blockwise(fp32) + offset. Each thread block
// stages the 256-entry nested code in shared memory `smem` and points its copy of BlockAbsmax
// there (the same values, one shared-memory gather per scale instead of a cached global one).
// Called by every thread before the kernel's __syncthreads().
template <typename Scales>
constexpr bool kNestedScales = std::is_same_v<Scales, BlockAbsmax>;

__device__ __forceinline__ const float* stage_scales(const float* absmax, float*) { return absmax; }
__device__ __forceinline__ BlockAbsmax stage_scales(BlockAbsmax s, float* smem) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) smem[i] = s.nested_code[i];
  s.nested_code = smem;
  s.absmax = nullptr;  // null already (that is what "nested" means); now the compiler knows it too
  return s;
}

// Vectorised dequantize: thread i writes elements [16i, 16i + 16) from packed bytes [8i, 8i + 8)
// (one 8-byte load). 16 | 16i and blocks are >= 32 elements, so the 16 elements share one scale.
// Needs packed 8-byte aligned and out 16-byte aligned; the thread that holds the tail (n % 16 !=
// 0) writes its elements one at a time. The code comes by value (Code16, dequantize_4bit) or from
// device memory (code_dev non-null: the dequantize + cuBLAS tier of the product, whose code is a
// tensor); Scales as in the products (a nested absmax is decoded per 16 elements, the same
// expression, so the values equal dequantize_4bit on the decoded absmax).
template <typename T, typename Scales>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_vec_kernel(const uint8_t* __restrict__ packed, const Scales scales,
                               const __grid_constant__ Code16 code,
                               const float* __restrict__ code_dev, int64_t n, int bs_log2,
                               T* __restrict__ out) {
  __shared__ float c[16];
  __shared__ float nested_code[kNestedScales<Scales> ? 256 : 1];
  if (threadIdx.x < 16) c[threadIdx.x] = code_dev ? code_dev[threadIdx.x] : code.v[threadIdx.x];
  const Scales sc = stage_scales(scales, nested_code);
  __syncthreads();
  const int64_t groups = (n + 15) >> 4;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < groups; i += stride) {
    const int64_t e0 = i << 4;
    const float s = sc[e0 >> bs_log2];
    if (e0 + 16 <= n) {
      const uint2 p = ldg_stream8(packed + (i << 3));
      const uint32_t w[2] = {p.x, p.y};
      float v[16];
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int b = 0; b < 4; ++b) {  // byte 4q + b: element 8q + 2b high nibble, + 1 low
          const uint32_t byte = (w[q] >> (8 * b)) & 0xFFu;
          v[8 * q + 2 * b] = mul_cpu(c[byte >> 4], s);
          v[8 * q + 2 * b + 1] = mul_cpu(c[byte & 0xFu], s);
        }
      store16(out, e0, v);
    } else {
      for (int64_t e = e0; e < n; ++e) {
        const uint8_t byte = packed[e >> 1];
        store_f(out, e, mul_cpu(c[(e & 1) ? (byte & 0xF) : (byte >> 4)], s));
      }
    }
  }
}

// Any M, K and alignment. Warp per output feature j (x grid-stride), kGemmRows activation rows
// per pass (blockIdx.y tiles M). Lane l decodes W elements k = l, l + 32, ... of row j, each as
// code[nibble(e)] * scale(e >> bs_log2) with e = j*K + k: exactly the CPU's decoded value. With a
// nested absmax a lane keeps the decoded scale of its current block and decodes again only when its
// element crosses into another block (every bs / 32 steps). Reads of a are coalesced across lanes
// (consecutive k).
template <typename T, typename Scales>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemm_4bit_generic_kernel(const T* __restrict__ a, int64_t M, int64_t K,
                             const uint8_t* __restrict__ packed, const Scales scales,
                             const float* __restrict__ code16, int bs_log2, T* __restrict__ out,
                             int64_t N) {
  __shared__ float c[16];
  __shared__ float nested_code[kNestedScales<Scales> ? 256 : 1];
  if (threadIdx.x < 16) c[threadIdx.x] = code16[threadIdx.x];
  const Scales sc = stage_scales(scales, nested_code);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t j = int64_t(blockIdx.x) * kGemvWarps + warp; j < N;
       j += int64_t(gridDim.x) * kGemvWarps) {
    const int64_t row0 = j * K;
    for (int64_t m0 = int64_t(blockIdx.y) * kGemmRows; m0 < M;
         m0 += int64_t(gridDim.y) * kGemmRows) {
      const int mr = M - m0 < kGemmRows ? int(M - m0) : kGemmRows;
      const T* a0 = a + m0 * K;
      float acc[kGemmRows];
#pragma unroll
      for (int t = 0; t < kGemmRows; ++t) acc[t] = 0.0f;
      int64_t cur_block = -1;  // nested: the block whose decoded scale `s` holds
      float s = 0.0f;
      for (int64_t k = lane; k < K; k += 32) {
        const int64_t e = row0 + k;
        const int nib = (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF;
        if constexpr (kNestedScales<Scales>) {
          if ((e >> bs_log2) != cur_block) cur_block = e >> bs_log2, s = sc[cur_block];
        } else {
          s = sc[e >> bs_log2];  // one cached load: cheaper than tracking the block
        }
        // Rounded on its own (never fused into the FMA below): the CPU's decoded weight.
        const float w = __fmul_rn(c[nib], s);
#pragma unroll
        for (int t = 0; t < kGemmRows; ++t)
          if (t < mr) acc[t] += load_f(a0, t * K + k) * w;
      }
#pragma unroll
      for (int t = 0; t < kGemmRows; ++t) {
        const float sum = warp_sum(acc[t]);  // every lane takes part: mr is warp-uniform
        if (lane == 0 && t < mr) store_f(out, (m0 + t) * N + j, sum);
      }
    }
  }
}

template <typename T, typename Scales>
cudaError_t launch_generic(const T* a, int64_t M, int64_t K, const uint8_t* packed,
                           const Scales& scales, const float* code16, int bs_log2, T* out,
                           int64_t N, cudaStream_t stream) {
  // gridDim.y <= 65535 (the hardware limit); the kernel strides over the remaining row tiles.
  const int64_t mt = div_up(M, kGemmRows);
  const dim3 grid(grid_for(N, kGemvWarps), unsigned(mt < 65535 ? mt : 65535));
  gemm_4bit_generic_kernel<T, Scales>
      <<<grid, kGemvWarps * 32, 0, stream>>>(a, M, K, packed, scales, code16, bs_log2, out, N);
  return cudaGetLastError();
}

// Runs one tier with the block scales as Scales (const float* or BlockAbsmax).
template <typename T, typename Scales>
cudaError_t run_tier(const Gemm4Plan& plan, const T* a, int64_t M, int64_t K, const uint8_t* packed,
                     const Scales& scales, const float* code16, int bs_log2, T* out, int64_t N,
                     float* ws, cudaStream_t stream) {
  const CodeTablePolicy<Scales> pol{scales, code16, bs_log2, 0.0f};
  if (plan.tier == Gemm4Tier::gemv)
    return launch_gemv_fast<T, CodeTablePolicy<Scales>>(a, M, K, packed, pol, out, N, plan.config,
                                                        stream);
  if constexpr (!std::is_same_v<T, float>) {
    if (plan.tier == Gemm4Tier::mma)
      return launch_mma<T, CodeTablePolicy<Scales>>(a, M, K, packed, pol, out, ws, plan.split, N,
                                                    plan.config, stream);
  }
  return launch_generic(a, M, K, packed, scales, code16, bs_log2, out, N, stream);
}

}  // namespace

cudaError_t quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize,
                          const Codebook16& cb, uint8_t* packed, float* absmax,
                          cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t nblocks = div_up(n, blocksize);
  const unsigned grid = grid_for(nblocks, kQuantWarps);
  const int bs_log2 = log2_pow2(blocksize);
  const bool vec = blocksize <= 512 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(packed) % 8 == 0;
  const int64_t chunks = div_up(n, 16);
  if (vec && div_up(chunks, 256) > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned vgrid = unsigned(div_up(chunks, 256));
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* ap = static_cast<const T*>(a);
    if (!vec)
      quantize_4bit_kernel<T>
          <<<grid, kQuantWarps * 32, 0, stream>>>(ap, n, nblocks, bs_log2, cb, packed, absmax);
    else if (blocksize == 32)
      quantize_4bit_vec_kernel<T, 2><<<vgrid, 256, 0, stream>>>(ap, n, bs_log2, cb, packed, absmax);
    else if (blocksize == 64)
      quantize_4bit_vec_kernel<T, 4><<<vgrid, 256, 0, stream>>>(ap, n, bs_log2, cb, packed, absmax);
    else if (blocksize == 128)
      quantize_4bit_vec_kernel<T, 8><<<vgrid, 256, 0, stream>>>(ap, n, bs_log2, cb, packed, absmax);
    else if (blocksize == 256)
      quantize_4bit_vec_kernel<T, 16>
          <<<vgrid, 256, 0, stream>>>(ap, n, bs_log2, cb, packed, absmax);
    else
      quantize_4bit_vec_kernel<T, 32>
          <<<vgrid, 256, 0, stream>>>(ap, n, bs_log2, cb, packed, absmax);
  });
  return cudaGetLastError();
}

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, const Code16& code,
                            int64_t n, int64_t blocksize, FloatType t, void* out,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int bs_log2 = log2_pow2(blocksize);
  const bool vec =
      reinterpret_cast<uintptr_t>(packed) % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if (vec)
      dequantize_4bit_vec_kernel<T, const float*>
          <<<grid_for(div_up(n, 16), kDequantThreads, int64_t(1) << 16), kDequantThreads, 0,
             stream>>>(packed, absmax, code, nullptr, n, bs_log2, static_cast<T*>(out));
    else
      dequantize_4bit_kernel<T>
          <<<grid_for((n + 1) / 2, kDequantThreads * 4), kDequantThreads, 0, stream>>>(
              packed, absmax, code, n, bs_log2, static_cast<T*>(out));
  });
  return cudaGetLastError();
}

cudaError_t dequantize_4bit_weight(const uint8_t* packed, const BlockAbsmax& scales,
                                   const float* code16, int64_t n, int64_t blocksize, FloatType t,
                                   void* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(packed) % 8 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    return cudaErrorMisalignedAddress;  // the caller passes its own aligned workspace
  const int bs_log2 = log2_pow2(blocksize);
  const unsigned grid = grid_for(div_up(n, 16), kDequantThreads, int64_t(1) << 16);
  const Code16 none{};
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    if (scales.nested())
      dequantize_4bit_vec_kernel<T, BlockAbsmax><<<grid, kDequantThreads, 0, stream>>>(
          packed, scales, none, code16, n, bs_log2, static_cast<T*>(out));
    else
      dequantize_4bit_vec_kernel<T, const float*><<<grid, kDequantThreads, 0, stream>>>(
          packed, scales.absmax, none, code16, n, bs_log2, static_cast<T*>(out));
  });
  return cudaGetLastError();
}

// ---- the dispatch table -------------------------------------------------------------------------
// ONE table for every tier choice of the 4-bit product. The values are first guesses (written
// before any run on a GPU): measure them on the H200 (benchmarks/bench_gpu.py --tiers times every
// tier at each M with LOWBIT_GEMM4_FORCE) and update them here.
struct Gemm4Table {
  int gemv_max_m = 8;          // M <= this: SIMT gemv (any dtype)
  int gemv_m1_cols = 2;        // gemv, M = 1: columns per warp group (1, 2 or 4)
  int mma_max_m = 512;         // fp16/bf16, gemv_max_m < M <= this: tensor cores
  int mma_bm16_max_m = 16;     // tensor cores: M <= this uses 16-row tiles,
  int mma_bm32_max_m = 48;     // <= this 32-row tiles, above 64-row tiles
  int gemv_warps_per_sm = 48;  // gemv: split K until columns * split >= this * SMs ...
  int gemv_min_vectors = 4;    // ... while each warp keeps >= this many 16-byte vectors per lane
  int mma_blocks_per_sm = 2;   // mma: split K until tiles * split >= this * SMs ...
  int mma_min_ktiles = 4;      // ... while each split keeps >= this many k-tiles
  int mma_max_split = 8;
  int generic_max_m = 32;  // K % 32 != 0 or misaligned A: the generic kernel up to this M,
                           // above it dequantize + cuBLAS (when the packed data is aligned)
};
constexpr Gemm4Table kGemm4Table{};

Gemm4Plan plan_gemm_4bit(FloatType t, int64_t M, int64_t N, int64_t K, bool a_aligned16,
                         bool packed_aligned16, int cc, int sm_count, const char* force) {
  const Gemm4Table& tb = kGemm4Table;
  if (sm_count < 1) sm_count = 1;
  // The gemv and mma kernels read 16-byte vectors of whole 32-element groups of A and W rows; the
  // tensor-core kernel needs fp16/bf16 and sm_80 (mma.sync bf16, cp.async); the dequantize kernel
  // reads 8-byte pieces of the packed data.
  const bool fast = a_aligned16 && packed_aligned16 && K > 0 && K % 32 == 0;
  const bool tc = fast && t != FloatType::f32 && cc >= 80;
  const bool deq = packed_aligned16 && K > 0;
  Gemm4Plan p;
  // The tier: the forced one when it can run the shape, else the table's.
  enum { none, gemv, mma, dequant, generic } want = none;
  int force_cfg = -1, force_split = 0;
  if (force != nullptr && force[0] != 0) {
    if (std::strncmp(force, "gemv", 4) == 0) {
      want = gemv;
      // "gemv:W[:C]": W warps per column group, C columns (M = 1). Each character is read only
      // after the one before it was checked not to be the terminator ("gemv:" alone must not
      // read past the end of the string).
      if (force[4] == ':' && force[5] != 0) {
        force_cfg = force[5] - '0';
        if (force[6] == ':' && force[7] != 0) force_split = force[7] - '0';
      }
    } else if (std::strncmp(force, "mma", 3) == 0) {
      want = mma;
      if (force[3] == ':' && force[4] != 0) {  // "mma:C[:S]", read as "gemv:" above
        force_cfg = force[4] - '0';
        if (force[5] == ':' && force[6] != 0) force_split = force[6] - '0';
      }
    } else if (std::strncmp(force, "dequant", 7) == 0)
      want = dequant;
    else if (std::strncmp(force, "generic", 7) == 0)
      want = generic;
  }
  if (want == gemv && !(fast && M <= 8)) want = none;
  if (want == mma && !tc) want = none;
  if (want == dequant && !deq) want = none;
  if (want == none) {
    if (!fast)
      want = (M <= tb.generic_max_m || !deq) ? generic : dequant;
    else if (M <= tb.gemv_max_m && M <= 8)  // the gemv kernels hold at most 8 rows
      want = gemv;
    else if (tc && M <= tb.mma_max_m)
      want = mma;
    else
      want = dequant;
  }
  if (want == generic) return p;  // tier generic
  if (want == dequant) {
    p.tier = Gemm4Tier::dequant_gemm;
    return p;
  }
  if (want == gemv) {
    // Warps per column group: split K inside the block while the columns alone leave the SMs
    // short of warps and each warp still has several vectors per lane.
    p.tier = Gemm4Tier::gemv;
    int cols = M == 1 ? tb.gemv_m1_cols : 2;  // columns per warp group (fourbit_gemv.cuh)
    if (M == 1 && (force_split == 1 || force_split == 2 || force_split == 4)) cols = force_split;
    const int64_t groups = div_up(N, cols), nvec = K / 32;
    int ks = 1;
    while (ks < 8 && groups * ks < int64_t(tb.gemv_warps_per_sm) * sm_count &&
           nvec / (32 * ks * 2) >= tb.gemv_min_vectors / 2)
      ks *= 2;
    if (force_cfg == 1 || force_cfg == 2 || force_cfg == 4 || force_cfg == 8) ks = force_cfg;
    p.config = ks | (cols << 4);
    return p;
  }
  p.tier = Gemm4Tier::mma;
  p.config = M <= tb.mma_bm16_max_m ? 0 : (M <= tb.mma_bm32_max_m ? 1 : 2);
  if (force_cfg >= 0 && force_cfg <= 2) p.config = force_cfg;  // "mma:config[:split]"
  const int64_t tiles = div_up(M, mma_4bit_bm(p.config)) * div_up(N, 128);
  const int64_t ktiles = div_up(K, 32 * mma_4bit_kc(p.config));
  int split = 1;
  while (split < tb.mma_max_split && tiles * split < int64_t(tb.mma_blocks_per_sm) * sm_count &&
         ktiles / (split * 2) >= tb.mma_min_ktiles)
    split *= 2;
  if (force_split >= 1) split = force_split;
  // The blocks actually launched along K (launch_cfg rounds the k-tiles per block up).
  const int64_t tps = div_up(ktiles, split);
  p.split = int(div_up(ktiles, tps));
  p.workspace_floats = p.split > 1 ? int64_t(p.split) * M * N : 0;
  return p;
}

cudaError_t gemm_4bit(const Gemm4Plan& plan, FloatType t, const void* a, int64_t M, int64_t K,
                      const uint8_t* packed, const BlockAbsmax& scales, const float* code16,
                      int64_t blocksize, void* out, int64_t N, float* workspace,
                      cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (plan.tier == Gemm4Tier::dequant_gemm) return cudaErrorInvalidValue;  // the caller's tier
  const int bs_log2 = log2_pow2(blocksize);
  // K == 0 needs no special case: the k loops are empty and every output is 0. No scale is read
  // then, and the absmax of an empty weight may be a null pointer, which BlockAbsmax::nested()
  // would take for "nested": so K == 0 always takes the plain instantiation (it stages nothing).
  const bool nested = K > 0 && scales.nested();
  cudaError_t err = cudaSuccess;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* ap = static_cast<const T*>(a);
    T* ot = static_cast<T*>(out);
    if (nested)
      err = run_tier(plan, ap, M, K, packed, scales, code16, bs_log2, ot, N, workspace, stream);
    else
      err = run_tier(plan, ap, M, K, packed, scales.absmax, code16, bs_log2, ot, N, workspace,
                     stream);
  });
  return err;
}

}  // namespace lowbit::cuda
