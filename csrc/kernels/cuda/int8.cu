// LLM.int8(), CUDA: row-wise int8 quantization with outlier columns, the int8 x int8 -> int32 GEMM
// (dp4a) and the dequantization of its result.
//
// Semantics of csrc/kernels/cpu/int8.cpp, bit for bit: integer sums are exact in any order, and
// every float expression below is evaluated in the CPU kernel's order with explicitly rounded
// operations (__fmul_rn / __fadd_rn, or mul_cpu / add_cpu where a NaN can come out: those also
// give the CPU's NaN bits, common.cuh), so nvcc cannot contract a multiply and an add into an FMA
// that the CPU build does not perform.
#include "common.cuh"
#include "lowbit/blockscale.h"
#include "lowbit/cuda_kernels.h"

namespace lowbit::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kOutlierRowsPerThread = 64;

// ---- outlier columns ----------------------------------------------------------------------------

// mask has been zeroed; thread (c, y) scans rows [y*R, y*R + R) of column c and stores 1 if one
// is an outlier. Several threads may store 1 into the same byte: the same value, so no atomics.
// |NaN| >= threshold is false, as on the CPU. Consecutive threads read consecutive columns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    outlier_columns_kernel(const T* __restrict__ a, int64_t rows, int64_t K, float threshold,
                           uint8_t* __restrict__ mask) {
  const int64_t cstride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < K; c += cstride) {
    for (int64_t r0 = int64_t(blockIdx.y) * kOutlierRowsPerThread; r0 < rows;
         r0 += int64_t(gridDim.y) * kOutlierRowsPerThread) {
      const int64_t r1 = r0 + kOutlierRowsPerThread < rows ? r0 + kOutlierRowsPerThread : rows;
      bool hit = false;
      for (int64_t r = r0; r < r1 && !hit; ++r) hit = abs_f(load_f(a, r * K + c)) >= threshold;
      if (hit) mask[c] = 1;
    }
  }
}

// ---- row quantization ---------------------------------------------------------------------------

// std::max(lo, x) and std::min(hi, x) exactly as the CPU kernel spells them: (lo < x) ? x : lo and
// (x < hi) ? x : hi, so a NaN product (0 * Inf when 127 / absmax overflows) clamps the same way.
__device__ __forceinline__ float clamp127(float x) {
  const float lo = (-127.0f < x) ? x : -127.0f;
  return (lo < 127.0f) ? lo : 127.0f;
}

// Thread block per row (grid-stride over rows). Pass 1: block-wide absmax over non-outlier
// elements (a max: order-free). Pass 2: codes. All threads of the block take the same branches,
// so the __syncthreads() calls are uniform.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    vectorwise_quant_kernel(const T* __restrict__ a, int64_t rows, int64_t K, float threshold,
                            const uint8_t* __restrict__ col_mask, int8_t* __restrict__ q,
                            float* __restrict__ row_stats) {
  __shared__ float wmax[kThreads / 32];
  __shared__ int wbad[kThreads / 32];
  // threshold == 0 disables the split: nothing is an outlier, not even +-Inf.
  const bool split = threshold > 0.0f;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = a + r * K;
    int8_t* qrow = q + r * K;
    float m = 0.0f;
    bool bad = false;
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      const float v = load_f(row, c);
      // Outliers do not count for the scale; NaN compares false, stays in and poisons the row.
      if (!(split && abs_f(v) >= threshold)) absmax_fold(v, m, bad);
    }
    m = warp_max(m);
    bad = warp_any(bad);
    if (lane == 0) wmax[warp] = m, wbad[warp] = bad ? 1 : 0;
    __syncthreads();
    m = 0.0f;
    bad = false;
    for (int w = 0; w < nwarps; ++w) {
      m = wmax[w] > m ? wmax[w] : m;
      bad = bad || wbad[w] != 0;
    }
    __syncthreads();  // wmax / wbad are rewritten by the next row
    if (bad || m == 0.0f) {
      if (threadIdx.x == 0) row_stats[r] = bad ? bits_float(0x7fc00000u) : 0.0f;  // NAN
      for (int64_t c = threadIdx.x; c < K; c += blockDim.x) qrow[c] = 0;
      continue;
    }
    if (threadIdx.x == 0) row_stats[r] = m;
    const float scale = 127.0f / m;  // IEEE division (nvcc's default -prec-div=true)
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      const float v = load_f(row, c);
      // rintf rounds half to even, as nearbyint does in the CPU's default rounding mode.
      // Tiny absmax: 127 / m overflows, so divide first (blockscale.h, int8_scale_value).
      const float scaled =
          int8_scale_overflows(scale) ? __fmul_rn(__fdiv_rn(v, m), 127.0f) : __fmul_rn(v, scale);
      const float code = rintf(clamp127(scaled));
      int8_t out = (split && abs_f(v) >= threshold) ? int8_t(0) : int8_t(code);
      if (col_mask != nullptr && col_mask[c]) out = 0;
      qrow[c] = out;
    }
  }
}

