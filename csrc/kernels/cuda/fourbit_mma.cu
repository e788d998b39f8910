// The tensor-core tier of the 4-bit product: out[M, N] = A[M, K] @ dequant(W)[N, K]^T for fp16 /
// bf16 activations and M from ~9 up to where dequantize + cuBLAS wins (the dispatch table in
// fourbit.cu). mma.sync m16n8k16 with fp32 accumulators (sm_80 and later, so sm_90 too).
//
// Tiles: a thread block of 4 warps computes a BM x 128 tile of out; warp w owns columns
// [32w, 32w + 32) of it (4 n8 tiles) and all BM rows (BM / 16 m16 tiles). K advances by k-tiles of
// KC chunks of 32 elements, staged in shared memory by a STAGES-deep cp.async pipeline (A rows and
// packed W rows, zero-filled past M, N and K). split > 1 (gridDim.z): block z takes every k-tile
// in its slice of K and writes fp32 partial sums to ws[z] (a second kernel adds them in order:
// deterministic); otherwise the tile is rounded once to T and stored.
//
// The k permutation that lets B fragments come straight out of packed words. mma's B fragment for
// lane (g = lane / 4, t = lane % 4) holds B[k][n = g] for k = 2t, 2t+1 (register 0) and 2t+8,
// 2t+9 (register 1) of the 16-wide k step; A's holds rows g and g+8 at the same k. A sum over k
// does not care in which order k is visited as long as A and B agree, so within each 32-element
// chunk, k step s (0, 1) maps its logical k to physical elements
//     2t, 2t+1 -> 8t + 4s + 0, 8t + 4s + 1        2t+8, 2t+9 -> 8t + 4s + 2, 8t + 4s + 3.
// Lane t then needs physical elements 8t .. 8t+7 of each row for both steps: for W, packed 32-bit
// word t of the row's 16-byte chunk (byte b = elements 8t + 2b (HIGH nibble) and 8t + 2b + 1
// (low nibble)), so step s takes bytes 2s and 2s+1; for A, one 16-byte load of elements 8t ..
// 8t + 7 (words 0, 1 for step 0 and 2, 3 for step 1). No ldmatrix, no byte shuffling.
//
// Each decoded weight is (code[q] - z) * s in fp32 (Policy, fourbit_decode.cuh), rounded once to
// the activation dtype: the same value dequantize_4bit(dtype) gives, so this tier computes what
// dequantize + matmul computes, up to the order of the fp32 sums.
#include <atomic>

#include "fourbit_internal.cuh"

