// LLM.int8() forward on CUDA in three launches, none of which waits for the host:
//
//   1. int8_linear_quant: one pass over the activations that quantizes every row (scale = absmax
//      over the elements below the threshold, as csrc/kernels/cpu/int8.cpp) AND finds the outlier
//      columns (any |a| >= threshold). The columns are compacted on the device into an ascending
//      list with its count; the codes of those columns are zeroed, and the first
//      kInt8OutlierCapacity of them are gathered (activations as fp32, weight bytes) for step 3.
//   2. the int8 x int8 -> int32 product (cuBLASLt, int8_gemm_lt.cu; the dp4a kernel of int8.cu
//      where cuBLASLt cannot run).
//   3. int8_linear_epilogue: C * (row * col) / 127^2 + bias, plus the outlier columns' product in
//      fp32, rounded once to the output dtype.
//
// Finding the outlier columns is a reduction over all rows, and zeroing their codes needs its
// result, so step 1 has two dependency points. With threshold > 0 and few rows (decode) one thread
// block does everything (the points are __syncthreads); otherwise the kernel is launched
// cooperatively and they are grid-wide barriers (cooperative_groups grid sync: no host round trip,
// capturable in a CUDA graph). threshold == 0 has no outliers and launches an ordinary grid.
//
// Capacity policy: the outlier list itself has room for all K columns, so no column is ever
// dropped. The first kInt8OutlierCapacity columns (ascending) are gathered into dense buffers that
// the epilogue reads coalesced; any further columns are read by the epilogue in place from A and W
// (strided, slower), with the same fp32 operations in the same order. The result does not depend
// on the capacity, only the time does.
#include <cooperative_groups.h>

#include "common.cuh"
#include "lowbit/blockscale.h"
#include "lowbit/cuda_kernels.h"

namespace lowbit::cuda {

namespace {

namespace cg = cooperative_groups;

constexpr int kQThreads = 512;  // quantize kernel: one block per row at a time
constexpr int kQWarps = kQThreads / 32;
constexpr int kJB = 4;  // outlier columns whose loads are issued together (gather, epilogue)
constexpr int kMaxMaskWords = int((131071 + 31) / 32);  // K <= 131071 (ops/int8_args.h)
// One block handles all rows when there are at most this many rows and elements: two
// __syncthreads instead of two grid barriers, and no weight gather (the epilogue reads the few
// outlier weight bytes in place, each once, because one epilogue thread covers all rows).
// But the block quantizes its rows one after the other, and each row costs at least one DRAM
// round trip plus two block barriers (about 1 us), while the cooperative grid does all rows at once
// for a fixed price of two grid barriers (a few us). With 16 rows (M = 16, K = 4096) one block
// would spend ~16 us in front of a ~5 us int8 GEMM, against ~10 us for the whole bf16 layer (issue
// 11 asks 1.2x bf16 at M = 16). 4 rows is where the two estimates meet; to be measured on a GPU.
constexpr int64_t kOneBlockMaxRows = 4, kOneBlockMaxElems = int64_t(1) << 18;

enum Mode : int { kPlain = 0, kOneBlock = 1, kGrid = 2 };

template <typename T>
struct QuantArgs {
  const T* a;
  int64_t rows, K;
  float threshold;
  int8_t* q;
  float* row_stats;
  // outliers (modes kOneBlock / kGrid)
  uint32_t* mask;    // [ceil(K / 32)], kGrid only: the union over blocks
  int32_t* count;    // [1]
  int32_t* cols;     // [K]
  float* a_gather;   // [rows, kInt8OutlierCapacity]
  int8_t* w_gather;  // [kInt8OutlierCapacity, N], kGrid only
  const int8_t* W;   // [N, K]
  int64_t N;
};

// std::max(lo, x) / std::min(hi, x) spelled as the CPU kernel's, so NaN clamps the same way.
__device__ __forceinline__ float clamp127(float x) {
  const float lo = (-127.0f < x) ? x : -127.0f;
  return (lo < 127.0f) ? lo : 127.0f;
}

// V consecutive elements at p (16-byte aligned when V > 1) as fp32.
template <typename T, int V>
__device__ __forceinline__ void load_chunk(const T* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = to_float(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "one 16-byte load");
    union {
      uint4 u;
      T t[V];
    } raw;
    raw.u = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = to_float(raw.t[i]);
  }
}

// V codes to p (aligned to V bytes): one store.
template <int V>
__device__ __forceinline__ void store_codes(int8_t* p, const int8_t (&b)[V]) {
  if constexpr (V == 1) {
    p[0] = b[0];
  } else if constexpr (V == 4) {
    union {
      uint32_t u;
      int8_t b[4];
    } w;
#pragma unroll
    for (int i = 0; i < 4; ++i) w.b[i] = b[i];
    *reinterpret_cast<uint32_t*>(p) = w.u;
  } else {
    static_assert(V == 8, "4 or 8 codes");
    union {
      uint2 u;
      int8_t b[8];
    } w;
#pragma unroll
    for (int i = 0; i < 8; ++i) w.b[i] = b[i];
    *reinterpret_cast<uint2*>(p) = w.u;
  }
}

template <int kMode>
__device__ __forceinline__ void phase_sync() {
  if constexpr (kMode == kGrid)
    cg::this_grid().sync();  // also orders the global memory writes before it
  else
    __syncthreads();
}

// Exclusive prefix sum of v over the block (kQThreads threads); *total gets the sum.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int s = lane < kQWarps ? warp_sums[lane] : 0;
    int si = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(kFullMask, si, o);
      if (lane >= o) si += u;
    }
    if (lane < kQWarps) warp_sums[lane] = si - s;  // exclusive offset of each warp
    if (lane == 31) *total = si;
  }
  __syncthreads();
  const int r = warp_sums[warp] + incl - v;
  __syncthreads();  // warp_sums is reused by the caller's next scan
  return r;
}