// ---- dequantization -----------------------------------------------------------------------------

// out[i] = (q[i] * stats[i / K]) * (1 / 127), elementwise over rows * K (the row from RowCol).
__global__ void __launch_bounds__(kThreads)
    vectorwise_dequant_kernel(const int8_t* __restrict__ q, const float* __restrict__ stats,
                              int64_t total, int64_t K, float* __restrict__ out) {
  constexpr float kInv127 = 1.0f / 127.0f;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  RowCol rc(i0, stride, K);
  for (int64_t i = i0; i < total; i += stride, rc.advance())
    out[i] = mul_cpu(mul_cpu(float(q[i]), stats[rc.row]), kInv127);  // NaN row: the CPU's NaN
}

// out[i] = (float(C[i]) * (row[r] * col[n])) * (1 / 16129) + bias[n], i = r * N + n (RowCol).
template <typename TB, typename TO>
__global__ void __launch_bounds__(kThreads)
    mm_dequant_kernel(const int32_t* __restrict__ C, const float* __restrict__ row_stats,
                      const float* __restrict__ col_stats, const TB* __restrict__ bias,
                      int64_t total, int64_t N, TO* __restrict__ out) {
  constexpr float kInv127Sq = 1.0f / 16129.0f;  // 1 / (127 * 127)
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t i0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  RowCol rc(i0, stride, N);
  for (int64_t i = i0; i < total; i += stride, rc.advance()) {
    const int64_t r = rc.row, n = rc.col;
    float v = mul_cpu(mul_cpu(float(C[i]), mul_cpu(row_stats[r], col_stats[n])), kInv127Sq);
    if (bias != nullptr) v = add_cpu(v, to_float(bias[n]));
    store_f(out, i, v);
  }
}

// ---- int8 GEMM ----------------------------------------------------------------------------------

// Tiled C = A B^T with A [M, K], B [N, K], both K-contiguous: a 64 x 64 output tile per thread
// block of 256 threads, 4 x 4 outputs per thread, K consumed 32 bytes at a time. Each thread
// block stages 64 rows x 32 k of A and of B in shared memory as int32 words (word w of a row packs
// k = 4w .. 4w + 3, the lowest k in the low byte: the order of a little-endian load), and __dp4a
// multiplies four signed byte pairs and adds them to an int32 in one instruction. Rows are padded
// to 9 words so that the 16 distinct B rows a warp reads per step fall in 16 distinct banks.
constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kTileWords = kTileK / 4, kPad = kTileWords + 1;

