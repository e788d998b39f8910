// Fused optimizer updates, CUDA (lowbit/cuda_kernels.h): multi-tensor launches over lists of
// parameters, bit-identical to the CPU kernels (csrc/kernels/cpu/optim*.cpp).
//
// 8-bit: one thread block of 256 threads per quantization block of 256 elements (the grid strides
// over the blocks of all tensors of the launch). Each thread decodes its element's states
// (code[q] * absmax, one rounding, as dequantize_blockwise), runs optim_update_element in
// registers, the block reduces the new absmax of each state (blockscale.h's policy), and each
// thread writes its codes (bucket256 over the midpoints, codebook.h's rule). The fp32 states live
// only in registers.
#include "common.cuh"
#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"
#include "lowbit/optim.h"

namespace lowbit::cuda {

namespace {

constexpr int kBlock = 256;  // elements per quantization block = threads per thread block
constexpr int kWarps = kBlock / 32;
constexpr int kThreads32 = 256;

// The descriptors of one launch, passed by value (kernel parameter space). start[t]: the first
// work item (quantization block, or element for 32-bit) of tensor t; start[count] the total.
struct Batch {
  OptimTensor t[kOptimMaxTensors];
  int64_t start[kOptimMaxTensors + 1];
  int flag_base;  // index of t[0] in the call's flags array
  int count;
};

// The tensor holding work item w (linear scan: at most 32 entries, uniform across a block).
__device__ __forceinline__ int find_tensor(const Batch& b, int64_t w) {
  int t = 0;
  while (t + 1 < b.count && b.start[t + 1] <= w) ++t;
  return t;
}

// Max of |x| and the non-finite flag over the thread block (absmax_fold's pair); every thread
// gets the result. scratch: kWarps floats + kWarps ints of shared memory.
__device__ __forceinline__ BlockScale block_scale(float x, bool active, float* sm, int* sb) {
  float m = 0.0f;
  bool bad = false;
  if (active) absmax_fold(x, m, bad);
  m = warp_max(m);
  bad = warp_any(bad);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch reuse across calls
  if (lane == 0) sm[warp] = m, sb[warp] = bad ? 1 : 0;
  __syncthreads();
  m = 0.0f;
  bad = false;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    m = sm[w] > m ? sm[w] : m;
    bad = bad || sb[w] != 0;
  }
  return make_block_scale(m, bad);
}

__device__ __forceinline__ uint8_t code_of(float x, const BlockScale& s, const float* bound,
                                           uint8_t zero_code) {
  if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) return zero_code;
  return uint8_t(bucket256(bound, normalize(x, s)));
}

template <typename G, typename P, bool kTwo>
__global__ void __launch_bounds__(kBlock)
    update8_kernel(const OptimScalars sc, const Batch b, const float* __restrict__ code1,
                   const float* __restrict__ bound1, const int64_t* __restrict__ zero1,
                   const float* __restrict__ code2, const float* __restrict__ bound2,
                   const int64_t* __restrict__ zero2, const int* __restrict__ flags) {
  __shared__ float c1[256], c2[256], bd1[255], bd2[255];
  __shared__ float sm[kWarps];
  __shared__ int sb[kWarps];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    c1[i] = code1[i];
    if (i < 255) bd1[i] = bound1[i];
    if (kTwo) {
      c2[i] = code2[i];
      if (i < 255) bd2[i] = bound2[i];
    }
  }
  const uint8_t z1 = uint8_t(zero1[0]);
  const uint8_t z2 = kTwo ? uint8_t(zero2[0]) : 0;
  __syncthreads();
  const int64_t total = b.start[b.count];
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int t = find_tensor(b, w);
    if (flags[b.flag_base + t] != 0) continue;  // uniform across the block
    const OptimTensor& d = b.t[t];
    const int64_t blk = w - b.start[t];
    const int64_t i = blk * kBlock + threadIdx.x;
    const bool active = i < d.n;
    uint8_t* q1 = static_cast<uint8_t*>(d.state1);
    uint8_t* q2 = static_cast<uint8_t*>(d.state2);
    float m = 0.0f, v = 0.0f;
    if (active) {
      m = __fmul_rn(c1[q1[i]], d.absmax1[blk]);
      if (kTwo) v = __fmul_rn(c2[q2[i]], d.absmax2[blk]);
      const G* g = static_cast<const G*>(d.g);
      P* p = static_cast<P*>(d.p);
      float pv = to_float(p[i]);
      OptimScalars s = sc;
      s.seed = d.seed;
      optim_update_element(s, to_float(g[i]), pv, m, v);
      store_param(s, p, i, pv);
    }
    const BlockScale s1 = block_scale(m, active, sm, sb);
    if (threadIdx.x == 0) d.absmax1[blk] = s1.absmax;
    if (active) q1[i] = code_of(m, s1, bd1, z1);
    if (kTwo) {
      const BlockScale s2 = block_scale(v, active, sm, sb);
      if (threadIdx.x == 0) d.absmax2[blk] = s2.absmax;
      if (active) q2[i] = code_of(v, s2, bd2, z2);
    }
  }
}