// kPlain: any grid, threshold == 0. kOneBlock: gridDim.x == 1. kGrid: cooperative launch.
// V: elements per chunk (16-byte loads when V > 1: K % V == 0 and `a` 16-byte aligned).
template <typename T, int kMode, int V>
__global__ void __launch_bounds__(kQThreads) int8_quant_outliers_kernel(QuantArgs<T> p) {
  // Bit c of smask: column c holds an outlier. Block-local in phase B; in phase C the union.
  extern __shared__ uint32_t smask[];
  __shared__ float wmax[kQWarps];
  __shared__ int wbad[kQWarps];
  __shared__ int scan_tmp[kQWarps];
  __shared__ int s_total;
  __shared__ int32_t slist[kInt8OutlierCapacity];

  constexpr bool kOutliers = kMode != kPlain;
  const float thr = p.threshold;
  const bool split = kOutliers;  // the host picks kPlain exactly when threshold == 0
  const int64_t K = p.K, rows = p.rows;
  const int nw = int((K + 31) >> 5);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // ---- phase A: clear the masks ----
  if constexpr (kOutliers) {
    for (int w = threadIdx.x; w < nw; w += blockDim.x) smask[w] = 0u;
    if constexpr (kMode == kGrid) {
      const int64_t gt = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
      for (int64_t w = gt; w < nw; w += int64_t(gridDim.x) * blockDim.x) p.mask[w] = 0u;
    }
    phase_sync<kMode>();
  }

  // ---- phase B: quantize this block's rows, flag outlier columns ----
  const int64_t nchunks = K / V;  // V divides K (V == 1 otherwise)
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = p.a + r * K;
    int8_t* qrow = p.q + r * K;
    float m = 0.0f;
    bool bad = false;
    for (int64_t ci = threadIdx.x; ci < nchunks; ci += blockDim.x) {
      float f[V];
      load_chunk<T, V>(row + ci * V, f);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        // Outliers do not count for the scale; NaN compares false, stays in and poisons the row.
        if (split && abs_f(f[i]) >= thr) {
          const int64_t c = ci * V + i;
          atomicOr(&smask[c >> 5], 1u << (c & 31));
        } else {
          absmax_fold(f[i], m, bad);
        }
      }
    }
    m = warp_max(m);
    bad = warp_any(bad);
    if (lane == 0) wmax[warp] = m, wbad[warp] = bad ? 1 : 0;
    __syncthreads();
    m = 0.0f;
    bad = false;