// Loads the 16 bytes k0 .. k0 + 15 of row `row` (of `nrows`) of a [nrows, K] int8 matrix as four
// words; out-of-range rows and k read as 0, which adds nothing to a dot product. `vec`: K % 16 ==
// 0 and the base is 16-byte aligned, so an in-range chunk is one aligned 16-byte load.
__device__ __forceinline__ void load_chunk16(const int8_t* __restrict__ base, int64_t row,
                                             int64_t nrows, int64_t K, int64_t k0, bool vec,
                                             int32_t* w) {
  w[0] = w[1] = w[2] = w[3] = 0;
  if (row >= nrows || k0 >= K) return;
  const int8_t* p = base + row * K + k0;
  if (vec) {  // k0 is a multiple of 16 and K % 16 == 0, so the whole chunk is in range
    const int4 v = __ldg(reinterpret_cast<const int4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    return;
  }
  const int64_t len = K - k0 < 16 ? K - k0 : 16;
  for (int i = 0; i < len; ++i) w[i >> 2] |= int32_t(uint32_t(uint8_t(p[i])) << (8 * (i & 3)));
}

__global__ void __launch_bounds__(256)
    int8_gemm_tiled_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B,
                           int32_t* __restrict__ C, int64_t M, int64_t N, int64_t K, bool vec) {
  __shared__ int32_t As[kTileM][kPad];
  __shared__ int32_t Bs[kTileN][kPad];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  // Loader role: threads 0..127 load A, 128..255 load B; each one 16-byte half of one tile row.
  const int lrow = (tid & 127) >> 1, lhalf = tid & 1;
  const bool load_a = tid < 128;
  // Both tile loops stride over the grid (gridDim.x is capped on the host, gridDim.y is at most
  // 65535); their bounds are block-uniform, so the __syncthreads() below are never divergent.
  for (int64_t n0 = int64_t(blockIdx.x) * kTileN; n0 < N; n0 += int64_t(gridDim.x) * kTileN) {
    for (int64_t m0 = int64_t(blockIdx.y) * kTileM; m0 < M; m0 += int64_t(gridDim.y) * kTileM) {
      int32_t acc[4][4] = {};
      for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
        int32_t w[4];
        if (load_a) {
          load_chunk16(A, m0 + lrow, M, K, k0 + 16 * lhalf, vec, w);
#pragma unroll
          for (int i = 0; i < 4; ++i) As[lrow][4 * lhalf + i] = w[i];
        } else {
          load_chunk16(B, n0 + lrow, N, K, k0 + 16 * lhalf, vec, w);
#pragma unroll
          for (int i = 0; i < 4; ++i) Bs[lrow][4 * lhalf + i] = w[i];
        }
        __syncthreads();
#pragma unroll
        for (int kw = 0; kw < kTileWords; ++kw) {
          int32_t av[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) av[i] = As[ty + 16 * i][kw], bv[i] = Bs[tx + 16 * i][kw];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
      }
      // Thread (tx, ty) owns rows m0 + ty + 16i and columns n0 + tx + 16j: consecutive threads
      // write consecutive columns.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t n = n0 + tx + 16 * j;
          if (n < N) C[m * N + n] = acc[i][j];
        }
      }
    }
  }
}

// Few activation rows (decode): a 64 x 64 tile would leave most of its work idle, so a warp
// computes one output column n for up to kSkinnyRows rows at a time, streaming B's row n once per
// pass. With `vec` each lane takes 16-byte chunks (four dp4a per row), otherwise single bytes.
constexpr int kSkinnyRows = 4, kSkinnyMaxM = 8, kSkinnyWarps = 8;

__global__ void __launch_bounds__(kSkinnyWarps * 32)
    int8_gemm_skinny_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B,
                            int32_t* __restrict__ C, int64_t M, int64_t N, int64_t K, bool vec) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n = int64_t(blockIdx.x) * kSkinnyWarps + warp; n < N;
       n += int64_t(gridDim.x) * kSkinnyWarps) {
    const int8_t* b = B + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += kSkinnyRows) {
      const int mr = M - m0 < kSkinnyRows ? int(M - m0) : kSkinnyRows;
      int32_t acc[kSkinnyRows] = {};
      if (vec) {
        const int64_t nv = K >> 4;
        const int4* bv = reinterpret_cast<const int4*>(b);
        for (int64_t v = lane; v < nv; v += 32) {
          const int4 wb = __ldg(bv + v);
#pragma unroll
          for (int t = 0; t < kSkinnyRows; ++t) {
            if (t >= mr) break;
            const int4 wa = __ldg(reinterpret_cast<const int4*>(A + (m0 + t) * K) + v);
            acc[t] = __dp4a(wa.x, wb.x, acc[t]);
            acc[t] = __dp4a(wa.y, wb.y, acc[t]);
            acc[t] = __dp4a(wa.z, wb.z, acc[t]);
            acc[t] = __dp4a(wa.w, wb.w, acc[t]);
          }
        }
      } else {
        for (int64_t k = lane; k < K; k += 32) {
          const int32_t bk = b[k];
#pragma unroll
          for (int t = 0; t < kSkinnyRows; ++t)
            if (t < mr) acc[t] += int32_t(A[(m0 + t) * K + k]) * bk;
        }
      }
#pragma unroll
      for (int t = 0; t < kSkinnyRows; ++t) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(kFullMask, acc[t], o);
        if (lane == 0 && t < mr) C[(m0 + t) * N + n] = acc[t];
      }
    }
  }
}

}  // namespace

