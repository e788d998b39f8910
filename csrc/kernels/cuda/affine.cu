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
#include <cstring>
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

// ---- the product at M <= 8 where the 4-bit tiers do not run ------------------------------------
// 8-bit codes (any group size), 4-bit codes in groups that are not a multiple of 32 (or K % 32 !=
// 0), and misaligned data: a SIMT GEMV in the shape of fourbit_gemv.cuh (before it, every such
// call dequantized the whole weight for cuBLAS: at 8 bits and M = 1, twice the bf16 traffic).
// Memory-bound, so every code byte is read once, 16 bytes per load, kAgU * kAgCols = 4 loads in
// flight per lane (2 at M > 2); each decoded code serves all M rows (MT, a template parameter,
// 1/2/4/8).
//   * A block is kAgWarps = 8 warps, in column groups of KSPLIT warps; a group owns kAgCols = 2
//     consecutive output features j0, j0 + 1 (W rows). Warp ks of the group reads the vectors
//     v = 32 * ks + lane + 32 * KSPLIT * t of its rows (consecutive lanes, consecutive vectors:
//     512 contiguous bytes per warp and load), so the KSPLIT warps split K inside the block when N
//     alone leaves the SMs short of warps (plan_gemm_affine, the 4-bit gemv's rule); their sums are
//     added in warp order through shared memory (deterministic), no workspace.
//   * Vector v of row j: VE = 128 / BITS elements k0 = VE * v .. k0 + VE - 1, 16 bytes. kVec (K %
//     VE == 0, packed and a 16-byte aligned): the bytes j * K * BITS / 8 + 16 v .. + 15, a
//     multiple of 16 from an aligned base, one 16-byte load; 8-bit: byte b = element k0 + b;
//     4-bit: byte b = elements k0 + 2b (HIGH nibble: the flat index j * K + k0 + 2b is even since
//     K and k0 are) and k0 + 2b + 1 (low). !kVec (any K, any alignment): the same 16 bytes built
//     code by code from the flat index (affine_code), 0 past the row's end, and A read element by
//     element: never a vector load from an address that is not 16-byte aligned.
//   * Word w of the vector (little endian) holds bytes 4w .. 4w + 3, byte b at bits [8(b & 3),
//     8(b & 3) + 8). Piece p = elements 8p .. 8p + 7: 8-bit words 2p, 2p + 1 (element i in word 2p
//     + i / 4, byte i % 4), 4-bit word p (element i in byte i / 2, bits 4..7 when i is even).
//     float(q) without a conversion: the fp32 with bits 0x4B000000 | q is 2^23 + q exactly, minus
//     2^23 leaves q (8-bit: one PRMT builds the word, __byte_perm selector 0x7440 | b takes byte b
//     of the code word, then byte 0 (0x00) twice and byte 3 (0x4B) of 0x4B000000).
//   * Groups: g(j, k) = (j * K + k) / gs = j * (K / gs) + k / gs (gs divides K), k / gs a 32-bit
//     multiply-high division (FastDiv32, K < 2^31). A chunk of 16 elements (two pieces, k0c a
//     multiple of 16) inside one group, always so when gs % 16 == 0 and otherwise when its
//     offset in the group r = k0c - gs * (k0c / gs) has r + (its valid elements) <= gs, reads
//     s, z once and adds s * sum x * (q - z): the CPU's decode (float(q) - zero) * scale with the
//     scale moved out of the 16-term sum (a multiply per chunk instead of one per weight). Not
//     the 4-bit gemv's s * (sum x * q - z * sum x), nor q * s + (-z * s) per weight: with 8-bit
//     codes both cancel (sum x * q and z * sum x near 255 * sum x, their difference small when
//     q ~ z), and on codes 250..255 with zeros 252.5 and positive activations they miss the
//     fp32 tolerance of the tests (relative error 2.4e-5 > 1e-5 in an fp32 model of the sums),
//     where q - z (exact for integer zeros, one rounding for fractional ones) stays at 1e-7. It
//     also drops the per-row sum x (MT adds per element). A chunk that crosses a group boundary
//     decodes each weight in full, as the CPU does, for s = 1. A NaN scale makes the chunk's sum
//     NaN and a zero scale a zero (finite x), as on the CPU.
//   * The fp32 bias is added to the sum before the one rounding to T, as on the CPU.
constexpr int kAgWarps = 8;
constexpr int kAgCols = 2;      // columns per warp group
constexpr int kAgOwn = 1 << 8;  // Gemm4Plan::config: this kernel, not the 4-bit family's gemv
constexpr int kAgMaxSplit = 8;