#pragma unroll
    for (int w = 0; w < kQWarps; ++w) {
      m = wmax[w] > m ? wmax[w] : m;
      bad = bad || wbad[w] != 0;
    }
    __syncthreads();  // wmax / wbad are rewritten by the next row
    const bool zero_row = bad || m == 0.0f;
    if (threadIdx.x == 0)  // a NaN row gets the CPU kernel's NaN bits
      p.row_stats[r] = zero_row ? (bad ? bits_float(0x7fc00000u) : 0.0f) : m;
    const float scale = 127.0f / m;  // IEEE division (nvcc's default -prec-div=true)
    const bool divide = int8_scale_overflows(scale);  // tiny absmax (blockscale.h)
    for (int64_t ci = threadIdx.x; ci < nchunks; ci += blockDim.x) {
      int8_t b[V];
      if (zero_row) {
#pragma unroll
        for (int i = 0; i < V; ++i) b[i] = 0;
      } else {
        float f[V];
        load_chunk<T, V>(row + ci * V, f);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float v = f[i];
          const float scaled = divide ? __fmul_rn(__fdiv_rn(v, m), 127.0f) : __fmul_rn(v, scale);
          // rintf: half to even, as the CPU's nearbyint in the default rounding mode.
          b[i] = (split && abs_f(v) >= thr) ? int8_t(0) : int8_t(rintf(clamp127(scaled)));
        }
      }
      store_codes<V>(qrow + ci * V, b);
    }
  }
  if constexpr (!kOutliers) return;

  // ---- the union of the blocks' masks ----
  if constexpr (kMode == kGrid) {
    __syncthreads();
    for (int w = threadIdx.x; w < nw; w += blockDim.x)
      if (smask[w] != 0u) atomicOr(&p.mask[w], smask[w]);
    phase_sync<kMode>();
    for (int w = threadIdx.x; w < nw; w += blockDim.x) smask[w] = __ldcg(&p.mask[w]);
  }
  __syncthreads();

  // ---- phase C: the ascending column list (every block computes it; block 0 stores it) ----
  // Thread t takes words [t * wpt, (t + 1) * wpt); the exclusive scan of their popcounts is the
  // list position of its first column.
  const int wpt = (nw + kQThreads - 1) / kQThreads;
  const int w0 = threadIdx.x * wpt, w1 = min(nw, w0 + wpt);
  int mine = 0;
  for (int w = w0; w < w1; ++w) mine += __popc(smask[w]);
  int idx = block_exclusive_scan(mine, scan_tmp, &s_total);
  const bool store_list = blockIdx.x == 0;
  for (int w = w0; w < w1; ++w) {
    uint32_t bits = smask[w];
    while (bits != 0u) {
      const int c = w * 32 + (__ffs(int(bits)) - 1);
      bits &= bits - 1u;
      if (idx < kInt8OutlierCapacity) slist[idx] = c;
      if (store_list) p.cols[idx] = c;
      ++idx;
    }
  }
  __syncthreads();
  const int total = s_total;
  if (store_list && threadIdx.x == 0) *p.count = total;
  if (total == 0) return;
  const int ng = total < kInt8OutlierCapacity ? total : kInt8OutlierCapacity;

  // Zero the codes of the outlier columns in this block's rows (the same rows as in phase B), and
  // gather the first `ng` outlier activations of those rows.
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int8_t* qrow = p.q + r * K;
    for (int w = threadIdx.x; w < nw; w += blockDim.x) {
      uint32_t bits = smask[w];
      while (bits != 0u) {
        qrow[w * 32 + (__ffs(int(bits)) - 1)] = 0;
        bits &= bits - 1u;
      }
    }
    const T* row = p.a + r * K;
    for (int j = threadIdx.x; j < ng; j += blockDim.x)
      p.a_gather[r * kInt8OutlierCapacity + j] = to_float(row[slist[j]]);
  }
  // The weight bytes of the first `ng` outlier columns, transposed to [j, n] so that the
  // epilogue's threads (consecutive n) read them coalesced. A thread walks one weight row.
  if constexpr (kMode == kGrid) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < p.N; n += stride) {
      const int8_t* wrow = p.W + n * K;
      // kJB loads before their kJB stores: in a load-store-load loop every load waits for a DRAM
      // round trip of its own (the compiler cannot move a load of W above a store to w_gather,
      // which it must assume may alias), i.e. ng round trips per weight row.
      for (int j0 = 0; j0 < ng; j0 += kJB) {
        int8_t wb[kJB];
#pragma unroll
        for (int u = 0; u < kJB; ++u)
          if (j0 + u < ng) wb[u] = wrow[slist[j0 + u]];
#pragma unroll
        for (int u = 0; u < kJB; ++u)
          if (j0 + u < ng) p.w_gather[int64_t(j0 + u) * p.N + n] = wb[u];
      }
    }
  }
}

