// Run-time choice of the CPU instruction set the kernels use (torch-free).
//
// Every hot kernel has a scalar generic version; on x86-64 there are also AVX2 (+FMA+F16C) and
// AVX-512 (F+BW+VL+VNNI) versions, picked once per process from CPUID. One build therefore runs on
// any x86-64 machine; builds for other architectures contain only the generic path.
//
// The environment variable LOWBIT_CPU_ISA=generic|avx2|avx512 forces a path. It is read once, the
// first time a kernel runs. If the machine lacks the requested ISA, lowbit prints one warning to
// stderr and falls back to the widest ISA the machine has that is not wider than the request
// (e.g. avx512 -> avx2 on an AVX2-only machine); an unknown value warns and uses auto-detection.
// The empty string and "auto" mean auto-detection.
#pragma once

namespace lowbit::cpu {

// Ordered from narrowest to widest.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// True if this build has kernels for `isa` and this CPU (and OS) can run them.
bool isa_supported(Isa isa);
// The widest supported ISA.
Isa best_isa();
// The ISA the kernels use: best_isa(), or the LOWBIT_CPU_ISA override (see above). Fixed for the
// life of the process after the first call.
Isa active_isa();
// "generic", "avx2" or "avx512".
const char* isa_name(Isa isa);

// Whether small-M 4-bit products quantize their activations to int8 (see gemm_4bit_q8 in
// lowbit/cpu_kernels.h): true by default where the active ISA is avx2 or wider. The environment
// variable LOWBIT_CPU_GEMV=fp32 keeps fp32 activations (the exact fused kernels), =int8 or unset
// the default; other values warn once and keep the default. Read once, like LOWBIT_CPU_ISA.
bool gemv_int8_activations();

// Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, with the OS saving the
// registers) and the active ISA is avx512: there torch's BLAS runs a bf16 x bf16 product with fp32
// accumulation ~3.5x faster than the fp32 one, so the large-M 4-bit and affine products of bf16
// activations dequantize their weight tiles to bf16 (ops/cpu_gemm4.cpp). LOWBIT_CPU_ISA=avx2 or
// generic turns it off, as it turns off the other AVX-512 paths.
bool native_bf16_matmul();

}  // namespace lowbit::cpu

// The same for callers without C++ linkage (Python's ctypes: lowbit.bench reads it from _C).
extern "C" {
__attribute__((visibility("default"))) const char* lowbit_cpu_isa_name();
__attribute__((visibility("default"))) const char* lowbit_cpu_best_isa_name();
// "int8" or "fp32": the activations of small-M 4-bit products (gemv_int8_activations()).
__attribute__((visibility("default"))) const char* lowbit_cpu_gemv_mode();
// "bf16" or "fp32": the dtype the large-M 4-bit/affine products multiply bf16 activations in
// (native_bf16_matmul()).
__attribute__((visibility("default"))) const char* lowbit_cpu_matmul_dtype();
}
