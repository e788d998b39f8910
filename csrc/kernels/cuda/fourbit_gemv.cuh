// The SIMT GEMV of 4-bit weights for M <= 8 activation rows (the decode of one token, or a few).
//
// Memory-bound: every packed weight byte is read once, with 16-byte streaming loads, several in
// flight per lane; each decoded weight serves all M rows (M is a template parameter, so the row
// loops unroll into registers). Layout of the work:
//   * a thread block is 8 warps; warps are grouped KSPLIT at a time into column groups; a column
//     group owns COLS consecutive output features (W rows) j0 .. j0 + COLS - 1;
//   * W row j is K/2 bytes starting at byte j*K/2 (a multiple of 16 since K % 32 == 0), i.e. K/32
//     16-byte vectors; vector v holds elements k0 = 32v .. 32v + 31, byte i of it the elements
//     k0 + 2i (HIGH nibble) and k0 + 2i + 1 (low nibble);
//   * warp ks of the group (ks < KSPLIT) reads vectors v = 32*ks + lane + 32*KSPLIT*t (t >= 0):
//     consecutive lanes read consecutive vectors (a coalesced 512-byte request per warp), and the
//     group's warps interleave over K (split-K inside the block, for when N alone cannot fill the
//     SMs); U vectors per column are loaded before the first is used (U * COLS = 4 loads in
//     flight per lane for M <= 2, U * COLS = 2 for M = 3..8);
//   * each 32-bit word of a vector (8 weights) is decoded once per column and then multiplied
//     with the M rows one row at a time, so only 8 activations are live at once;
//   * all 32 elements of a vector share one group (groups are multiples of 32 elements, and the
//     flattened offset j*K + k0 is a multiple of 32), so the scale is read once per vector and
//     factored out of the vector's partial sum: acc += s * sum(x * code) (minus z * s * sum(x)
//     for an affine policy);
//   * fp32 accumulation, a warp reduction, then the KSPLIT warps' sums added in a fixed order
//     through shared memory (deterministic), rounded once to T.
#pragma once

#include "fourbit_internal.cuh"

namespace lowbit::cuda {

namespace {

constexpr int kWarps = 8;

// Eight consecutive elements of T from a 16-byte aligned address, widened to fp32. fp16/bf16: one
// 16-byte load; 32-bit word w holds element 2w in its low half (little endian), 2w+1 in its high
// half. fp32: two.
__device__ __forceinline__ void load_x8(const float* p, float* x) {
  const float4 u = __ldg(reinterpret_cast<const float4*>(p));
  const float4 v = __ldg(reinterpret_cast<const float4*>(p + 4));
  x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = v.x, x[5] = v.y, x[6] = v.z, x[7] = v.w;
}
template <typename T16>
__device__ __forceinline__ void load_x8(const T16* p, float* x) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = widen(T16{uint16_t(w[i] & 0xFFFFu)});
    x[2 * i + 1] = widen(T16{uint16_t(w[i] >> 16)});
  }
}