// Eight consecutive elements of T at a 16-byte aligned address, widened to fp32 (exact). 16-bit:
// word w holds element 2w in its low half.
__device__ __forceinline__ void ag_load_x8(const float* p, float* x) {
  const float4 u = __ldg(reinterpret_cast<const float4*>(p));
  const float4 v = __ldg(reinterpret_cast<const float4*>(p + 4));
  x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = v.x, x[5] = v.y, x[6] = v.z, x[7] = v.w;
}
template <typename T16>
__device__ __forceinline__ void ag_load_x8(const T16* p, float* x) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = widen(T16{uint16_t(w[i] & 0xFFFFu)});
    x[2 * i + 1] = widen(T16{uint16_t(w[i] >> 16)});
  }
}
__device__ __forceinline__ float ag_widen(float v) { return v; }
template <typename T16>
__device__ __forceinline__ float ag_widen(T16 v) {
  return widen(v);
}

__device__ __forceinline__ uint32_t ag_word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// float(code) of element i (0..7) of piece p of vector v (the layout above); i, p compile-time.
template <int BITS>
__device__ __forceinline__ float ag_code(const uint4& v, int p, int i) {
  if constexpr (BITS == 8) {
    const uint32_t w = ag_word(v, 2 * p + (i >> 2));
    return __fsub_rn(__uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | (i & 3))), 8388608.0f);
  } else {
    const uint32_t w = ag_word(v, p);
    const int sh = 8 * (i >> 1) + ((i & 1) ? 0 : 4);
    return __fsub_rn(__uint_as_float(0x4B000000u | ((w >> sh) & 15u)), 8388608.0f);
  }
}

