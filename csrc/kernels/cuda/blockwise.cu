// 8-bit blockwise quantization over a sorted 256-entry code (the dynamic map by default), CUDA.
//
// Semantics of csrc/kernels/cpu/blockwise.cpp, bit for bit: the block's absmax is a max (exact in
// any order), the scale policy is blockscale.h's, and the code is bucket256 over the fp32
// midpoints of the sorted code (nearest value, an exact tie to the lower entry).
#include "common.cuh"
#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"

namespace lowbit::cuda {

namespace {

constexpr int kQuantWarps = 8;  // one quantization block per warp at a time
constexpr int kDequantThreads = 256;

// The 255 midpoints of the sorted code and the index of the entry nearest 0, computed per thread
// block from the device copy of the code. The arithmetic is the CPU wrapper's: bound[i] =
// (c[i] + c[i+1]) / 2 in fp32, and the zero code is the FIRST index of the smallest |c[i]|.
// Returns true (in every thread) when the code is NOT sorted ascending, i.e. some !(c[i] <=
// c[i+1]), the CPU wrapper's rejection test (a NaN entry fails it too). The host wrapper skips its
// own check while the stream is being captured into a CUDA graph (it would have to synchronise),
// so this is what catches a bad code there; it costs 255 comparisons per thread block.
// Must be called by every thread of the block (it synchronises).
__device__ bool load_code256(const float* code, float* bound, uint8_t* zero_code) {
  bool unsorted = false;
  for (int i = threadIdx.x; i < 255; i += blockDim.x) {
    const float lo = code[i], hi = code[i + 1];
    bound[i] = (lo + hi) / 2.0f;
    unsorted = unsorted || !(lo <= hi);
  }
  if (threadIdx.x < 32) {
    // Each lane scans 8 consecutive entries in order (strict < keeps the first minimum), then
    // the warp reduces (|c|, index) pairs lexicographically, which again keeps the first minimum.
    const int lane = threadIdx.x;
    int best = lane * 8;
    float bd = abs_f(code[best]);
    for (int i = best + 1; i < lane * 8 + 8; ++i) {
      const float d = abs_f(code[i]);
      if (d < bd) bd = d, best = i;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float od = __shfl_xor_sync(kFullMask, bd, o);
      const int oi = __shfl_xor_sync(kFullMask, best, o);
      if (od < bd || (od == bd && oi < best)) bd = od, best = oi;
    }
    if (lane == 0) *zero_code = uint8_t(best);
  }
  // A barrier (bound and zero_code are visible afterwards) that also ORs the flag over the block.
  return __syncthreads_or(unsorted ? 1 : 0) != 0;
}

// Warp w of thread block g handles quantization blocks b = g * kQuantWarps + w, then strides by
// the whole grid. Lanes walk the block with stride 32 (coalesced): one pass for the absmax (a
// max: the result does not depend on the order), one pass for the codes.
template <typename T>
__global__ void __launch_bounds__(kQuantWarps * 32)
    quantize_blockwise_kernel(const T* __restrict__ a, int64_t n, int64_t nblocks, int bs_log2,
                              const float* __restrict__ code, uint8_t* __restrict__ q,
                              float* __restrict__ absmax) {
  __shared__ float bound[255];
  __shared__ uint8_t zero_code_s;
  // An unsorted code makes every block "non-finite" (blockscale.h): absmax NaN, all codes the zero
  // code, so the result dequantizes to NaN, visibly, instead of to codes from a meaningless
  // bucket search (bucket256 stays in [0, 255] whatever the bounds, so it is memory-safe anyway).
  const bool unsorted = load_code256(code, bound, &zero_code_s);
  const uint8_t zero_code = zero_code_s;
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
    bad = warp_any(bad) || unsorted;
    const BlockScale s = make_block_scale(m, bad);
    if (lane == 0) absmax[b] = s.absmax;
    if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) {
      for (int64_t i = start + lane; i < end; i += 32) q[i] = zero_code;
    } else {
      for (int64_t i = start + lane; i < end; i += 32)
        q[i] = uint8_t(bucket256(bound, normalize(load_f(a, i), s)));
    }
  }
}

// Elementwise: out[i] = code[q[i]] * absmax[i >> bs_log2], the code staged in shared memory. The
// product goes through mul_cpu so that a NaN block (absmax NaN) gives the CPU's NaN bits.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_blockwise_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                const float* __restrict__ code, int64_t n, int bs_log2,
                                T* __restrict__ out) {
  __shared__ float c[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) c[i] = code[i];
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store_f(out, i, mul_cpu(c[q[i]], absmax[i >> bs_log2]));
}

}  // namespace

cudaError_t quantize_blockwise(FloatType t, const void* a, int64_t n, int64_t blocksize,
                               const float* code256, uint8_t* q, float* absmax,
                               cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t nblocks = div_up(n, blocksize);
  const unsigned grid = grid_for(nblocks, kQuantWarps);
  const int bs_log2 = log2_pow2(blocksize);
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    quantize_blockwise_kernel<T><<<grid, kQuantWarps * 32, 0, stream>>>(
        static_cast<const T*>(a), n, nblocks, bs_log2, code256, q, absmax);
  });
  return cudaGetLastError();
}

cudaError_t dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code256,
                                 int64_t n, int64_t blocksize, FloatType t, void* out,
                                 cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const unsigned grid = grid_for(n, kDequantThreads * 4);
  const int bs_log2 = log2_pow2(blocksize);
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    dequantize_blockwise_kernel<T><<<grid, kDequantThreads, 0, stream>>>(
        q, absmax, code256, n, bs_log2, static_cast<T*>(out));
  });
  return cudaGetLastError();
}

}  // namespace lowbit::cuda