// ---- epilogue -----------------------------------------------------------------------------------

template <typename TA>
struct OutlierView {
  const int32_t* count;  // null: no outliers
  const int32_t* cols;
  const float* a_gather;
  const int8_t* w_gather;  // null: read W in place
  const TA* a;
  const int8_t* W;
  int64_t K;
};

constexpr int kEThreads = 256, kETileN = 256, kETileM = 16;
// Up to this many rows the epilogue gives each thread one column of all rows (VN = 1, R = 16), so
// every outlier weight byte is read by one thread only.
constexpr int64_t kEFewRows = 16;

// VN == 4: one 16-byte (fp32) or 8-byte (16-bit) store, written as PTX: nvcc split a plain float4 /
// uint2 assignment here into 4 x 32-bit and 2 x 32-bit stores (SASS of sm_80/sm_90, cuda 13.0),
// apparently after merging this branch with the element-wise tail store below; an asm statement is
// never split. (__stwb would not split either, but ptxas turns st.global.wb into a STRONG.SM
// store.) `p` is 16 (8) bytes aligned: the caller stores full chunks only when N % 4 == 0.
__device__ __forceinline__ void st_global_v4(float* p, float a, float b, float c, float d) {
#if defined(LOWBIT_CUDASIM)  // the CPU simulator (tools/cudasim): checks the alignment
  ::cudasim::st_global_v4_f32(p, a, b, c, d);
#else
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
#endif
}
__device__ __forceinline__ void st_global_v2(void* p, uint32_t a, uint32_t b) {
#if defined(LOWBIT_CUDASIM)
  ::cudasim::st_global_v2_u32(p, a, b);
#else
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
#endif
}

template <typename TO, int VN>
__device__ __forceinline__ void store_out(TO* p, const float (&v)[VN]) {
  if constexpr (VN == 4 && sizeof(TO) == 4) {
    st_global_v4(p, v[0], v[1], v[2], v[3]);
  } else if constexpr (VN == 4 && sizeof(TO) == 2) {
    // Element i in bits [16 * (i % 2), 16 * (i % 2) + 16) of word i / 2: little-endian order.
    uint32_t b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) b[i] = from_float<TO>(v[i]).bits;
    st_global_v2(p, b[0] | (b[1] << 16), b[2] | (b[3] << 16));
  } else {
#pragma unroll
    for (int i = 0; i < VN; ++i) p[i] = from_float<TO>(v[i]);
  }
}