// The 16 code bytes of vector v of row j in the vector layout, from any alignment and any K.
template <int BITS>
__device__ __forceinline__ uint4 ag_gather(const uint8_t* __restrict__ packed, int64_t j, int64_t K,
                                           int64_t k0) {
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  const int64_t e0 = j * K + k0;
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    uint32_t byte;
    if constexpr (BITS == 8) {
      byte = k0 + b < K ? uint32_t(__ldg(packed + e0 + b)) : 0u;
    } else {
      const uint32_t hi = k0 + 2 * b < K ? uint32_t(affine_code(packed, 4, e0 + 2 * b)) : 0u;
      const uint32_t lo =
          k0 + 2 * b + 1 < K ? uint32_t(affine_code(packed, 4, e0 + 2 * b + 1)) : 0u;
      byte = (hi << 4) | lo;
    }
    w[b >> 2] |= byte << (8 * (b & 3));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

struct AgArgs {
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  const float* bias;      // fp32 [N] or null
  int64_t K, N, gs, gpr;  // gpr = K / gs, groups per row
  FastDiv32 gdiv;         // divides by gs
  bool gs16;              // gs % 16 == 0: every 16-element chunk lies in one group
};

template <typename T, int BITS, int MT, int KSPLIT, bool kVec>
__device__ __forceinline__ void gemv_affine_body(const T* __restrict__ a, int mr, const AgArgs& g,
                                                 T* __restrict__ out) {
  constexpr int VE = 128 / BITS;    // elements per 16-byte vector
  constexpr int kChunks = VE / 16;  // 16-element chunks per vector
  constexpr int kGroups = kAgWarps / KSPLIT;
  // Vectors per column loaded before the first is used: 4 loads in flight per lane at M <= 2, 2
  // at M > 2 (more arithmetic per byte, and 4 would push the 4-row instantiations past 128
  // registers).
  constexpr int kAgU = MT <= 2 ? 2 : 1;
  __shared__ float red[KSPLIT > 1 ? kAgWarps : 1][kAgCols * MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cg = warp / KSPLIT, ks = warp % KSPLIT;
  const int64_t K = g.K, N = g.N;
  const int64_t j0 = (int64_t(blockIdx.x) * kGroups + cg) * kAgCols;
  const int64_t nvec = (K + VE - 1) / VE;
  const int64_t row_bytes = K * BITS / 8;  // kVec only (K % VE == 0)

  float acc[kAgCols][MT];
#pragma unroll
  for (int c = 0; c < kAgCols; ++c)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[c][m] = 0.0f;

  for (int64_t v0 = int64_t(ks) * 32 + lane; v0 < nvec; v0 += int64_t(32) * KSPLIT * kAgU) {
    uint4 wv[kAgU][kAgCols];
#pragma unroll
    for (int u = 0; u < kAgU; ++u) {
      const int64_t v = v0 + int64_t(u) * 32 * KSPLIT;
#pragma unroll
      for (int c = 0; c < kAgCols; ++c) {
        const int64_t j = j0 + c;
        wv[u][c] = make_uint4(0u, 0u, 0u, 0u);
        if (v < nvec && j < N) {
          if constexpr (kVec)
            wv[u][c] = ldg_stream16(g.packed + j * row_bytes + v * 16);
          else
            wv[u][c] = ag_gather<BITS>(g.packed, j, K, v * VE);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kAgU; ++u) {
      const int64_t v = v0 + int64_t(u) * 32 * KSPLIT;
      if (v >= nvec) break;  // later u are further along K
#pragma unroll
      for (int h = 0; h < kChunks; ++h) {
        const int64_t kc = v * VE + 16 * h;  // the chunk's first element
        if (!kVec && kc >= K) break;
        const int nvalid = K - kc < 16 ? int(K - kc) : 16;
        float s[kAgCols], z[kAgCols];
        bool mixed[kAgCols];
        const uint32_t kq = g.gdiv.div(uint32_t(kc));  // kc's group within the row
#pragma unroll
        for (int c = 0; c < kAgCols; ++c) {
          const int64_t j = j0 + c;
          s[c] = 0.0f, z[c] = 0.0f, mixed[c] = false;
          if (j >= N) continue;
          mixed[c] = !g.gs16 && int64_t(uint32_t(kc) - kq * uint32_t(g.gs)) + nvalid > g.gs;
          if (mixed[c]) {
            s[c] = 1.0f;
          } else {
            const int64_t gi = j * g.gpr + kq;
            s[c] = __ldg(g.scales + gi), z[c] = __ldg(g.zeros + gi);
          }
        }
        float part[kAgCols][MT];
#pragma unroll
        for (int c = 0; c < kAgCols; ++c)
#pragma unroll
          for (int m = 0; m < MT; ++m) part[c][m] = 0.0f;
#pragma unroll
        for (int p2 = 0; p2 < 2; ++p2) {
          const int p = 2 * h + p2;        // piece of the vector
          const int64_t kp = kc + 8 * p2;  // its first element
          float x[MT][8];
#pragma unroll
          for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int i = 0; i < 8; ++i) x[m][i] = 0.0f;
            if (m < mr) {
              if constexpr (kVec) {
                ag_load_x8(a + m * K + kp, x[m]);
              } else {
#pragma unroll
                for (int i = 0; i < 8; ++i)
                  if (kp + i < K) x[m][i] = ag_widen(a[m * K + kp + i]);
              }
            }
          }
#pragma unroll
          for (int c = 0; c < kAgCols; ++c) {
            float w[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) w[i] = ag_code<BITS>(wv[u][c], p, i);
            if (!mixed[c]) {
#pragma unroll
              for (int i = 0; i < 8; ++i) w[i] = __fsub_rn(w[i], z[c]);  // q - z, one rounding
            } else {  // the chunk crosses a group boundary: each weight decoded in full
              const int64_t j = j0 + c;
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                if (kp + i < K) {
                  const int64_t gi = j * g.gpr + g.gdiv.div(uint32_t(kp + i));
                  w[i] = __fmul_rn(__fsub_rn(w[i], __ldg(g.zeros + gi)), __ldg(g.scales + gi));
                } else {
                  w[i] = 0.0f;
                }
              }
            }
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
              for (int i = 0; i < 8; ++i) part[c][m] += x[m][i] * w[i];
          }
        }
#pragma unroll
        for (int c = 0; c < kAgCols; ++c)
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[c][m] += s[c] * part[c][m];
      }
    }
  }

#pragma unroll
  for (int c = 0; c < kAgCols; ++c)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[c][m] = warp_sum(acc[c][m]);

  auto finish = [&](int64_t j, int m, float sum) {
    const float v = g.bias != nullptr ? __fadd_rn(sum, __ldg(g.bias + j)) : sum;
    store_f(out, m * N + j, v);
  };
  if constexpr (KSPLIT == 1) {
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kAgCols; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < mr && j0 + c < N) finish(j0 + c, m, acc[c][m]);
    }
  } else {
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kAgCols; ++c)
#pragma unroll
        for (int m = 0; m < MT; ++m) red[warp][c * MT + m] = acc[c][m];
    }
    __syncthreads();
    // Thread t < kGroups * kAgCols * MT finishes one (group, column, row): the KSPLIT partial sums
    // in warp order.
    const int t = threadIdx.x;
    if (t < kGroups * kAgCols * MT) {
      const int gi = t / (kAgCols * MT), i = t % (kAgCols * MT);
      const int c = i / MT, m = i % MT;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < KSPLIT; ++w) sum += red[gi * KSPLIT + w][i];
      const int64_t j = (int64_t(blockIdx.x) * kGroups + gi) * kAgCols + c;
      if (m < mr && j < N) finish(j, m, sum);
    }
  }
}

