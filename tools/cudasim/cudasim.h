// cudasim: lowbit's CUDA kernels compiled with g++ and run on the CPU, every CUDA thread a fiber.
//
// This header is force-included (g++ -include) before every kernel source that
// tools/cudasim/build.py has preprocessed (launches and __shared__ declarations rewritten). It
// provides the CUDA language extensions, types, intrinsics and runtime calls the kernels use,
// implemented on host memory. What is not here fails to compile; what is here but only partly
// modelled aborts when used outside the modelled part (README.md lists both).
#pragma once

#define LOWBIT_CUDASIM 1
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define __NVCC__ 1

#include <math.h>  // isinf, fabsf, ... in the global namespace, as CUDA's math API has them

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- language extensions --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__ static_assert(false, "cudasim: __constant__ memory is not modelled")
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// build.py moves the arguments of __launch_bounds__ into CUDASIM_KERNEL_ENTRY at the top of the
// kernel body and rewrites every __shared__ declaration; one that is left means build.py did not
// recognise it, and must not compile.
#define __launch_bounds__(...) static_assert(false, "cudasim: __launch_bounds__ not rewritten")
#define __shared__ static_assert(false, "cudasim: __shared__ not rewritten by build.py");

// ---- vector and launch-geometry types (the CUDA alignments: UBSan checks them) ---------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// ---- runtime API types ----------------------------------------------------------------------
// The values are CUDA's (driver_types.h), so a code printed by a test means the same as on a GPU.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorAssert = 710,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef cudaError_t cudaError;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaLaunchAttributeID {
  cudaLaunchAttributeCooperative = 2,
};
union cudaLaunchAttributeValue {
  int cooperative;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace cudasim {

// ---- the simulator's state, one fiber per CUDA thread (cudasim.cpp) ----------------------------
struct Fiber;
struct Block;
extern Fiber* g_cur;  // the running fiber, null on the host

// A kernel fault: the message is printed, the launch stops (its remaining threads are abandoned)
// and returns `err` to the host code, as a faulting kernel reports an error on a GPU.
[[noreturn]] void fault(cudaError_t err, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));
// A host-side misuse the simulator does not model: print and abort().
[[noreturn]] void unsupported(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Launch bookkeeping (CUDASIM_KERNEL_ENTRY): during a probe the kernel returns right after it
// has told the simulator its name and __launch_bounds__.
bool kernel_entry(const char* pretty, int max_threads = 1024, int min_blocks = 0);

// Per-block shared memory: one allocation per declaration (ASan sees overruns of each), filled
// with the schedule's garbage pattern (CUDA leaves shared memory uninitialised).
void* shared_alloc(const void* key, size_t size, size_t align, const char* name);
void* dynamic_shared();
size_t dynamic_shared_size();
template <typename T>
T& shared_var(const void* key, const char* name) {
  return *static_cast<T*>(shared_alloc(key, sizeof(T), alignof(T) < 16 ? 16 : alignof(T), name));
}
template <typename T>
T* dyn_shared() {
  return static_cast<T*>(dynamic_shared());
}

// ---- barriers and warp collectives -------------------------------------------------------------
void syncthreads();
int syncthreads_reduce(int op, int pred);  // op: 0 or, 1 and, 2 count
void grid_sync();
void syncwarp(unsigned mask);
// One 64-bit value per lane; kind: 0 idx, 1 xor, 2 up, 3 down.
uint64_t shfl(unsigned mask, uint64_t v, int kind, int arg, int width, const char* what);
unsigned vote(unsigned mask, int pred, int kind);  // kind: 0 any, 1 all, 2 ballot
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16);

// ---- memory helpers ---------------------------------------------------------------------------
void check_align(const void* p, size_t align, const char* what);
void cp_async16(void* dst_shared, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
uint32_t cvta_to_shared(const void* p);
const void* shared_from_cvta(uint32_t a);

// ---- launches ---------------------------------------------------------------------------------
struct LaunchSpec {
  const void* kernel;  // identity of the kernel (its function pointer)
  const char* expr;    // the kernel expression at the launch site
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  bool cooperative;
  void* params;                                      // std::tuple of the kernel's parameters
  void (*invoke)(const void* kernel, void* params);  // calls the kernel with the parameters
};
cudaError_t launch_impl(const LaunchSpec& spec);

template <typename... P>
struct Invoker {
  using Tuple = std::tuple<std::decay_t<P>...>;
  static void invoke(const void* k, void* params) {
    auto fn = reinterpret_cast<void (*)(P...)>(const_cast<void*>(k));
    std::apply(fn, *static_cast<Tuple*>(params));
  }
};

// kernel<<<grid, block, smem, stream>>>(args...) becomes launch(kernel, "kernel", ...): the
// arguments are converted to the kernel's parameter types (as nvcc does), kept for the whole
// launch and passed by value to every thread.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), const char* expr, const char* file, int line, dim3 grid,
                   dim3 block, size_t smem, cudaStream_t stream, bool cooperative, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cudasim: wrong number of kernel arguments");
  typename Invoker<P...>::Tuple params(std::forward<A>(args)...);
  LaunchSpec s{reinterpret_cast<const void*>(kernel),
               expr,
               file,
               line,
               grid,
               block,
               smem,
               stream,
               cooperative,
               &params,
               &Invoker<P...>::invoke};
  return launch_impl(s);
}
// The build script's form of a <<<...>>> launch: the config has 2 to 4 entries.
template <typename... P, typename... A>
void launch_chevrons(void (*kernel)(P...), const char* expr, const char* file, int line, dim3 grid,
                     dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  (void)launch(kernel, expr, file, line, grid, block, smem, stream, false,
               std::forward<A>(args)...);
}

// Launch-time attributes of a kernel (cudaFuncSetAttribute), and the occupancy model.
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
int occupancy(const void* kernel, int block_size, size_t dyn_smem);

// ---- numerics ---------------------------------------------------------------------------------
float f32_from_bits(uint32_t u);
uint32_t bits_from_f32(float f);
// The GPU's fp32 arithmetic returns the canonical NaN 0x7fffffff for every NaN result.
inline float gpu_nan(float r) { return r != r ? f32_from_bits(0x7fffffffu) : r; }
uint16_t f32_to_bf16_rn(float f);
uint16_t f32_to_f16_rn(float f);
float f16_to_f32(uint16_t h);
inline uint32_t cvt_rn_bf16x2_f32(float a, float b) {
  // PTX cvt.rn.bf16x2.f32 d, a, b: a converted into the UPPER half of d, b into the lower half.
  return (uint32_t(f32_to_bf16_rn(a)) << 16) | f32_to_bf16_rn(b);
}
inline uint32_t cvt_rn_f16x2_f32(float a, float b) {
  return (uint32_t(f32_to_f16_rn(a)) << 16) | f32_to_f16_rn(b);
}

template <typename T>
T ld_checked(const T* p, const char* what) {
  check_align(p, alignof(T), what);
  return *p;
}
inline uint4 ld_global_nc_v4_u32(const void* p) {
  check_align(p, 16, "ld.global.nc.v4.u32");
  uint4 r;
  std::memcpy(&r, p, 16);
  return r;
}
inline uint2 ld_global_nc_v2_u32(const void* p) {
  check_align(p, 8, "ld.global.nc.v2.u32");
  uint2 r;
  std::memcpy(&r, p, 8);
  return r;
}
inline void st_global_v4_f32(void* p, float a, float b, float c, float d) {
  check_align(p, 16, "st.global.v4.f32");
  const float v[4] = {a, b, c, d};
  std::memcpy(p, v, 16);
}
inline void st_global_v2_u32(void* p, uint32_t a, uint32_t b) {
  check_align(p, 8, "st.global.v2.u32");
  const uint32_t v[2] = {a, b};
  std::memcpy(p, v, 8);
}

template <typename T>
uint64_t to_u64(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cudasim: shuffle of T");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_u64(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace cudasim

// ---- built-in variables ----------------------------------------------------------------------
// Globals that the scheduler sets to the running fiber's values before it switches to it (every
// switch is a call into cudasim.cpp, so the compiler reloads them after each barrier).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// The kernel prologue build.py inserts (the arguments are the kernel's __launch_bounds__).
#define CUDASIM_KERNEL_ENTRY(...) \
  if (::cudasim::kernel_entry(__PRETTY_FUNCTION__, ##__VA_ARGS__)) return

// ---- synchronisation intrinsics -----------------------------------------------------------------
inline void __syncthreads() { ::cudasim::syncthreads(); }
inline int __syncthreads_or(int p) { return ::cudasim::syncthreads_reduce(0, p); }
inline int __syncthreads_and(int p) { return ::cudasim::syncthreads_reduce(1, p); }
inline int __syncthreads_count(int p) { return ::cudasim::syncthreads_reduce(2, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cudasim::syncwarp(mask); }
inline void __threadfence() {}  // one host thread: every store is visible at once
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::cudasim::from_u64<T>(
      ::cudasim::shfl(mask, ::cudasim::to_u64(v), 0, src, width, "__shfl_sync"));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::cudasim::from_u64<T>(
      ::cudasim::shfl(mask, ::cudasim::to_u64(v), 1, lane_mask, width, "__shfl_xor_sync"));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cudasim::from_u64<T>(
      ::cudasim::shfl(mask, ::cudasim::to_u64(v), 2, int(delta), width, "__shfl_up_sync"));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cudasim::from_u64<T>(
      ::cudasim::shfl(mask, ::cudasim::to_u64(v), 3, int(delta), width, "__shfl_down_sync"));
}
inline int __any_sync(unsigned mask, int p) { return int(::cudasim::vote(mask, p, 0)); }
inline int __all_sync(unsigned mask, int p) { return int(::cudasim::vote(mask, p, 1)); }
inline unsigned __ballot_sync(unsigned mask, int p) { return ::cudasim::vote(mask, p, 2); }

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::cudasim::grid_sync(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ---- loads --------------------------------------------------------------------------------------
// Read-only / streaming loads: plain loads here, with the alignment the GPU needs (a misaligned
// vector load faults there).
template <typename T>
T __ldg(const T* p) {
  return ::cudasim::ld_checked(p, "__ldg");
}
template <typename T>
T __ldcs(const T* p) {
  return ::cudasim::ld_checked(p, "__ldcs");
}
template <typename T>
T __ldcg(const T* p) {
  return ::cudasim::ld_checked(p, "__ldcg");
}
template <typename T>
T __ldca(const T* p) {
  return ::cudasim::ld_checked(p, "__ldca");
}
template <typename T>
T __ldlu(const T* p) {
  return ::cudasim::ld_checked(p, "__ldlu");
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::cudasim::cvta_to_shared(p); }

// ---- fp32 arithmetic with explicit rounding (IEEE, no contraction: built with -ffp-contract=off)
// A NaN result is the GPU's canonical NaN.
inline float __fadd_rn(float a, float b) { return ::cudasim::gpu_nan(a + b); }
inline float __fsub_rn(float a, float b) { return ::cudasim::gpu_nan(a - b); }
inline float __fmul_rn(float a, float b) { return ::cudasim::gpu_nan(a * b); }
inline float __fdiv_rn(float a, float b) { return ::cudasim::gpu_nan(a / b); }
inline float __fsqrt_rn(float a) { return ::cudasim::gpu_nan(std::sqrt(a)); }
inline float __frcp_rn(float a) { return ::cudasim::gpu_nan(1.0f / a); }
inline float __fmaf_rn(float a, float b, float c) { return ::cudasim::gpu_nan(std::fma(a, b, c)); }
inline float __uint_as_float(unsigned u) { return ::cudasim::f32_from_bits(u); }
inline unsigned __float_as_uint(float f) { return ::cudasim::bits_from_f32(f); }
inline float __int_as_float(int u) { return ::cudasim::f32_from_bits(unsigned(u)); }
inline int __float_as_int(float f) { return int(::cudasim::bits_from_f32(f)); }

// CUDA's global min / max overloads (device math API).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a < b ? b : a; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---- integer intrinsics ---------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((uint64_t(a) * uint64_t(b)) >> 32);
}
inline int __mulhi(int a, int b) { return int((int64_t(a) * int64_t(b)) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)((unsigned __int128)a * b >> 64);
}
// __dp4a: four 8-bit products summed into c (signed bytes for the int form).
inline int __dp4a(int a, int b, int c) {
  int s = c;
  for (int i = 0; i < 4; ++i) s += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return s;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  unsigned s = c;
  for (int i = 0; i < 4; ++i) s += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
  return s;
}
// __byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8-byte value {y, x}
// (x bytes 0-3, y bytes 4-7); the sign-replicate mode (bit 3) is not used by lowbit.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 0xFu;
    if (sel & 8u) ::cudasim::fault(cudaErrorIllegalInstruction, "__byte_perm sign mode");
    r |= unsigned((v >> (8 * sel)) & 0xFFu) << (8 * i);
  }
  return r;
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// ---- atomics (one host thread runs every fiber: a read-modify-write is atomic) -----------------
template <typename T>
T atomicAdd(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicAdd");
  const T o = *p;
  *p = o + v;
  return o;
}
template <typename T>
T atomicSub(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicSub");
  const T o = *p;
  *p = o - v;
  return o;
}
template <typename T>
T atomicOr(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicOr");
  const T o = *p;
  *p = o | v;
  return o;
}
template <typename T>
T atomicAnd(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicAnd");
  const T o = *p;
  *p = o & v;
  return o;
}
template <typename T>
T atomicXor(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicXor");
  const T o = *p;
  *p = o ^ v;
  return o;
}
template <typename T>
T atomicMax(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicMax");
  const T o = *p;
  *p = o < v ? v : o;
  return o;
}
template <typename T>
T atomicMin(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicMin");
  const T o = *p;
  *p = v < o ? v : o;
  return o;
}
template <typename T>
T atomicExch(T* p, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicExch");
  const T o = *p;
  *p = v;
  return o;
}
template <typename T>
T atomicCAS(T* p, T cmp, T v) {
  ::cudasim::check_align(p, sizeof(T), "atomicCAS");
  const T o = *p;
  if (o == cmp) *p = v;
  return o;
}

[[noreturn]] void __trap();
void __brkpt() = delete;  // not modelled

// ---- runtime API (host memory, synchronous streams) -----------------------------------------
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudasim::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*kernel)(P...),
                                                          int block_size, size_t dyn_smem) {
  *n = ::cudasim::occupancy(reinterpret_cast<const void*>(kernel), block_size, dyn_smem);
  return cudaSuccess;
}
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  bool coop = false;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeCooperative)
      coop = cfg->attrs[i].val.cooperative != 0;
    else
      ::cudasim::unsupported("cudaLaunchKernelEx: launch attribute %d", int(cfg->attrs[i].id));
  }
  return ::cudasim::launch(kernel, "cudaLaunchKernelEx", __FILE__, __LINE__, cfg->gridDim,
                           cfg->blockDim, cfg->dynamicSmemBytes, cfg->stream, coop,
                           std::forward<A>(args)...);
}
