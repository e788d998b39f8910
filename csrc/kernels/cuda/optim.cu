// Fused optimizer updates, CUDA (lowbit/cuda_kernels.h): multi-tensor launches over lists of
// parameters, bit-identical to the CPU kernels (csrc/kernels/cpu/optim*.cpp).
//
// 8-bit (update8_kernel; update8_warp_kernel below does the same with one warp per quantization
// block): one thread block of 256 threads per quantization block of 256 elements (the grid strides
// over the blocks of all tensors of the launch). Each thread decodes its element's states
// (code[q] * absmax, one rounding, as dequantize_blockwise), runs optim_update_element in
// registers, the block reduces the new absmax of each state (blockscale.h's policy), and each
// thread writes its codes (bucket256 over the midpoints, codebook.h's rule). The fp32 states live
// only in registers.
//
// 32-bit and the non-finite check: the grid strides over chunks of 256 * kUnroll elements; each
// thread handles kUnroll elements 256 apart (coalesced, and kUnroll independent loads in flight per
// thread), and the tensor of a chunk is looked up once per chunk, not per element.
//
// Launch geometry and descriptors: the descriptors of up to kOptimMaxTensors tensors travel by
// value as a kernel argument (Batch, ~2.3 KB, under the 4 KB parameter limit of every architecture
// and CUDA version: no device copy, no host-to-device memcpy, nothing to synchronise), so the op is
// capturable in a CUDA graph. A call with more tensors is split into several launches.
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "lowbit/blockscale.h"
#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"
#include "lowbit/optim.h"

