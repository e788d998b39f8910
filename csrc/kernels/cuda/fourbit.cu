// 4-bit quantization over a 16-entry codebook (NF4, FP4 or any other) with one fp32 scale per
// block, and the fused dequantize + product (gemv_4bit), CUDA.
//
// Semantics of csrc/kernels/cpu/fourbit.cpp. Bit layout (bitsandbytes'): the flattened element e
// lives in byte e >> 1, in the HIGH nibble when e is even and the low nibble when e is odd, i.e.
//     nibble(e) = (packed[e >> 1] >> ((~e & 1) << 2)) & 0xF.
// Quantization blocks are powers of two >= 32 over the same flattened index, so a block never
// splits a byte and block b owns bytes [b*bs/2, (b*bs + len + 1)/2).
#include <type_traits>

#include "common.cuh"
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
template <typename T>
__global__ void __launch_bounds__(kQuantWarps * 32)
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

// ---- gemv ---------------------------------------------------------------------------------------

// Eight consecutive elements of T from a 16-byte aligned address, widened to fp32. fp32: two
// float4 loads. fp16/bf16: one 16-byte load; 32-bit word w holds element 2w in its low half
// (little endian) and element 2w+1 in its high half.
__device__ __forceinline__ void load8(const float* p, float* x) {
  const float4 u = *reinterpret_cast<const float4*>(p);
  const float4 v = *reinterpret_cast<const float4*>(p + 4);
  x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = v.x, x[5] = v.y, x[6] = v.z, x[7] = v.w;
}
template <typename T16>
__device__ __forceinline__ void load8(const T16* p, float* x) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = to_float(T16{uint16_t(w[i] & 0xFFFFu)});
    x[2 * i + 1] = to_float(T16{uint16_t(w[i] >> 16)});
  }
}

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

// M == 1 fast path, taken when K % 32 == 0 and both a and packed are 16-byte aligned. Warp per
// output feature j. Row j's 4-bit data starts at byte j*K/2 (a multiple of 16), so lane l reads
// 16-byte vectors v = l, l + 32, ...: vector v holds elements k0 = 32v .. 32v + 31 of the row, byte
// i of the vector holding elements k0 + 2i (high nibble) and k0 + 2i + 1 (low nibble). Since the
// flattened offset j*K + k0 is a multiple of 32 and blocks are powers of two >= 32, all 32
// elements share one scale, which is therefore read (or decoded) once per vector and factored out
// of the vector's partial sum.
template <typename T, typename Scales>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_4bit_m1_kernel(const T* __restrict__ a, int64_t K, const uint8_t* __restrict__ packed,
                        const Scales scales, const float* __restrict__ code16, int bs_log2,
                        T* __restrict__ out, int64_t N) {
  __shared__ float c[16];  // 16 distinct banks: lanes never conflict, equal indices broadcast
  __shared__ float nested_code[kNestedScales<Scales> ? 256 : 1];
  if (threadIdx.x < 16) c[threadIdx.x] = code16[threadIdx.x];
  const Scales sc = stage_scales(scales, nested_code);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nvec = K >> 5;
  for (int64_t j = int64_t(blockIdx.x) * kGemvWarps + warp; j < N;
       j += int64_t(gridDim.x) * kGemvWarps) {
    const int64_t row0 = j * K;
    const uint4* wrow = reinterpret_cast<const uint4*>(packed + (row0 >> 1));
    float acc = 0.0f;
    for (int64_t v = lane; v < nvec; v += 32) {
      const uint4 wv = __ldg(wrow + v);  // read-only path: the weight is streamed once
      const int64_t k0 = v << 5;
      const float s = sc[(row0 + k0) >> bs_log2];
      const uint32_t w[4] = {wv.x, wv.y, wv.z, wv.w};
      float part = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // word q: bytes 4q..4q+3 = elements k0 + 8q .. k0 + 8q + 7
        float x[8];
        load8(a + k0 + 8 * q, x);
#pragma unroll
        for (int bi = 0; bi < 4; ++bi) {  // byte bi of the word is its bits [8bi, 8bi + 8)
          const uint32_t byte = (w[q] >> (8 * bi)) & 0xFFu;
          part += x[2 * bi] * c[byte >> 4];
          part += x[2 * bi + 1] * c[byte & 0xFu];
        }
      }
      acc += part * s;
    }
    acc = warp_sum(acc);
    if (lane == 0) store_f(out, j, acc);
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
void launch_gemv_4bit(const T* a, int64_t M, int64_t K, const uint8_t* packed, const Scales& scales,
                      const float* code16, int bs_log2, T* out, int64_t N, cudaStream_t stream) {
  const bool aligned =
      (reinterpret_cast<uintptr_t>(a) % 16 == 0) && (reinterpret_cast<uintptr_t>(packed) % 16 == 0);
  if (M == 1 && K % 32 == 0 && aligned) {
    gemv_4bit_m1_kernel<T, Scales><<<grid_for(N, kGemvWarps), kGemvWarps * 32, 0, stream>>>(
        a, K, packed, scales, code16, bs_log2, out, N);
  } else {
    // gridDim.y <= 65535 (the hardware limit); the kernel strides over the remaining row tiles.
    const int64_t mt = div_up(M, kGemmRows);
    const dim3 grid(grid_for(N, kGemvWarps), unsigned(mt < 65535 ? mt : 65535));
    gemm_4bit_generic_kernel<T, Scales>
        <<<grid, kGemvWarps * 32, 0, stream>>>(a, M, K, packed, scales, code16, bs_log2, out, N);
  }
}

}  // namespace

cudaError_t quantize_4bit(FloatType t, const void* a, int64_t n, int64_t blocksize,
                          const Codebook16& cb, uint8_t* packed, float* absmax,
                          cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t nblocks = div_up(n, blocksize);
  const unsigned grid = grid_for(nblocks, kQuantWarps);
  const int bs_log2 = log2_pow2(blocksize);
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_4bit_kernel<T><<<grid, kQuantWarps * 32, 0, stream>>>(
        static_cast<const T*>(a), n, nblocks, bs_log2, cb, packed, absmax);
  });
  return cudaGetLastError();
}

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, const Code16& code,
                            int64_t n, int64_t blocksize, FloatType t, void* out,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const unsigned grid = grid_for((n + 1) / 2, kDequantThreads * 4);
  const int bs_log2 = log2_pow2(blocksize);
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    dequantize_4bit_kernel<T><<<grid, kDequantThreads, 0, stream>>>(packed, absmax, code, n,
                                                                    bs_log2, static_cast<T*>(out));
  });
  return cudaGetLastError();
}

cudaError_t gemv_4bit(FloatType t, const void* a, int64_t M, int64_t K, const uint8_t* packed,
                      const BlockAbsmax& scales, const float* code16, int64_t blocksize, void* out,
                      int64_t N, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const int bs_log2 = log2_pow2(blocksize);
  // K == 0 needs no special case: the k loops are empty and every output is 0. No scale is read
  // then, and the absmax of an empty weight may be a null pointer, which BlockAbsmax::nested()
  // would take for "nested": so K == 0 always takes the plain instantiation (it stages nothing).
  const bool nested = K > 0 && scales.nested();
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    const T* ap = static_cast<const T*>(a);
    T* ot = static_cast<T*>(out);
    if (nested)
      launch_gemv_4bit(ap, M, K, packed, scales, code16, bs_log2, ot, N, stream);
    else
      launch_gemv_4bit(ap, M, K, packed, scales.absmax, code16, bs_log2, ot, N, stream);
  });
  return cudaGetLastError();
}

}  // namespace lowbit::cuda