cudaError_t int8_outlier_columns(FloatType t, const void* a, int64_t rows, int64_t K,
                                 float threshold, uint8_t* mask, cudaStream_t stream) {
  if (K <= 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(mask, 0, size_t(K), stream);
  if (err != cudaSuccess || rows <= 0) return err;
  const int64_t ychunks = div_up(rows, kOutlierRowsPerThread);
  const dim3 grid(grid_for(K, kThreads), unsigned(ychunks < 65535 ? ychunks : 65535));
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    outlier_columns_kernel<T>
        <<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), rows, K, threshold, mask);
  });
  return cudaGetLastError();
}

cudaError_t int8_vectorwise_quant(FloatType t, const void* a, int64_t rows, int64_t K,
                                  float threshold, const uint8_t* col_mask, int8_t* q,
                                  float* row_stats, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  // K == 0 still runs: every row is "all zero" and gets row_stats 0, as on the CPU.
  const unsigned grid = grid_for(rows, 1);
  dispatch_float(t, [&](auto tag) {
    using T = decltype(tag);
    vectorwise_quant_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), rows, K,
                                                              threshold, col_mask, q, row_stats);
  });
  return cudaGetLastError();
}

cudaError_t int8_vectorwise_dequant(const int8_t* q, const float* stats, int64_t rows, int64_t K,
                                    float* out, cudaStream_t stream) {
  const int64_t total = rows * K;
  if (total <= 0) return cudaSuccess;
  vectorwise_dequant_kernel<<<grid_for(total, kThreads * 4), kThreads, 0, stream>>>(q, stats, total,
                                                                                    K, out);
  return cudaGetLastError();
}

cudaError_t int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                      cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (K <= 0) return cudaMemsetAsync(C, 0, size_t(M * N) * sizeof(int32_t), stream);
  const bool vec = K % 16 == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(B) % 16 == 0;
  if (M <= kSkinnyMaxM) {
    int8_gemm_skinny_kernel<<<grid_for(N, kSkinnyWarps), kSkinnyWarps * 32, 0, stream>>>(A, B, C, M,
                                                                                         N, K, vec);
  } else {
    // gridDim.x: N's tiles, capped (grid_for); gridDim.y (<= 65535): M's tiles. The kernel strides
    // over whatever the grid does not cover.
    const int64_t mt = div_up(M, kTileM);
    const dim3 grid(grid_for(N, kTileN), unsigned(mt < 65535 ? mt : 65535));
    int8_gemm_tiled_kernel<<<grid, 256, 0, stream>>>(A, B, C, M, N, K, vec);
  }
  return cudaGetLastError();
}

cudaError_t int8_mm_dequant(const int32_t* C, const float* row_stats, const float* col_stats,
                            FloatType bias_t, const void* bias, int64_t rows, int64_t N,
                            FloatType out_t, void* out, cudaStream_t stream) {
  const int64_t total = rows * N;
  if (total <= 0) return cudaSuccess;
  const unsigned grid = grid_for(total, kThreads * 4);
  dispatch_float(bias_t, [&](auto btag) {
    using TB = decltype(btag);
    dispatch_float(out_t, [&](auto otag) {
      using TO = decltype(otag);
      mm_dequant_kernel<TB, TO><<<grid, kThreads, 0, stream>>>(
          C, row_stats, col_stats, static_cast<const TB*>(bias), total, N, static_cast<TO*>(out));
    });
  });
  return cudaGetLastError();
}

}  // namespace lowbit::cuda