// Three entry points, the body's only difference the register bound. Left to ptxas, instantiations
// at M <= 2 got 64 or 80 registers and some spilled 4-12 bytes (which ones moved with every edit,
// on sm_80 or sm_90); at least two blocks per SM (<= 128 registers) compiles them without a spill.
// 8-bit fp32 at M = 3..4 spilled 4 bytes at 128 registers on sm_90 and gets the whole register file
// (one block per SM). The others keep ptxas's choice (8-bit M = 1: 64 / 80 registers on sm_80 /
// sm_90, three or four blocks of 8 warps per SM).
template <typename T, int BITS, int MT, int KSPLIT, bool kVec>
__global__ void __launch_bounds__(kAgWarps * 32)
    gemv_affine_kernel(const T* __restrict__ a, int mr, AgArgs g, T* __restrict__ out) {
  gemv_affine_body<T, BITS, MT, KSPLIT, kVec>(a, mr, g, out);
}
template <typename T, int BITS, int MT, int KSPLIT, bool kVec>
__global__ void __launch_bounds__(kAgWarps * 32, 2)
    gemv_affine_kernel_2blocks(const T* __restrict__ a, int mr, AgArgs g, T* __restrict__ out) {
  gemv_affine_body<T, BITS, MT, KSPLIT, kVec>(a, mr, g, out);
}