namespace lowbit::cuda {

namespace {

constexpr int kBlock = 256;  // elements per quantization block = threads per thread block
constexpr int kWarps = kBlock / 32;
constexpr int kUnroll32 = 4;                  // 32-bit update: elements per thread per chunk
constexpr int kChunk32 = kBlock * kUnroll32;  // elements per chunk (work item)
constexpr int kUnrollCheck = 8;               // non-finite check: elements per thread per chunk
constexpr int kChunkCheck = kBlock * kUnrollCheck;

// The descriptors of one launch, passed by value (kernel parameter space). start[t]: the first
// work item (quantization block, or chunk of elements) of tensor t; start[count] the total.
struct Batch {
  OptimTensor t[kOptimMaxTensors];
  int64_t start[kOptimMaxTensors + 1];
  int count;
};
static_assert(sizeof(Batch) + sizeof(OptimScalars) + 8 * sizeof(void*) <= 4096,
              "kernel arguments must fit the 4 KB parameter space");

// The tensor holding work item w (linear scan: at most 32 entries; w is uniform across a thread
// block, so every thread reads the same parameter-space addresses, a broadcast). Empty tensors
// (start[t] == start[t + 1]) are skipped by the <= test.
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

__device__ __forceinline__ unsigned long long warp_min_u64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(kFullMask, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// Stages a 256-entry map in shared memory with its quantization rule, exactly the CPU path's
// host_code (optim.cpp): bound[i] = (c[i] + c[i+1]) / 2 in fp32, and the zero code = the first
// index of the smallest |c[i]| under a sequential scan with a strict `<` (so NaN entries never
// win, and a NaN c[0] keeps index 0). Computed in parallel as a min over the 64-bit keys
// (bits of |c[i]|) << 32 | i: for non-negative floats the bit pattern orders as the value, and the
// low word breaks ties towards the lower index; NaN entries get the largest high word. Needs
// blockDim.x == 256 (one entry per thread); returns the zero code in every thread. Ends with a
// __syncthreads, so c and bound are visible to the whole block.
__device__ __forceinline__ uint8_t stage_code(const float* __restrict__ code, float* c,
                                              float* bound, unsigned long long* scratch) {
  const int i = threadIdx.x;
  const float ci = code[i];
  c[i] = ci;
  __syncthreads();
  if (i < 255) bound[i] = __fdiv_rn(__fadd_rn(ci, c[i + 1]), 2.0f);
  const uint32_t a = float_bits(ci) & 0x7fffffffu;
  const unsigned long long hi = a > 0x7f800000u ? 0xffffffffull : (unsigned long long)a;
  const unsigned long long key = warp_min_u64((hi << 32) | (unsigned long long)i);
  if ((i & 31) == 0) scratch[i >> 5] = key;
  __syncthreads();
  unsigned long long best = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) best = scratch[w] < best ? scratch[w] : best;
  if ((float_bits(c[0]) & 0x7fffffffu) > 0x7f800000u) return 0;  // NaN c[0]: nothing is < it
  return uint8_t(best & 0xffu);
}

// x86's NaN bits (common.cuh's cpu_nan rule) for optim_update_element: the quieted first NaN
// operand, else the default NaN. Only the NaN results differ from RoundedArith.
struct CpuNanArith {
  static __device__ __forceinline__ float mul(float a, float b) { return mul_cpu(a, b); }
  static __device__ __forceinline__ float add(float a, float b) { return add_cpu(a, b); }
  static __device__ __forceinline__ float div(float a, float b) {
    const float r = __fdiv_rn(a, b);
    return r == r ? r : cpu_nan(a, b);
  }
  static __device__ __forceinline__ float sqrt(float a) {
    const float r = __fsqrt_rn(a);
    return r == r ? r : cpu_nan(a, a);  // sqrt(NaN): the quieted operand; sqrt(< 0): default NaN
  }
};

struct ElementResult {
  float p, m, v;
};

// The slow path of update_element, out of line (by value, so that the fast path's scalars and
// values stay in registers).
__device__ __noinline__ ElementResult update_element_cpu_nan(const OptimScalars s, float g, float p,
                                                             float m, float v) {
  optim_update_element<CpuNanArith>(s, g, p, m, v);
  return {p, m, v};
}

// optim_update_element with the CPU's NaN bits. A NaN parameter or state (NaN absmax of a block
// that overflowed at an earlier step, a NaN parameter, 0/0 with eps = 0) would otherwise get the
// CUDA canonical NaN 0x7fffffff where the CPU kernels and the reference store 0x7fc00000 or
// 0xffc00000 (and bf16/fp16 parameters the matching different bits), breaking bit-identity with the
// CPU. The fast path is the plain rounded arithmetic; an element with any NaN result is recomputed
// from its inputs with CpuNanArith (rare: three compares per element otherwise). The non-NaN
// results of the two paths are identical (same rounded operations). Not matched: an operation
// meeting two NaNs of different bits (a NaN parameter and 0/0 from eps = 0 in one element), whose
// CPU result depends on the host compiler's operand order (the commutative add may be swapped).
__device__ __forceinline__ void update_element(const OptimScalars& s, float g, float& p, float& m,
                                               float& v) {
  const float p0 = p, m0 = m, v0 = v;
  optim_update_element(s, g, p, m, v);
  if (!(p == p) || !(m == m) || !(v == v)) {
    const ElementResult r = update_element_cpu_nan(s, g, p0, m0, v0);
    p = r.p, m = r.m, v = r.v;
  }
}

__device__ __forceinline__ uint8_t code_of(float x, const BlockScale& s, const float* bound,
                                           uint8_t zero_code) {
  if (s.mode == BlockMode::zero || s.mode == BlockMode::nonfinite) return zero_code;
  return uint8_t(bucket256(bound, normalize(x, s)));
}

// Index math: work item w of tensor t is its quantization block blk = w - start[t], i.e. elements
// [blk * 256, min(n, blk * 256 + 256)); thread x handles element blk * 256 + x, and absmax[blk] is
// the block's scale (absmax arrays hold ceil(n / 256) entries, the last block partial when 256
// does not divide n: its missing elements are inactive and take no part in the absmax).
template <typename G, typename P, bool kTwo>
__global__ void __launch_bounds__(kBlock)
    update8_kernel(const OptimScalars sc, const Batch b, const float* __restrict__ code1,
                   const float* __restrict__ code2, const int* __restrict__ flags) {
  __shared__ float c1[256], bd1[255];
  __shared__ float c2[kTwo ? 256 : 1], bd2[kTwo ? 255 : 1];
  __shared__ float sm[kWarps];
  __shared__ int sb[kWarps];
  __shared__ unsigned long long zk1[kWarps], zk2[kWarps];
  const uint8_t z1 = stage_code(code1, c1, bd1, zk1);
  const uint8_t z2 = kTwo ? stage_code(code2, c2, bd2, zk2) : uint8_t(0);
  const int64_t total = b.start[b.count];
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int t = find_tensor(b, w);
    const OptimTensor& d = b.t[t];
    // Uniform across the block (one tensor per work item), so the block reductions below are
    // reached by every thread or by none.
    if (flags[d.flag] != 0) continue;
    const int64_t blk = w - b.start[t];
    const int64_t i = blk * kBlock + threadIdx.x;
    const bool active = i < d.n;
    uint8_t* q1 = static_cast<uint8_t*>(d.state1);
    uint8_t* q2 = static_cast<uint8_t*>(d.state2);
    float m = 0.0f, v = 0.0f;
    if (active) {
      // mul_cpu: a NaN block (absmax NaN) decodes to the CPU's NaN bits (see update_element).
      m = mul_cpu(c1[q1[i]], d.absmax1[blk]);
      if (kTwo) v = mul_cpu(c2[q2[i]], d.absmax2[blk]);
      const G* g = static_cast<const G*>(d.g);
      P* p = static_cast<P*>(d.p);
      float pv = to_float(p[i]);
      OptimScalars s = sc;
      s.seed = d.seed;
      update_element(s, to_float(g[i]), pv, m, v);
      store_param(s, p, i, pv);
    }
    // absmax[blk] was read above by every thread; block_scale's __syncthreads orders those reads
    // before thread 0's write of the new value.
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

// The same update with one WARP per quantization block (the default; update8_kernel is kept as an
// independent second implementation, LOWBIT_OPTIM8_KERNEL=block, which the tests hold to the same
// bits): lane x handles elements blk * 256 + x + 32 * j for j < 8 (each load instruction of a warp
// reads 32 consecutive elements: coalesced, no alignment needed), so a thread keeps 8 elements'
// loads in flight and the block's absmax is a warp reduction (shuffles, no __syncthreads). Work
// item w goes to global warp w (grid-stride over warps). The max is order-independent, so the
// absmax, and with it every code, is the one update8_kernel and the CPU compute.
template <typename G, typename P, bool kTwo>
__global__ void __launch_bounds__(kBlock)
    update8_warp_kernel(const OptimScalars sc, const Batch b, const float* __restrict__ code1,
                        const float* __restrict__ code2, const int* __restrict__ flags) {
  constexpr int kPer = kBlock / 32;  // elements per lane
  __shared__ float c1[256], bd1[255];
  __shared__ float c2[kTwo ? 256 : 1], bd2[kTwo ? 255 : 1];
  __shared__ unsigned long long zk1[kWarps], zk2[kWarps];
  const uint8_t z1 = stage_code(code1, c1, bd1, zk1);
  const uint8_t z2 = kTwo ? stage_code(code2, c2, bd2, zk2) : uint8_t(0);
  // No __syncthreads below this point: warps proceed independently.
  const int lane = threadIdx.x & 31;
  const int64_t total = b.start[b.count];
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t w = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); w < total; w += warps) {
    const int t = find_tensor(b, w);  // uniform across the warp
    const OptimTensor& d = b.t[t];
    if (flags[d.flag] != 0) continue;  // uniform across the warp
    const int64_t blk = w - b.start[t];
    const int64_t first = blk * kBlock + lane;  // this lane's elements: first + 32 * j, j < kPer
    const int64_t rem = d.n - first;            // element j exists when 32 * j < rem
    // Per-lane base pointers, so each element's address is base + an immediate offset (a 64-bit
    // index per element would cost two registers each); parameters are stored through
    // store_param with the flat index, which the stochastic-rounding hash needs.
    const G* __restrict__ g = static_cast<const G*>(d.g) + first;
    P* __restrict__ p = static_cast<P*>(d.p);
    uint8_t* __restrict__ q1 = static_cast<uint8_t*>(d.state1) + first;
    uint8_t* __restrict__ q2 = kTwo ? static_cast<uint8_t*>(d.state2) + first : nullptr;
    const float a1 = d.absmax1[blk];
    const float a2 = kTwo ? d.absmax2[blk] : 0.0f;
    OptimScalars s = sc;
    s.seed = d.seed;
    float m[kPer], v[kPer];
    float mx1 = 0.0f, mx2 = 0.0f;
    bool bad1 = false, bad2 = false;
    // Two halves of kPer / 2 elements: loads of a half are issued together, then its updates;
    // only the new states of the first half stay live through the second (bounded registers,
    // no spills around the IEEE division's slow-path call).
#pragma unroll
    for (int h = 0; h < kPer; h += kPer / 2) {
      float gv[kPer / 2], pv[kPer / 2];
      uint8_t k1[kPer / 2], k2[kPer / 2];
#pragma unroll
      for (int j = 0; j < kPer / 2; ++j) {
        const int e = 32 * (h + j);
        gv[j] = pv[j] = 0.0f;
        k1[j] = k2[j] = 0;
        if (e < rem) {
          gv[j] = to_float(g[e]);
          pv[j] = to_float(p[first + e]);
          k1[j] = q1[e];
          if (kTwo) k2[j] = q2[e];
        }
      }
#pragma unroll
      for (int j = 0; j < kPer / 2; ++j) {
        const int e = 32 * (h + j);
        float& mj = m[h + j];
        float& vj = v[h + j];
        mj = vj = 0.0f;
        if (e < rem) {
          // mul_cpu: a NaN block decodes to the CPU's NaN bits (see update_element).
          mj = mul_cpu(c1[k1[j]], a1);
          if (kTwo) vj = mul_cpu(c2[k2[j]], a2);
          update_element(s, gv[j], pv[j], mj, vj);
          store_param(s, p, first + e, pv[j]);
          absmax_fold(mj, mx1, bad1);
          if (kTwo) absmax_fold(vj, mx2, bad2);
        }
      }
    }
    // The warp's max and non-finite flag; the shuffles also order every lane's read of
    // absmax[blk] above before lane 0's write of the new value below.
    const BlockScale s1 = make_block_scale(warp_max(mx1), warp_any(bad1));
    if (lane == 0) d.absmax1[blk] = s1.absmax;
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (32 * j < rem) q1[32 * j] = code_of(m[j], s1, bd1, z1);
    if (kTwo) {
      const BlockScale s2 = make_block_scale(warp_max(mx2), warp_any(bad2));
      if (lane == 0) d.absmax2[blk] = s2.absmax;
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (32 * j < rem) q2[32 * j] = code_of(v[j], s2, bd2, z2);
    }
  }
}

// Work item w of tensor t is chunk c = w - start[t]: elements c * kChunk32 + x + k * 256 for
// thread x and k < kUnroll32. All loads of a chunk are issued before the first store.
template <typename G, typename P>
__global__ void __launch_bounds__(kBlock)
    update32_kernel(const OptimScalars sc, const Batch b, const int* __restrict__ flags) {
  const int64_t total = b.start[b.count];
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int t = find_tensor(b, w);
    const OptimTensor& d = b.t[t];
    if (flags[d.flag] != 0) continue;
    const int64_t base = (w - b.start[t]) * kChunk32 + threadIdx.x, n = d.n;
    const G* __restrict__ g = static_cast<const G*>(d.g);
    P* __restrict__ p = static_cast<P*>(d.p);
    float* __restrict__ s1 = static_cast<float*>(d.state1);
    float* __restrict__ s2 = static_cast<float*>(d.state2);
    float gv[kUnroll32], pv[kUnroll32], m[kUnroll32], v[kUnroll32];
#pragma unroll
    for (int k = 0; k < kUnroll32; ++k) {
      const int64_t i = base + int64_t(k) * kBlock;
      gv[k] = pv[k] = m[k] = v[k] = 0.0f;
      if (i < n) {
        gv[k] = to_float(g[i]);
        pv[k] = to_float(p[i]);
        m[k] = s1[i];
        if (s2) v[k] = s2[i];
      }
    }
    OptimScalars s = sc;
    s.seed = d.seed;
#pragma unroll
    for (int k = 0; k < kUnroll32; ++k) {
      const int64_t i = base + int64_t(k) * kBlock;
      if (i < n) {
        update_element(s, gv[k], pv[k], m[k], v[k]);
        store_param(s, p, i, pv[k]);
        s1[i] = m[k];
        if (s2) s2[i] = v[k];
      }
    }
  }
}