namespace lowbit::cuda {

namespace {

constexpr int kMmaThreads = 128;
constexpr int kBN = 128;

// The kernel is built for every target architecture but only ever launched on sm_80 and later
// (plan_gemm_4bit checks the compute capability): older targets get a trap instead of the
// sm_80 instructions.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LOWBIT_MMA_UNSUPPORTED 1
#endif

#ifndef LOWBIT_MMA_UNSUPPORTED
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; bytes = 0 writes 16 zeros and reads nothing.
// LOWBIT_CUDASIM: the CPU simulator (tools/cudasim) emulates each PTX instruction below.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
#if defined(LOWBIT_CUDASIM)
  ::cudasim::cp_async16(const_cast<void*>(::cudasim::shared_from_cvta(smem_addr(dst))), src, bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(LOWBIT_CUDASIM)
  ::cudasim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(LOWBIT_CUDASIM)
  ::cudasim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Two fp32 to one packed pair: `lo` in bits 0-15 (the lower k), `hi` in bits 16-31.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<bfloat16_t>(float lo, float hi) {
#if defined(LOWBIT_CUDASIM)
  return ::cudasim::cvt_rn_bf16x2_f32(hi, lo);  // the asm's operand order
#else
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#endif
}
template <>
__device__ __forceinline__ uint32_t pack2<half_t>(float lo, float hi) {
#if defined(LOWBIT_CUDASIM)
  return ::cudasim::cvt_rn_f16x2_f32(hi, lo);
#else
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<bfloat16_t>(float* c, uint32_t a0, uint32_t a1,
                                                     uint32_t a2, uint32_t a3, uint32_t b0,
                                                     uint32_t b1) {
#if defined(LOWBIT_CUDASIM)
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  ::cudasim::mma_m16n8k16(c, a, b, c, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<half_t>(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                                 uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(LOWBIT_CUDASIM)
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  ::cudasim::mma_m16n8k16(c, a, b, c, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

#else
__device__ __forceinline__ void cp_async16(void*, const void*, bool) { __trap(); }
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float, float) {
  __trap();
  return 0;
}
template <typename T>
__device__ __forceinline__ void mma16816(float*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t,
                                         uint32_t) {
  __trap();
}
#endif  // LOWBIT_MMA_UNSUPPORTED

// Shared memory of one stage. A: BM rows of KC*32 elements (64*KC bytes) plus 64 bytes of padding,
// so that the pitch is 64 (mod 128) bytes: the two rows that one quarter-warp's 16-byte reads
// touch land in different halves of the 32 banks. W: 128 rows of KC 16-byte chunks plus 16 bytes,
// so that the 8 rows read by one warp's 32-bit loads (pitch 4KC + 4 words) hit distinct banks.
template <int BM, int KC>
struct MmaSmem {
  static constexpr int kPitchA = 64 * KC + 64;
  static constexpr int kPitchW = 16 * KC + 16;
  static constexpr int kStageA = BM * kPitchA;
  static constexpr int kStage = kStageA + kBN * kPitchW;
};

// Min 3 blocks per SM: the dynamic shared memory (55-60 KB per block) allows at most 3 on sm_90
// and 2 on sm_80 anyway, so this only tells ptxas it may use up to 168 registers. Without it,
// ptxas aimed at register counts for 4-5 blocks that the shared memory never allows and spilled
// (the 16-row configuration: 12 bytes at 96 registers, tools/cuda_resources.sh).
template <typename T, typename Policy, int BM, int KC, int STAGES>
__global__ void __launch_bounds__(kMmaThreads, 3)
    mma_4bit_kernel(const T* __restrict__ a, int64_t M, int64_t K,
                    const uint8_t* __restrict__ packed, Policy pol, T* __restrict__ out,
                    float* __restrict__ ws, int64_t N, int tiles_per_split) {
  using S = MmaSmem<BM, KC>;
  constexpr int MT = BM / 16;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float nested_code[Policy::kNested ? 256 : 1];
  pol.setup(nested_code);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t KT = (K + 32 * KC - 1) / (32 * KC);
  const int64_t kt_begin = int64_t(blockIdx.z) * tiles_per_split;
  const int64_t kt_end = kt_begin + tiles_per_split < KT ? kt_begin + tiles_per_split : KT;
  const int64_t ntiles = kt_end > kt_begin ? kt_end - kt_begin : 0;
  const int64_t row_bytes = K >> 1;

  // Stage `st` <- k-tile kt: A [BM, 32KC] as 16-byte pieces of 8 elements, W [128 rows, KC
  // chunks of 16 bytes]; everything outside M, N or K is zero-filled.
  auto load_stage = [&](int st, int64_t kt) {
    uint8_t* sa = smem + st * S::kStage;
    uint8_t* sw = sa + S::kStageA;
    const int64_t kb = kt * 32 * KC;
    for (int i = tid; i < BM * KC * 4; i += kMmaThreads) {
      const int r = i / (KC * 4), p = i % (KC * 4);
      const int64_t m = m0 + r, k = kb + 8 * p;
      const bool ok = m < M && k < K;
      cp_async16(sa + r * S::kPitchA + 16 * p, ok ? a + m * K + k : a, ok);
    }
    for (int i = tid; i < kBN * KC; i += kMmaThreads) {
      const int r = i / KC, c = i % KC;
      const int64_t n = n0 + r, k = kb + 32 * c;
      const bool ok = n < N && k < K;
      cp_async16(sw + r * S::kPitchW + 16 * c, ok ? packed + n * row_bytes + (k >> 1) : packed, ok);
    }
  };

  float acc[MT][4][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_stage(s, kt_begin + s);
    cp_async_commit();
  }
  __syncthreads();  // the staged nested code (Policy::setup) is visible from here on

  for (int64_t it = 0; it < ntiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` landed for every thread; the stage refilled below is free
    {
      const int64_t nxt = it + STAGES - 1;
      if (nxt < ntiles) load_stage(int(nxt % STAGES), kt_begin + nxt);
      cp_async_commit();
    }
    const uint8_t* sa = smem + int(it % STAGES) * S::kStage;
    const uint8_t* sw = sa + S::kStageA;
    const int64_t kb = (kt_begin + it) * 32 * KC;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      const int64_t kc = kb + 32 * c;
      if (kc >= K) break;  // warp-uniform: the K tail of the last tile
      uint4 af[MT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        af[i][0] =
            *reinterpret_cast<const uint4*>(sa + (16 * i + g) * S::kPitchA + 64 * c + 16 * t);
        af[i][1] =
            *reinterpret_cast<const uint4*>(sa + (16 * i + g + 8) * S::kPitchA + 64 * c + 16 * t);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int nl = 32 * warp + 8 * j + g;  // this lane's W row in the tile
        const int64_t n = n0 + nl;
        const uint32_t w =
            *reinterpret_cast<const uint32_t*>(sw + nl * S::kPitchW + 16 * c + 4 * t);
        float s = 0.0f, z = 0.0f;
        if (n < N) pol.group(n * K + kc, s, z);
        uint32_t b[4];
#pragma unroll
        for (int bi = 0; bi < 4; ++bi)  // byte bi: element 8t + 2bi high nibble, + 1 low nibble
          b[bi] = pack2<T>(decode_weight(pol, w >> (8 * bi + 4), s, z),
                           decode_weight(pol, w >> (8 * bi), s, z));
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma16816<T>(acc[i][j], af[i][0].x, af[i][1].x, af[i][0].y, af[i][1].y, b[0], b[1]);
          mma16816<T>(acc[i][j], af[i][0].z, af[i][1].z, af[i][0].w, af[i][1].w, b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Accumulator r of tile (i, j): row 16i + g (+8 for r >= 2), column 32w + 8j + 2t + (r & 1).
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t m = m0 + 16 * i + g + (r >= 2 ? 8 : 0);
        const int64_t n = n0 + 32 * warp + 8 * j + 2 * t + (r & 1);
        if (m < M && n < N) {
          if (ws != nullptr)
            ws[int64_t(blockIdx.z) * M * N + m * N + n] = acc[i][j][r];
          else
            store_f(out, m * N + n, epilogue(pol, n, acc[i][j][r]));
        }
      }
}

// out[i] = sum over z of ws[z][i] in z order (+ bias[i % cols] when the policy has a bias: the
// affine format's fp32 bias), rounded once to T.
template <typename T>
__global__ void __launch_bounds__(256)
    splitk_reduce_kernel(const float* __restrict__ ws, int split, int64_t n, T* __restrict__ out,
                         const float* __restrict__ bias, int64_t cols) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float s = ws[i];
    for (int z = 1; z < split; ++z) s += ws[int64_t(z) * n + i];
    if (bias != nullptr) s = __fadd_rn(s, bias[i % cols]);
    store_f(out, i, s);
  }
}

template <typename T, typename Policy, int BM, int KC, int STAGES>
cudaError_t launch_cfg(const T* a, int64_t M, int64_t K, const uint8_t* packed, const Policy& pol,
                       T* out, float* ws, int split, int64_t N, cudaStream_t stream) {
  using S = MmaSmem<BM, KC>;
  constexpr int smem = S::kStage * STAGES;
  auto kernel = mma_4bit_kernel<T, Policy, BM, KC, STAGES>;
  if (smem > 48 * 1024) {
    // Above 48 KB a kernel must opt in, once per device: on the first launch there, which is an
    // eager one (torch.cuda.graph and torch.compile's cudagraphs run a warm-up before capturing),
    // so no attribute call happens while a stream is being captured. Devices past 63 set it on
    // every launch.
    static std::atomic<uint64_t> done{0};
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
    if (bit == 0 || (done.load(std::memory_order_relaxed) & bit) == 0) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      done.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const int64_t KT = div_up(K, 32 * KC);
  const int64_t tps = div_up(KT, split);
  const dim3 grid(unsigned(div_up(N, kBN)), unsigned(div_up(M, BM)), unsigned(div_up(KT, tps)));
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  const bool partial = grid.z > 1;
  kernel<<<grid, kMmaThreads, smem, stream>>>(a, M, K, packed, pol, out, partial ? ws : nullptr, N,
                                              int(tps));
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || !partial) return e;
  splitk_reduce_kernel<T><<<grid_for(M * N, 256 * 4, 4096), 256, 0, stream>>>(
      ws, int(grid.z), M * N, out, policy_bias(pol), N);
  return cudaGetLastError();
}

}  // namespace

int mma_4bit_bm(int config) { return config == 0 ? 16 : (config == 1 ? 32 : 64); }
int mma_4bit_kc(int config) { return config == 2 ? 2 : 4; }

template <typename T, typename Policy>
cudaError_t launch_mma(const T* a, int64_t M, int64_t K, const uint8_t* packed, const Policy& pol,
                       T* out, float* ws, int split, int64_t N, int config, cudaStream_t stream) {
  switch (config) {
    case 0:
      return launch_cfg<T, Policy, 16, 4, 4>(a, M, K, packed, pol, out, ws, split, N, stream);
    case 1:
      return launch_cfg<T, Policy, 32, 4, 3>(a, M, K, packed, pol, out, ws, split, N, stream);
    default:
      return launch_cfg<T, Policy, 64, 2, 3>(a, M, K, packed, pol, out, ws, split, N, stream);
  }
}

#define LOWBIT_MMA(T, S)                                                                      \
  template cudaError_t launch_mma<T, CodeTablePolicy<S>>(                                     \
      const T*, int64_t, int64_t, const uint8_t*, const CodeTablePolicy<S>&, T*, float*, int, \
      int64_t, int, cudaStream_t);
LOWBIT_MMA(half_t, const float*)
LOWBIT_MMA(half_t, BlockAbsmax)
LOWBIT_MMA(bfloat16_t, const float*)
LOWBIT_MMA(bfloat16_t, BlockAbsmax)
#undef LOWBIT_MMA
template cudaError_t launch_mma<half_t, AffinePolicy>(const half_t*, int64_t, int64_t,
                                                      const uint8_t*, const AffinePolicy&, half_t*,
                                                      float*, int, int64_t, int, cudaStream_t);
template cudaError_t launch_mma<bfloat16_t, AffinePolicy>(const bfloat16_t*, int64_t, int64_t,
                                                          const uint8_t*, const AffinePolicy&,
                                                          bfloat16_t*, float*, int, int64_t, int,
                                                          cudaStream_t);

}  // namespace lowbit::cuda