template <typename T, int BITS, int MT, int KSPLIT, bool kVec>
__global__ void __launch_bounds__(kAgWarps * 32, 1)
    gemv_affine_kernel_1block(const T* __restrict__ a, int mr, AgArgs g, T* __restrict__ out) {
  gemv_affine_body<T, BITS, MT, KSPLIT, kVec>(a, mr, g, out);
}

template <typename T, int BITS, int MT, int KSPLIT, bool kVec>
cudaError_t ag_launch(const T* a, int64_t M, const AgArgs& g, T* out, cudaStream_t stream) {
  const int64_t blocks = div_up(g.N, (kAgWarps / KSPLIT) * kAgCols);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if constexpr (MT == 4 && BITS == 8 && kVec && std::is_same_v<T, float>)
    gemv_affine_kernel_1block<T, BITS, MT, KSPLIT, kVec>
        <<<unsigned(blocks), kAgWarps * 32, 0, stream>>>(a, int(M), g, out);
  else if constexpr (MT == 2 || (MT == 1 && !(BITS == 8 && kVec)))
    gemv_affine_kernel_2blocks<T, BITS, MT, KSPLIT, kVec>
        <<<unsigned(blocks), kAgWarps * 32, 0, stream>>>(a, int(M), g, out);
  else
    gemv_affine_kernel<T, BITS, MT, KSPLIT, kVec>
        <<<unsigned(blocks), kAgWarps * 32, 0, stream>>>(a, int(M), g, out);
  return cudaGetLastError();
}

template <typename T, int BITS, int MT, bool kVec>
cudaError_t ag_launch_ks(const T* a, int64_t M, const AgArgs& g, T* out, int ks,
                         cudaStream_t stream) {
  if constexpr (!kVec) {  // the rare narrow-load path: two splits, to keep the build small
    if (ks >= 4) return ag_launch<T, BITS, MT, 4, kVec>(a, M, g, out, stream);
    return ag_launch<T, BITS, MT, 1, kVec>(a, M, g, out, stream);
  } else {
    switch (ks) {
      case 1:
        return ag_launch<T, BITS, MT, 1, kVec>(a, M, g, out, stream);
      case 2:
        return ag_launch<T, BITS, MT, 2, kVec>(a, M, g, out, stream);
      case 4:
        return ag_launch<T, BITS, MT, 4, kVec>(a, M, g, out, stream);
      default:
        return ag_launch<T, BITS, MT, 8, kVec>(a, M, g, out, stream);
    }
  }
}

// Rows held in registers: MT = 1, 2, 4 or 8 >= M (rows m >= M idle); the narrow-load path only
// 1 or 8 (build size; it is the fallback for misaligned data and K % 16 != 0).
template <typename T, int BITS, bool kVec>
cudaError_t ag_launch_m(const T* a, int64_t M, const AgArgs& g, T* out, int ks,
                        cudaStream_t stream) {
  if (M == 1) return ag_launch_ks<T, BITS, 1, kVec>(a, M, g, out, ks, stream);
  if constexpr (kVec) {
    if (M == 2) return ag_launch_ks<T, BITS, 2, kVec>(a, M, g, out, ks, stream);
    if (M <= 4) return ag_launch_ks<T, BITS, 4, kVec>(a, M, g, out, ks, stream);
  }
  return ag_launch_ks<T, BITS, 8, kVec>(a, M, g, out, ks, stream);
}