// Columns per warp group (COLS): each activation vector loaded from L1 serves COLS columns (the
// L1 traffic of x per weight byte is 4 * M / COLS, and L1 loads share the MIO pipe with the table
// shuffles). M = 1 takes 1, 2 or 4 (the plan's choice, measured by bench --tiers); M > 1 takes 2
// (more would exceed the register file at M = 8).
template <typename T, typename Policy, int MT, int KSPLIT, int COLS>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_4bit_fast_kernel(const T* __restrict__ a, int mr, int64_t K,
                          const uint8_t* __restrict__ packed, Policy pol, T* __restrict__ out,
                          int64_t N) {
  // Vectors per column per step: 4 16-byte weight loads in flight per lane for M <= 2. M = 3..8
  // keeps 2 (U = 1): each vector then feeds 4-8 rows of FMAs, which covers the load latency, and
  // the registers of the other two vectors are what made these kernels spill (or drop to one
  // block per SM) in the static resource check (tools/cuda_resources.sh).
  constexpr int U = (COLS >= 4 || MT >= 4) ? 1 : 4 / COLS;
  constexpr int kGroups = kWarps / KSPLIT;
  __shared__ float nested_code[Policy::kNested ? 256 : 1];
  __shared__ float red[KSPLIT > 1 ? kWarps : 1][COLS * MT];
  pol.setup(nested_code);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cg = warp / KSPLIT, ks = warp % KSPLIT;
  const int64_t j0 = (int64_t(blockIdx.x) * kGroups + cg) * COLS;
  const int64_t nvec = K >> 5;

  float acc[COLS][MT];
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[c][m] = 0.0f;

  // The loop bound is warp-uniform (every lane takes part in the table shuffles); lanes past the
  // end of the row decode a zero word and add nothing.
  for (int64_t base = int64_t(ks) * 32; base < nvec; base += int64_t(32) * KSPLIT * U) {
    uint4 wv[U][COLS];
    float s[U][COLS], z[U][COLS];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = base + int64_t(u) * 32 * KSPLIT + lane;
      ok[u] = v < nvec;
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        const int64_t j = j0 + c;
        s[u][c] = 0.0f, z[u][c] = 0.0f;
        wv[u][c] = make_uint4(0, 0, 0, 0);
        if (ok[u] && j < N) {
          wv[u][c] = ldg_stream16(packed + j * (K >> 1) + (v << 4));
          pol.group(j * K + (v << 5), s[u][c], z[u][c]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k0 = (base + int64_t(u) * 32 * KSPLIT + lane) << 5;
      float part[COLS][MT], xs[MT];
#pragma unroll
      for (int c = 0; c < COLS; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) part[c][m] = 0.0f;
#pragma unroll
      for (int m = 0; m < MT; ++m) xs[m] = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // word q: elements k0 + 8q .. k0 + 8q + 7
        // The 8 weights of word q of each column, decoded once (the table shuffles are
        // unconditional: every lane takes part) and used by all MT rows. Byte bi of the word is
        // bits [8bi, 8bi + 8): element 2bi in its HIGH nibble, 2bi + 1 in its low one; value()
        // ignores bits 4 and up of its argument.
        float wd[COLS][8];
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          const uint32_t w = (q == 0)   ? wv[u][c].x
                             : (q == 1) ? wv[u][c].y
                             : (q == 2) ? wv[u][c].z
                                        : wv[u][c].w;
#pragma unroll
          for (int bi = 0; bi < 4; ++bi) {
            wd[c][2 * bi] = pol.value(w >> (8 * bi + 4));
            wd[c][2 * bi + 1] = pol.value(w >> (8 * bi));
          }
        }
        // Then one row at a time: only 8 activations live at once (not 8 * MT), which keeps the
        // M = 4..8 kernels within 128 registers. Each part[c][m] still adds its 8 products in
        // element order.
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          float x[8];
          if (m < mr && ok[u]) {
            load_x8(a + m * K + k0 + 8 * q, x);
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = 0.0f;
          }
          if constexpr (Policy::kHasZero) {
#pragma unroll
            for (int i = 0; i < 8; ++i) xs[m] += x[i];
          }
#pragma unroll
          for (int c = 0; c < COLS; ++c)
#pragma unroll
            for (int i = 0; i < 8; ++i) part[c][m] += x[i] * wd[c][i];
        }
      }
#pragma unroll
      for (int c = 0; c < COLS; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if constexpr (Policy::kHasZero)
            acc[c][m] += s[u][c] * (part[c][m] - z[u][c] * xs[m]);
          else
            acc[c][m] += s[u][c] * part[c][m];
        }
    }
  }

#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[c][m] = warp_sum(acc[c][m]);

  if constexpr (KSPLIT == 1) {
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < COLS; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < mr && j0 + c < N) store_f(out, m * N + j0 + c, epilogue(pol, j0 + c, acc[c][m]));
    }
  } else {
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < COLS; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) red[warp][c * MT + m] = acc[c][m];
    }
    __syncthreads();
    // Thread t < kGroups * COLS * MT finishes one (group, column, row): the KSPLIT partial sums
    // in warp order.
    const int t = threadIdx.x;
    if (t < kGroups * COLS * MT) {
      const int g = t / (COLS * MT), i = t % (COLS * MT);
      const int c = i / MT, m = i % MT;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < KSPLIT; ++w) sum += red[g * KSPLIT + w][i];
      const int64_t j = (int64_t(blockIdx.x) * kGroups + g) * COLS + c;
      if (m < mr && j < N) store_f(out, m * N + j, epilogue(pol, j, sum));
    }
  }
}