// Thread layout: a block covers kETileM rows x kETileN columns; each thread VN consecutive
// columns of R rows: VN = 1, R = 16 (few rows: every outlier weight byte is read by one thread
// only) or VN = 4, R = 4 (16-byte loads of C). `vec`: N % 4 == 0, so VN = 4 chunks are aligned.
template <typename TB, typename TO, typename TA, int VN, int R, bool kOutliers>
__global__ void __launch_bounds__(kEThreads)
    int8_epilogue_kernel(const int32_t* __restrict__ C, const float* __restrict__ row_stats,
                         const float* __restrict__ col_stats, const TB* __restrict__ bias,
                         TO* __restrict__ out, int64_t M, int64_t N, bool vec, OutlierView<TA> ov) {
  static_assert(VN * R * kEThreads == kETileM * kETileN, "tile");
  constexpr int kThreadsN = kETileN / VN;
  constexpr float kInv127Sq = 1.0f / 16129.0f;  // 1 / (127 * 127)
  constexpr float kInv127 = 1.0f / 127.0f;
  const int tx = threadIdx.x % kThreadsN, ty = threadIdx.x / kThreadsN;
  const int64_t n0 = int64_t(blockIdx.x) * kETileN + int64_t(tx) * VN;
  if (n0 >= N) return;  // no barrier below: threads may leave
  const bool full = vec && n0 + VN <= N;

  float cs[VN], bs[VN], wq[VN];
#pragma unroll
  for (int v = 0; v < VN; ++v) {
    const int64_t n = n0 + v < N ? n0 + v : N - 1;  // clamp: the value is not stored
    cs[v] = col_stats[n];
    bs[v] = bias != nullptr ? to_float(bias[n]) : 0.0f;
    // The CPU's dequantized outlier weight: W.float() * (W_scale * (1 / 127)).
    wq[v] = __fmul_rn(cs[v], kInv127);
  }
  const int count = kOutliers ? *ov.count : 0;
  const int ng = count < kInt8OutlierCapacity ? count : kInt8OutlierCapacity;

  const int64_t mtiles = (M + kETileM - 1) / kETileM;
  for (int64_t mt = blockIdx.y; mt < mtiles; mt += gridDim.y) {
    const int64_t m0 = mt * kETileM + int64_t(ty) * R;
    if (m0 >= M) continue;
    float acc[R][VN];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < VN; ++v) acc[r][v] = 0.0f;
    if constexpr (kOutliers) {
      // fp32 sum over the outlier columns in ascending order: a[m, c] * (W[n, c] * wq[n]).
      // Few rows (VN == 1): the columns go kJB at a time, all their loads issued before the first
      // FMA. One column after the other, each column's loads (cols[j], then W or w_gather, then
      // a) wait a full memory round trip: `count` round trips per thread, ~14 us for 20 outlier
      // columns at M = 1, where the grid is too small to hide them. Many rows (VN == 4): one column
      // at a time, as batching took these kernels from 64 to ~100 registers (ptxas, sm_80/90),
      // halving the resident warps that hide the latency of streaming C. The FMAs run in
      // ascending j for every output either way (the same sum, bit for bit).
      if constexpr (VN == 1) {
        for (int j0 = 0; j0 < count; j0 += kJB) {
          float wv[kJB][VN];
#pragma unroll
          for (int u = 0; u < kJB; ++u) {
            const int j = j0 + u;
            if (j >= count) break;
            const bool wg = j < ng && ov.w_gather != nullptr;  // gathered weight bytes
            const int64_t c = wg ? 0 : ov.cols[j];
#pragma unroll
            for (int v = 0; v < VN; ++v) {
              const int64_t n = n0 + v < N ? n0 + v : N - 1;
              const int8_t w = wg ? ov.w_gather[int64_t(j) * N + n] : ov.W[n * ov.K + c];
              wv[u][v] = __fmul_rn(float(w), wq[v]);
            }
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int64_t m = m0 + r;
            if (m >= M) break;
            float a[kJB];
#pragma unroll
            for (int u = 0; u < kJB; ++u) {
              const int j = j0 + u;
              if (j >= count) break;
              a[u] = j < ng ? ov.a_gather[m * kInt8OutlierCapacity + j]
                            : to_float(ov.a[m * ov.K + ov.cols[j]]);
            }
#pragma unroll
            for (int u = 0; u < kJB; ++u) {
              if (j0 + u >= count) break;
#pragma unroll
              for (int v = 0; v < VN; ++v) acc[r][v] = fmaf(a[u], wv[u][v], acc[r][v]);
            }
          }
        }
      } else {
        for (int j = 0; j < count; ++j) {
          const bool gathered = j < ng;
          const int64_t c = (gathered && ov.w_gather != nullptr) ? 0 : ov.cols[j];
          float wv[VN];
#pragma unroll
          for (int v = 0; v < VN; ++v) {
            const int64_t n = n0 + v < N ? n0 + v : N - 1;
            const int8_t w = (gathered && ov.w_gather != nullptr) ? ov.w_gather[int64_t(j) * N + n]
                                                                  : ov.W[n * ov.K + c];
            wv[v] = __fmul_rn(float(w), wq[v]);
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int64_t m = m0 + r;
            if (m >= M) break;
            const float a =
                gathered ? ov.a_gather[m * kInt8OutlierCapacity + j] : to_float(ov.a[m * ov.K + c]);
#pragma unroll
            for (int v = 0; v < VN; ++v) acc[r][v] = fmaf(a, wv[v], acc[r][v]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      if (m >= M) break;
      const float rs = row_stats[m];
      const int32_t* crow = C + m * N;
      int32_t cv[VN];
      if constexpr (VN == 4) {
        if (full) {
          const int4 c4 = __ldcs(reinterpret_cast<const int4*>(crow + n0));  // read once: stream
          cv[0] = c4.x, cv[1] = c4.y, cv[2] = c4.z, cv[3] = c4.w;
        } else {
#pragma unroll
          for (int v = 0; v < VN; ++v) cv[v] = n0 + v < N ? crow[n0 + v] : 0;
        }
      } else {
        cv[0] = crow[n0];
      }
      float o[VN];
#pragma unroll
      for (int v = 0; v < VN; ++v) {
        // The CPU kernel's expression and order, bit for bit (mm_dequant in int8.cu).
        float x = mul_cpu(mul_cpu(float(cv[v]), mul_cpu(rs, cs[v])), kInv127Sq);
        if (bias != nullptr) x = add_cpu(x, bs[v]);
        if (kOutliers && count > 0) x = __fadd_rn(x, acc[r][v]);
        o[v] = x;
      }
      TO* orow = out + m * N + n0;
      if (full) {
        store_out<TO, VN>(orow, o);
      } else {
#pragma unroll
        for (int v = 0; v < VN; ++v)
          if (n0 + v < N) orow[v] = from_float<TO>(o[v]);
      }
    }
  }
}

// ---- launch helpers -----------------------------------------------------------------------------

constexpr int kMaxDevices = 64;

// Blocks of `kernel` that fit on the current device at once (the cooperative launch limit), cached
// per device: the kernel's resources do not change. The cache is per kernel, i.e. per (T, V)
// instantiation: templated on the kernel's function-pointer TYPE alone, the V = 1 and V = 16 /
// sizeof(T) kernels of one T (same type void (*)(QuantArgs<T>)) shared one cache, although their
// register counts differ (ptxas for sm_80/90 when this was fixed: fp16 V = 8 used 39 registers,
// 3 blocks of 512 threads per SM; V = 1 used 32, 4 blocks per SM). Whichever ran first set the
// limit for both, and a grid sized by the V = 1 limit is too large for the V = 8 kernel:
// cudaErrorCooperativeLaunchTooLarge at M > 3 * SMs.
template <typename T, int V>
cudaError_t coop_grid_limit(void (*kernel)(QuantArgs<T>), int* limit) {
  static int cache[kMaxDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < kMaxDevices && cache[dev] > 0) {
    *limit = cache[dev];
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kQThreads,
                                                      kMaxMaskWords * sizeof(uint32_t));
  if (err != cudaSuccess) return err;
  *limit = sms * per_sm;
  if (*limit < 1) return cudaErrorCooperativeLaunchTooLarge;
  if (dev < kMaxDevices) cache[dev] = *limit;  // benign race: every writer stores the same value
  return cudaSuccess;
}

template <typename T, int V>
cudaError_t launch_quant(const QuantArgs<T>& args, float threshold, cudaStream_t stream) {
  const int64_t rows = args.rows, K = args.K;
  const size_t smem = size_t((K + 31) >> 5) * sizeof(uint32_t);
  if (threshold == 0.0f) {
    int8_quant_outliers_kernel<T, kPlain, V><<<grid_for(rows, 1), kQThreads, 0, stream>>>(args);
    return cudaGetLastError();
  }
  if (int8_quant_one_block(rows, K)) {
    int8_quant_outliers_kernel<T, kOneBlock, V><<<1, kQThreads, smem, stream>>>(args);
    return cudaGetLastError();
  }
  auto kernel = int8_quant_outliers_kernel<T, kGrid, V>;
  int limit = 0;
  cudaError_t err = coop_grid_limit<T, V>(kernel, &limit);
  if (err != cudaSuccess) return err;
  // Enough blocks to cover the rows, never more than fit at once (a grid barrier needs every
  // block resident).
  const int64_t want = rows > 1 ? rows : 1;
  const unsigned grid = unsigned(want < limit ? want : limit);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kQThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  err = cudaLaunchKernelEx(&cfg, kernel, args);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename TB, typename TO, typename TA, bool kOutliers>
void launch_epilogue(const int32_t* C, const float* rs, const float* cs, const TB* bias, TO* out,
                     int64_t M, int64_t N, const OutlierView<TA>& ov, cudaStream_t stream) {
  const int64_t mtiles = (M + kETileM - 1) / kETileM;
  const dim3 grid(unsigned((N + kETileN - 1) / kETileN), unsigned(mtiles < 65535 ? mtiles : 65535));
  const bool vec = N % 4 == 0;
  if (M <= kEFewRows)
    int8_epilogue_kernel<TB, TO, TA, 1, 16, kOutliers>
        <<<grid, kEThreads, 0, stream>>>(C, rs, cs, bias, out, M, N, vec, ov);
  else
    int8_epilogue_kernel<TB, TO, TA, 4, 4, kOutliers>
        <<<grid, kEThreads, 0, stream>>>(C, rs, cs, bias, out, M, N, vec, ov);
}

}  // namespace

bool int8_quant_one_block(int64_t rows, int64_t K) {
  return rows <= kOneBlockMaxRows && rows * K <= kOneBlockMaxElems;
}

cudaError_t int8_linear_quant(FloatType t, const void* a, int64_t rows, int64_t K, float threshold,
                              int8_t* q, float* row_stats, const int8_t* W, int64_t N,
                              const Int8Outliers* ob, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (K > kMaxMaskWords * 32) return cudaErrorInvalidValue;
  if (threshold > 0.0f) {
    if (ob == nullptr || ob->count == nullptr || ob->cols == nullptr || ob->a_gather == nullptr)
      return cudaErrorInvalidValue;
    if (!int8_quant_one_block(rows, K) && (ob->mask == nullptr || ob->w_gather == nullptr))
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaSuccess;
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    QuantArgs<T> args{};
    args.a = static_cast<const T*>(a);
    args.rows = rows;
    args.K = K;
    args.threshold = threshold;
    args.q = q;
    args.row_stats = row_stats;
    if (threshold > 0.0f) {
      args.mask = ob->mask;
      args.count = ob->count;
      args.cols = ob->cols;
      args.a_gather = ob->a_gather;
      args.w_gather = ob->w_gather;
    }
    args.W = W;
    args.N = N;
    constexpr int V = 16 / int(sizeof(T));
    const bool vec = K % V == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(q) % V == 0;
    err = vec ? launch_quant<T, V>(args, threshold, stream)
              : launch_quant<T, 1>(args, threshold, stream);
  });
  return err;
}

cudaError_t int8_linear_epilogue(const int32_t* C, const float* row_stats, const float* col_stats,
                                 FloatType bias_t, const void* bias, FloatType t, void* out,
                                 int64_t rows, int64_t N, const void* a, const int8_t* W, int64_t K,
                                 const Int8Outliers* ob, cudaStream_t stream) {
  if (rows <= 0 || N <= 0) return cudaSuccess;
  dispatch_float(bias_t, [&](auto btag) {
    using TB = decltype(btag);
    dispatch_float(t, [&](auto tag) {
      using T = decltype(tag);
      OutlierView<T> ov{};
      const TB* bp = static_cast<const TB*>(bias);
      T* op = static_cast<T*>(out);
      if (ob == nullptr) {
        launch_epilogue<TB, T, T, false>(C, row_stats, col_stats, bp, op, rows, N, ov, stream);
        return;
      }
      ov.count = ob->count;
      ov.cols = ob->cols;
      ov.a_gather = ob->a_gather;
      // The quantize kernel gathered the weight bytes only in its grid mode.
      ov.w_gather = int8_quant_one_block(rows, K) ? nullptr : ob->w_gather;
      ov.a = static_cast<const T*>(a);
      ov.W = W;
      ov.K = K;
      launch_epilogue<TB, T, T, true>(C, row_stats, col_stats, bp, op, rows, N, ov, stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace lowbit::cuda