// Shapes the kernel takes: M <= 8 (rows in registers), K < 2^31 (32-bit group division).
bool affine_gemv_ok(int64_t M, int64_t N, int64_t K, int64_t group_size) {
  return M >= 1 && M <= 8 && N >= 1 && K > 0 && K < (int64_t(1) << 31) && group_size > 0 &&
         group_size <= K;
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
  if (sm_count < 1) sm_count = 1;
  const bool forced = force != nullptr && force[0] != 0;
  // "dequant" and "generic" pin dequantize + cuBLAS (the affine format's stand-in for the generic
  // kernel); "affgemv[:W]" pins gemv_affine_kernel (also for shapes the 4-bit tiers take, so tests
  // can compare the two); "gemv:W" sets its warps per column as it does for the 4-bit gemv.
  const bool want_dequant =
      forced && (std::strncmp(force, "dequant", 7) == 0 || std::strncmp(force, "generic", 7) == 0);
  const bool want_own = forced && std::strncmp(force, "affgemv", 7) == 0;
  if (affine_fast_ok(bits, group_size, N, K) && !want_own) {
    p = plan_gemm_4bit(t, M, N, K, a_aligned16, packed_aligned16, cc, sm_count, force);
    if (p.tier != Gemm4Tier::generic) return p;
    // Misaligned A or packed data: gemv_affine_kernel (its narrow-load path) at M <= 8, else
    // dequantize + cuBLAS (the dequantize kernel takes any alignment).
    p = Gemm4Plan{Gemm4Tier::dequant_gemm, 0, 1, 0};
  }
  if (want_dequant || !affine_gemv_ok(M, N, K, group_size)) return p;
  // Warps per column group, the 4-bit gemv's rule (plan_gemm_4bit): split K inside the block while
  // the column groups leave the SMs short of 48 warps each and every warp keeps >= 2 vectors per
  // lane.
  const int ve = 128 / bits;
  const int64_t groups = div_up(N, kAgCols), nvec = div_up(K, ve);
  int ks = 1;
  while (ks < kAgMaxSplit && groups * ks < int64_t(48) * sm_count && nvec / (32 * ks * 2) >= 2)
    ks *= 2;
  if (forced) {  // "gemv:W" or "affgemv:W"
    const char* c = std::strchr(force, ':');
    const int w = c != nullptr ? c[1] - '0' : 0;
    if (w == 1 || w == 2 || w == 4 || w == 8) ks = w;
  }
  p = Gemm4Plan{Gemm4Tier::gemv, ks | (kAgCols << 4) | kAgOwn, 1, 0};
  return p;
}

cudaError_t gemm_affine(const Gemm4Plan& plan, FloatType t, const void* a, int64_t M, int64_t K,
                        const uint8_t* packed, const float* scales, const float* zeros,
                        int64_t group_size, int bits, const float* bias, void* out, int64_t N,
                        float* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (bits != 4 && bits != 8) return cudaErrorInvalidValue;
  if (plan.tier == Gemm4Tier::gemv && (plan.config & kAgOwn) != 0) {
    if (!affine_gemv_ok(M, N, K, group_size) || K % group_size != 0) return cudaErrorInvalidValue;
    AgArgs g{packed,
             scales,
             zeros,
             bias,
             K,
             N,
             group_size,
             K / group_size,
             FastDiv32::make(uint32_t(group_size)),
             group_size % 16 == 0};
    const int ks = plan.config & 15;
    // The vector path only where every 16-byte load it makes is aligned (see the kernel).
    const bool vec = K % (128 / bits) == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a) % 16 == 0;
    cudaError_t err = cudaErrorInvalidValue;
    dispatch_float(t, [&](auto tag) {
      using T = decltype(tag);
      const T* ap = static_cast<const T*>(a);
      T* ot = static_cast<T*>(out);
      if (bits == 8)
        err = vec ? ag_launch_m<T, 8, true>(ap, M, g, ot, ks, stream)
                  : ag_launch_m<T, 8, false>(ap, M, g, ot, ks, stream);
      else
        err = vec ? ag_launch_m<T, 4, true>(ap, M, g, ot, ks, stream)
                  : ag_launch_m<T, 4, false>(ap, M, g, ot, ks, stream);
    });
    return err;
  }
  if (plan.tier != Gemm4Tier::gemv && plan.tier != Gemm4Tier::mma) return cudaErrorInvalidValue;
  if (!affine_fast_ok(bits, group_size, N, K)) return cudaErrorInvalidValue;
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