template <typename G, typename P>
__global__ void __launch_bounds__(kThreads32)
    update32_kernel(const OptimScalars sc, const Batch b, const int* __restrict__ flags) {
  const int64_t total = b.start[b.count];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; w < total; w += stride) {
    const int t = find_tensor(b, w);
    if (flags[b.flag_base + t] != 0) continue;
    const OptimTensor& d = b.t[t];
    const int64_t i = w - b.start[t];
    float* s1 = static_cast<float*>(d.state1);
    float* s2 = static_cast<float*>(d.state2);
    const G* g = static_cast<const G*>(d.g);
    P* p = static_cast<P*>(d.p);
    float pv = to_float(p[i]), m = s1[i], v = s2 ? s2[i] : 0.0f;
    OptimScalars s = sc;
    s.seed = d.seed;
    optim_update_element(s, to_float(g[i]), pv, m, v);
    store_param(s, p, i, pv);
    s1[i] = m;
    if (s2) s2[i] = v;
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads32) nonfinite_kernel(const Batch b, int* flags) {
  const int64_t total = b.start[b.count];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; w < total; w += stride) {
    const int t = find_tensor(b, w);
    const float x = to_float(static_cast<const G*>(b.t[t].g)[w - b.start[t]]);
    if (!(abs_f(x) <= 3.4028234663852886e38f))
      flags[b.flag_base + t] = 1;  // benign race: all write 1
  }
}

// Split the call into launches of at most kOptimMaxTensors tensors; items(t) is the number of
// work items of tensor t. launch(batch, total_items) enqueues one kernel.
template <typename Items, typename Launch>
cudaError_t for_batches(const OptimTensor* tensors, int count, Items items, Launch launch) {
  for (int first = 0; first < count; first += kOptimMaxTensors) {
    Batch b{};
    b.count = count - first < kOptimMaxTensors ? count - first : kOptimMaxTensors;
    b.flag_base = first;
    int64_t total = 0;
    for (int k = 0; k < b.count; ++k) {
      b.t[k] = tensors[first + k];
      b.start[k] = total;
      total += items(b.t[k]);
    }
    b.start[b.count] = total;
    if (total == 0) continue;
    launch(b, total);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

int64_t blocks_of(const OptimTensor& t) { return div_up(t.n, kBlock); }
int64_t elems_of(const OptimTensor& t) { return t.n; }

}  // namespace

cudaError_t optim_nonfinite_flags(FloatType gt, const OptimTensor* tensors, int count, int* flags,
                                  cudaStream_t stream) {
  return for_batches(tensors, count, elems_of, [&](const Batch& b, int64_t total) {
    dispatch_float(gt, [&](auto gtag) {
      using G = decltype(gtag);
      nonfinite_kernel<G><<<grid_for(total, kThreads32 * 4), kThreads32, 0, stream>>>(b, flags);
    });
  });
}

cudaError_t optimizer_update_8bit_blockwise(const OptimScalars& s, FloatType gt, FloatType pt,
                                            const OptimTensor* tensors, int count,
                                            const float* code1, const float* bound1,
                                            const int64_t* zero1, const float* code2,
                                            const float* bound2, const int64_t* zero2,
                                            const int* flags, cudaStream_t stream) {
  const bool two = code2 != nullptr;
  return for_batches(tensors, count, blocks_of, [&](const Batch& b, int64_t total) {
    const unsigned grid = grid_for(total, 1, int64_t(1) << 16);
    dispatch_float(gt, [&](auto gtag) {
      using G = decltype(gtag);
      dispatch_float(pt, [&](auto ptag) {
        using P = decltype(ptag);
        if (two)
          update8_kernel<G, P, true><<<grid, kBlock, 0, stream>>>(s, b, code1, bound1, zero1, code2,
                                                                  bound2, zero2, flags);
        else
          update8_kernel<G, P, false><<<grid, kBlock, 0, stream>>>(
              s, b, code1, bound1, zero1, nullptr, nullptr, nullptr, flags);
      });
    });
  });
}

cudaError_t optimizer_update_32bit(const OptimScalars& s, FloatType gt, FloatType pt,
                                   const OptimTensor* tensors, int count, const int* flags,
                                   cudaStream_t stream) {
  return for_batches(tensors, count, elems_of, [&](const Batch& b, int64_t total) {
    dispatch_float(gt, [&](auto gtag) {
      using G = decltype(gtag);
      dispatch_float(pt, [&](auto ptag) {
        using P = decltype(ptag);
        update32_kernel<G, P>
            <<<grid_for(total, kThreads32 * 4), kThreads32, 0, stream>>>(s, b, flags);
      });
    });
  });
}

}  // namespace lowbit::cuda