template <typename T, typename Policy, int MT, int KSPLIT, int COLS>
cudaError_t launch_mt_ks(const T* a, int64_t M, int64_t K, const uint8_t* packed, const Policy& pol,
                         T* out, int64_t N, cudaStream_t stream) {
  constexpr int per_block = (kWarps / KSPLIT) * COLS;
  const int64_t blocks = div_up(N, per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  gemv_4bit_fast_kernel<T, Policy, MT, KSPLIT, COLS>
      <<<unsigned(blocks), kWarps * 32, 0, stream>>>(a, int(M), K, packed, pol, out, N);
  return cudaGetLastError();
}

template <typename T, typename Policy, int MT, int COLS>
cudaError_t launch_mt(const T* a, int64_t M, int64_t K, const uint8_t* packed, const Policy& pol,
                      T* out, int64_t N, int ksplit, cudaStream_t stream) {
  switch (ksplit) {
    case 1:
      return launch_mt_ks<T, Policy, MT, 1, COLS>(a, M, K, packed, pol, out, N, stream);
    case 2:
      return launch_mt_ks<T, Policy, MT, 2, COLS>(a, M, K, packed, pol, out, N, stream);
    case 4:
      return launch_mt_ks<T, Policy, MT, 4, COLS>(a, M, K, packed, pol, out, N, stream);
    default:
      return launch_mt_ks<T, Policy, MT, 8, COLS>(a, M, K, packed, pol, out, N, stream);
  }
}

}  // namespace

template <typename T, typename Policy>
cudaError_t launch_gemv_fast(const T* a, int64_t M, int64_t K, const uint8_t* packed,
                             const Policy& pol, T* out, int64_t N, int config,
                             cudaStream_t stream) {
  // config: warps per column group in bits 0-3, columns per group (M = 1 only) in bits 4-7.
  const int ksplit = config & 15, cols = config >> 4;
  if (M > 8) return cudaErrorInvalidValue;  // the kernels hold at most 8 rows in registers
  if (M == 1) {
    if (cols == 4) return launch_mt<T, Policy, 1, 4>(a, M, K, packed, pol, out, N, ksplit, stream);
    if (cols == 2) return launch_mt<T, Policy, 1, 2>(a, M, K, packed, pol, out, N, ksplit, stream);
    return launch_mt<T, Policy, 1, 1>(a, M, K, packed, pol, out, N, ksplit, stream);
  }
  if (M == 2) return launch_mt<T, Policy, 2, 2>(a, M, K, packed, pol, out, N, ksplit, stream);
  if (M <= 4) return launch_mt<T, Policy, 4, 2>(a, M, K, packed, pol, out, N, ksplit, stream);
  return launch_mt<T, Policy, 8, 2>(a, M, K, packed, pol, out, N, ksplit, stream);
}

// Explicit instantiations, one activation dtype per translation unit
// (fourbit_gemv_{f32,f16,bf16}.cu) so that the build compiles them in parallel.
#define LOWBIT_GEMV_FAST(T, S)                                                                 \
  template cudaError_t launch_gemv_fast<T, CodeTablePolicy<S>>(                                \
      const T*, int64_t, int64_t, const uint8_t*, const CodeTablePolicy<S>&, T*, int64_t, int, \
      cudaStream_t);

#define LOWBIT_GEMV_FAST_AFFINE(T)                                                                \
  template cudaError_t launch_gemv_fast<T, AffinePolicy>(const T*, int64_t, int64_t,              \
                                                         const uint8_t*, const AffinePolicy&, T*, \
                                                         int64_t, int, cudaStream_t);

}  // namespace lowbit::cuda
