// CPUID detection and the LOWBIT_CPU_ISA override (see lowbit/cpu_isa.h).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "lowbit/cpu_isa.h"

namespace lowbit::cpu {

namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  // __builtin_cpu_supports checks both CPUID and that the OS saves the wider registers (XCR0).
  __builtin_cpu_init();
  switch (isa) {
    case Isa::generic:
      return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::avx512:
      return cpu_has(Isa::avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == Isa::generic;
#endif
}

Isa choose_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("LOWBIT_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "generic") == 0) {
    want = Isa::generic;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::avx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::avx512;
  } else {
    std::fprintf(stderr,
                 "lowbit: warning: LOWBIT_CPU_ISA=%s is not one of generic, avx2, avx512, auto; "
                 "using %s\n",
                 env, isa_name(best));
    return best;
  }
  if (isa_supported(want)) return want;
  Isa fallback = want;
  while (!isa_supported(fallback)) fallback = Isa(int(fallback) - 1);
  std::fprintf(stderr,
               "lowbit: warning: LOWBIT_CPU_ISA=%s but this CPU or build has no %s kernels; "
               "using %s\n",
               env, env, isa_name(fallback));
  return fallback;
}

}  // namespace

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has[3] = {true, cpu_has(Isa::avx2), cpu_has(Isa::avx512)};
  return has[int(isa)];
#else
  return isa == Isa::generic;
#endif
}

Isa best_isa() {
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::generic;
}

Isa active_isa() {
  static const Isa isa = choose_isa();  // thread-safe one-time initialisation
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    default:
      return "generic";
  }
}

namespace {

bool choose_gemv_int8() {
  const bool possible = active_isa() != Isa::generic;
  const char* env = std::getenv("LOWBIT_CPU_GEMV");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "int8") == 0) return possible;
  if (std::strcmp(env, "fp32") == 0) return false;
  std::fprintf(stderr, "lowbit: warning: LOWBIT_CPU_GEMV=%s is not one of int8, fp32; using %s\n",
               env, possible ? "int8" : "fp32");
  return possible;
}

}  // namespace

bool gemv_int8_activations() {
  static const bool on = choose_gemv_int8();
  return on;
}

bool native_bf16_matmul() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool on = active_isa() == Isa::avx512 && (__builtin_cpu_supports("avx512bf16") ||
                                                         __builtin_cpu_supports("amx-bf16"));
  return on;
#else
  return false;
#endif
}

}  // namespace lowbit::cpu

const char* lowbit_cpu_gemv_mode() {
  return lowbit::cpu::gemv_int8_activations() ? "int8" : "fp32";
}
const char* lowbit_cpu_matmul_dtype() {
  return lowbit::cpu::native_bf16_matmul() ? "bf16" : "fp32";
}
const char* lowbit_cpu_isa_name() { return lowbit::cpu::isa_name(lowbit::cpu::active_isa()); }
const char* lowbit_cpu_best_isa_name() { return lowbit::cpu::isa_name(lowbit::cpu::best_isa()); }
