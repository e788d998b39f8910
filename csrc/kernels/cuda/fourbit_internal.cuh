// Launchers shared by the 4-bit product kernels (fourbit.cu dispatches, fourbit_gemv.cu and
// fourbit_mma.cu implement). Internal to csrc/kernels/cuda.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fourbit_decode.cuh"
#include "lowbit/cuda_kernels.h"

namespace lowbit::cuda {

// Streaming 16-byte load of packed weights: read once per product, so it should not evict the
// activations (re-read by every warp) from L1.
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
#if defined(LOWBIT_CUDASIM)  // the CPU simulator (tools/cudasim): checks the 16-byte alignment
  return ::cudasim::ld_global_nc_v4_u32(p);
#else
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
#endif
}

__device__ __forceinline__ uint2 ldg_stream8(const void* p) {
#if defined(LOWBIT_CUDASIM)
  return ::cudasim::ld_global_nc_v2_u32(p);
#else
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
               : "=r"(r.x), "=r"(r.y)
               : "l"(p));
  return r;
#endif
}

// fp16/bf16 bits widened to fp32, exactly (every fp16 and bf16 value is an fp32 value). fp16 with
// the hardware conversion (one instruction, instead of numeric.h's portable bit manipulation,
// which costs registers and issue slots in the hot loops); NaN stays NaN.
__device__ __forceinline__ float widen(half_t h) {
#if defined(LOWBIT_CUDASIM)
  return ::cudasim::f16_to_f32(h.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
#endif
}
__device__ __forceinline__ float widen(bfloat16_t h) {
  return __uint_as_float(uint32_t(h.bits) << 16);
}

// SIMT GEMV, M <= 8 rows (fourbit_gemv.cuh). Needs K % 32 == 0 and 16-byte aligned a / packed.
// config: warps per column group (1, 2, 4 or 8, split-K in the block) | columns per warp group
// (M = 1: 1, 2 or 4; M > 1: always 2) << 4.
template <typename T, typename Policy>
cudaError_t launch_gemv_fast(const T* a, int64_t M, int64_t K, const uint8_t* packed,
                             const Policy& pol, T* out, int64_t N, int config, cudaStream_t stream);

// Tensor-core tier (fourbit_mma.cu), T = half_t or bfloat16_t. Needs K % 32 == 0 and 16-byte
// aligned a / packed. config: the tile configuration (0: BM 16, 1: BM 32, 2: BM 64; BN 128);
// split > 1: split-K over blocks, fp32 partials in ws (split * M * N floats) added by a second
// kernel.
template <typename T, typename Policy>
cudaError_t launch_mma(const T* a, int64_t M, int64_t K, const uint8_t* packed, const Policy& pol,
                       T* out, float* ws, int split, int64_t N, int config, cudaStream_t stream);
int mma_4bit_bm(int config);  // rows of out per block of a configuration
int mma_4bit_kc(int config);  // 32-element chunks per k-tile

}  // namespace lowbit::cuda