// Chunks of kChunkCheck elements as update32_kernel's; a tensor's flag is set by any thread that
// sees NaN or +-Inf (benign race: all write 1), and chunks of a tensor already flagged are skipped.
template <typename G>
__global__ void __launch_bounds__(kBlock) nonfinite_kernel(const Batch b, int* flags) {
  const int64_t total = b.start[b.count];
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int t = find_tensor(b, w);
    const OptimTensor& d = b.t[t];
    if (*(volatile int*)&flags[d.flag] != 0) continue;
    const int64_t base = (w - b.start[t]) * kChunkCheck + threadIdx.x, n = d.n;
    const G* __restrict__ g = static_cast<const G*>(d.g);
    bool bad = false;
#pragma unroll
    for (int k = 0; k < kUnrollCheck; ++k) {
      const int64_t i = base + int64_t(k) * kBlock;
      // `|` rather than `||`: no short circuit, so the kUnrollCheck loads are issued together.
      if (i < n) bad = bad | !(abs_f(to_float(g[i])) <= 3.4028234663852886e38f);
    }
    if (bad) flags[d.flag] = 1;
  }
}

// Split the call into launches of at most kOptimMaxTensors tensors; items(t) is the number of
// work items of tensor t. launch(batch, total_items) enqueues one kernel.
template <typename Items, typename Launch>
cudaError_t for_batches(const OptimTensor* tensors, int count, Items items, Launch launch) {
  for (int first = 0; first < count; first += kOptimMaxTensors) {
    Batch b{};
    b.count = count - first < kOptimMaxTensors ? count - first : kOptimMaxTensors;
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
int64_t chunks32_of(const OptimTensor& t) { return div_up(t.n, kChunk32); }
int64_t check_chunks_of(const OptimTensor& t) { return div_up(t.n, kChunkCheck); }

// Thread blocks per launch: one per work item up to 2^16 (the grid-stride loops cover the rest),
// enough to fill any GPU many times over.
constexpr int64_t kMaxGrid = int64_t(1) << 16;

}  // namespace

cudaError_t optim_nonfinite_flags(FloatType gt, const OptimTensor* tensors, int count, int* flags,
                                  cudaStream_t stream) {
  return for_batches(tensors, count, check_chunks_of, [&](const Batch& b, int64_t total) {
    dispatch_float(gt, [&](auto gtag) {
      using G = decltype(gtag);
      nonfinite_kernel<G><<<grid_for(total, 1, kMaxGrid), kBlock, 0, stream>>>(b, flags);
    });
  });
}

cudaError_t optimizer_update_8bit_blockwise(const OptimScalars& s, FloatType gt, FloatType pt,
                                            const OptimTensor* tensors, int count,
                                            const float* code1, const float* code2,
                                            const int* flags, cudaStream_t stream) {
  const bool two = code2 != nullptr;
  // LOWBIT_OPTIM8_KERNEL=block selects the thread-block-per-quantization-block kernel (tests and
  // benchmarks compare the two); anything else, or unset, the warp-per-block one.
  const char* pick = std::getenv("LOWBIT_OPTIM8_KERNEL");
  const bool per_block = pick != nullptr && std::strcmp(pick, "block") == 0;
  return for_batches(tensors, count, blocks_of, [&](const Batch& b, int64_t total) {
    // Work items per thread block: 1 (block kernel) or kWarps (warp kernel).
    const unsigned grid = grid_for(total, per_block ? 1 : kWarps, kMaxGrid);
    dispatch_float(gt, [&](auto gtag) {
      using G = decltype(gtag);
      dispatch_float(pt, [&](auto ptag) {
        using P = decltype(ptag);
        if (per_block && two)
          update8_kernel<G, P, true><<<grid, kBlock, 0, stream>>>(s, b, code1, code2, flags);
        else if (per_block)
          update8_kernel<G, P, false><<<grid, kBlock, 0, stream>>>(s, b, code1, nullptr, flags);
        else if (two)
          update8_warp_kernel<G, P, true><<<grid, kBlock, 0, stream>>>(s, b, code1, code2, flags);
        else
          update8_warp_kernel<G, P, false>
              <<<grid, kBlock, 0, stream>>>(s, b, code1, nullptr, flags);
      });
    });
  });
}

cudaError_t optimizer_update_32bit(const OptimScalars& s, FloatType gt, FloatType pt,
                                   const OptimTensor* tensors, int count, const int* flags,
                                   cudaStream_t stream) {
  return for_batches(tensors, count, chunks32_of, [&](const Batch& b, int64_t total) {
    dispatch_float(gt, [&](auto gtag) {
      using G = decltype(gtag);
      dispatch_float(pt, [&](auto ptag) {
        using P = decltype(ptag);
        update32_kernel<G, P><<<grid_for(total, 1, kMaxGrid), kBlock, 0, stream>>>(s, b, flags);
      });
    });
  });
}

}  // namespace lowbit::cuda
