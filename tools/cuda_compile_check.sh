#!/usr/bin/env bash
# Compile check of lowbit's CUDA code on a machine with nvcc but no GPU (and possibly a CPU-only
# torch). Exits non-zero on any compile or link error.
#
#   1. Builds csrc/kernels/cuda through its own CMakeLists.txt (the lowbit_cuda_kernels target the
#      real build uses) for the architectures in LOWBIT_CUDA_CHECK_ARCHS (default "80;90"; the
#      release build uses 80;86;89;90), with warnings as errors.
#   2. Links a host program against it that names every entry point declared in
#      csrc/include/lowbit/cuda_kernels.h, so a declaration without a matching definition fails.
#      It only calls them with empty sizes, which launch nothing, so it runs without a GPU.
#      cuBLASLt (the int8 GEMM) is compiled against the real cublasLt.h (from the installed
#      nvidia-cublas wheel, the toolkit, or else the pinned wheel downloaded once into the build
#      folder, headers only) and linked against a stub library whose definitions must match the
#      header's declarations of every cuBLASLt function lowbit calls.
#   3. If the installed torch ships the c10/cuda headers (even CPU wheels do), checks the syntax
#      of the host code built only with LOWBIT_WITH_CUDA, with g++ -fsyntax-only -DLOWBIT_WITH_CUDA:
#      csrc/ops/cuda_backend.cpp (the CUDA launches), the device-generic ops (csrc/ops/<family>.cpp,
#      which pick the CUDA backend) and csrc/registration.cpp (the CUDA dispatch key).
#      Skipped with a notice otherwise.
#
# Environment: LOWBIT_CUDA_CHECK_DIR (build folder, default build/cuda-check),
# LOWBIT_CUDA_CHECK_ARCHS, JOBS (default 2), PYTHON (default python3), CXX (default g++).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${LOWBIT_CUDA_CHECK_DIR:-$ROOT/build/cuda-check}
ARCHS=${LOWBIT_CUDA_CHECK_ARCHS:-80;90}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}

if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_compile_check: FAILED: nvcc not found (install the CUDA toolkit or put nvcc on PATH)" >&2
  exit 2
fi
NVCC=$(command -v nvcc)
echo "cuda_compile_check: $($NVCC --version | tail -1), archs $ARCHS, build dir $BUILD"
start=$(date +%s)

# ---- cuBLASLt's header (the int8 GEMM) ----------------------------------------------------------
# Pinned: the version whose header the check compiles against when none is installed.
CUBLAS_WHEEL_PIN=${LOWBIT_CUBLAS_WHEEL_PIN:-nvidia-cublas==13.1.1.3}
LT_ROOT=""
for d in $("$PYTHON" -c 'import glob, os, sysconfig; d = os.path.join(sysconfig.get_paths()["purelib"], "nvidia"); print(" ".join(sorted(glob.glob(os.path.join(d, "cu1*"))) + [os.path.join(d, "cublas")]))' 2>/dev/null || true); do
  if [ -f "$d/include/cublasLt.h" ]; then LT_ROOT=$d; break; fi
done
if [ -z "$LT_ROOT" ]; then
  for d in "$(dirname "$(dirname "$NVCC")")" /usr/local/cuda; do
    if [ -f "$d/include/cublasLt.h" ]; then LT_ROOT=$d; break; fi
  done
fi
if [ -z "$LT_ROOT" ]; then
  LT_ROOT="$BUILD/cublas-headers"
  if [ ! -f "$LT_ROOT/include/cublasLt.h" ]; then
    echo "cuda_compile_check: no cublasLt.h installed; fetching the headers of $CUBLAS_WHEEL_PIN"
    rm -rf "$BUILD/cublas-wheel" && mkdir -p "$BUILD/cublas-wheel"
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps "$CUBLAS_WHEEL_PIN" \
      -d "$BUILD/cublas-wheel" || {
      echo "cuda_compile_check: FAILED: could not download $CUBLAS_WHEEL_PIN (cuBLASLt headers)" >&2
      exit 1
    }
    "$PYTHON" - "$BUILD/cublas-wheel" "$LT_ROOT" <<'PYEOF'
import glob, os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(os.path.join(src, "*.whl"))
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        parts = n.split("/")
        if "include" in parts and n.endswith(".h"):
            out = os.path.join(dst, "include", parts[-1])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(n) as f, open(out, "wb") as g:
                g.write(f.read())
PYEOF
    rm -rf "$BUILD/cublas-wheel"  # the wheel is mostly the 500 MB library; keep the headers only
  fi
fi
echo "cuda_compile_check: cuBLASLt header from $LT_ROOT"

# ---- 1 + 2: the kernels library through its CMakeLists, and the link check ----------------------
DRIVER="$BUILD/driver"
mkdir -p "$DRIVER"
cat >"$DRIVER/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.24)
project(lowbit_cuda_check LANGUAGES CXX CUDA)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
# A stub cuBLASLt: the check links without the 500 MB library, and a definition that does not match
# the header's declaration (extern "C") fails to compile.
find_package(CUDAToolkit REQUIRED)
add_library(lowbit_cublaslt_stub SHARED cublaslt_stub.cpp)
target_include_directories(lowbit_cublaslt_stub SYSTEM PRIVATE "$LT_ROOT/include")
target_link_libraries(lowbit_cublaslt_stub PRIVATE CUDA::toolkit)
set(LOWBIT_CUBLASLT_ROOT "$LT_ROOT" CACHE PATH "" FORCE)
set(LOWBIT_CUBLASLT_LIBRARY lowbit_cublaslt_stub CACHE STRING "" FORCE)
add_subdirectory("$ROOT/csrc/kernels/cuda" kernels)
add_executable(link_check link_check.cpp)
target_link_libraries(link_check PRIVATE lowbit_cuda_kernels)
# The toolkit's include folders, for the g++ syntax check of the ATen wrappers below (nvcc may be
# a wrapper script outside the toolkit, so its path does not say where the headers are).
find_package(CUDAToolkit REQUIRED)
file(WRITE "\${CMAKE_BINARY_DIR}/cuda_include_dirs.txt" "\${CUDAToolkit_INCLUDE_DIRS}")
EOF
cat >"$DRIVER/cublaslt_stub.cpp" <<'EOF'
// Every cuBLASLt function lowbit calls, defined against cublasLt.h's declarations; each fails.
#include <cublasLt.h>

#define STUB \
  { return CUBLAS_STATUS_NOT_SUPPORTED; }
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t*, cublasComputeType_t,
                                        cudaDataType_t) STUB
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t) STUB
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t,
                                              const void*, size_t) STUB
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t*, cudaDataType, uint64_t, uint64_t,
                                          int64_t) STUB
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t) STUB
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t*) STUB
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t) STUB
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t,
                                                    cublasLtMatmulPreferenceAttributes_t,
                                                    const void*, size_t) STUB
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatmulPreference_t, int,
                                              cublasLtMatmulHeuristicResult_t*, int*) STUB
cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t, const void*, const void*,
                              cublasLtMatrixLayout_t, const void*, cublasLtMatrixLayout_t,
                              const void*, const void*, cublasLtMatrixLayout_t, void*,
                              cublasLtMatrixLayout_t, const cublasLtMatmulAlgo_t*, void*, size_t,
                              cudaStream_t) STUB
const char* cublasLtGetStatusName(cublasStatus_t) { return "stub"; }
EOF
cat >"$DRIVER/link_check.cpp" <<'EOF'

// Names every entry point of lowbit/cuda_kernels.h (so each must be defined with exactly the
// declared signature) and calls each with empty sizes, which must launch nothing and succeed.
#include <cstdio>

#include "lowbit/codebook.h"
#include "lowbit/cuda_kernels.h"

int main() {
  using namespace lowbit;
  const Codebook16 cb = make_codebook16(kNF4Code);
  cuda::Code16 code{};
  cudaStream_t s = nullptr;
  const cudaError_t r[] = {
      cuda::quantize_blockwise(FloatType::f32, nullptr, 0, 64, nullptr, nullptr, nullptr, s),
      cuda::dequantize_blockwise(nullptr, nullptr, nullptr, 0, 64, FloatType::f16, nullptr, s),
      cuda::quantize_4bit(FloatType::bf16, nullptr, 0, 64, cb, nullptr, nullptr, s),
      cuda::dequantize_4bit(nullptr, nullptr, code, 0, 64, FloatType::f32, nullptr, s),
      cuda::dequantize_4bit_weight(nullptr, BlockAbsmax::plain(nullptr), nullptr, 0, 64,
                                   FloatType::bf16, nullptr, s),
      cuda::gemm_4bit(cuda::plan_gemm_4bit(FloatType::f16, 0, 0, 0, true, true, 90, 132, ""),
                      FloatType::f16, nullptr, 0, 0, nullptr, BlockAbsmax::plain(nullptr), nullptr,
                      64, nullptr, 0, nullptr, s),
      cuda::quantize_affine(FloatType::bf16, nullptr, 0, 32, 4, false, nullptr, nullptr, nullptr,
                            s),
      cuda::dequantize_affine(nullptr, nullptr, nullptr, 8, 128, 0, FloatType::f16, nullptr, s),
      cuda::gemm_affine(cuda::plan_gemm_affine(FloatType::bf16, 0, 0, 0, 4, 128, true, true, 90,
                                               132, ""),
                        FloatType::bf16, nullptr, 0, 0, nullptr, nullptr, nullptr, 128, 4,
                        nullptr, nullptr, 0, nullptr, s),
      cuda::int8_outlier_columns(FloatType::f32, nullptr, 0, 0, 6.0f, nullptr, s),
      cuda::int8_vectorwise_quant(FloatType::f32, nullptr, 0, 0, 6.0f, nullptr, nullptr, nullptr,
                                  s),
      cuda::int8_vectorwise_dequant(nullptr, nullptr, 0, 0, nullptr, s),
      cuda::int8_gemm(nullptr, nullptr, nullptr, 0, 0, 0, s),
      cuda::int8_mm_dequant(nullptr, nullptr, nullptr, FloatType::f32, nullptr, 0, 0,
                            FloatType::bf16, nullptr, s),
      cuda::int8_linear_quant(FloatType::bf16, nullptr, 0, 64, 6.0f, nullptr, nullptr, nullptr, 8,
                              nullptr, s),
      cuda::int8_linear_epilogue(nullptr, nullptr, nullptr, FloatType::f32, nullptr,
                                 FloatType::f16, nullptr, 0, 8, nullptr, nullptr, 64, nullptr, s),
      cuda::optim_nonfinite_flags(FloatType::f32, nullptr, 0, nullptr, s),
      cuda::optimizer_update_8bit_blockwise(
          make_optim_scalars(OptimKind::adam, 0.9, 0.999, 1e-8, 1, 1e-3, 0.0, 1.0, false, -1),
          FloatType::bf16, FloatType::bf16, nullptr, 0, nullptr, nullptr, nullptr, s),
      cuda::optimizer_update_32bit(
          make_optim_scalars(OptimKind::lion, 0.9, 0.99, 0.0, 1, 1e-4, 0.0, 1.0, false, -1),
          FloatType::f16, FloatType::f32, nullptr, 0, nullptr, s),
  };
  // Not supported (K % 4 != 0): returns before touching the handle, enqueues nothing.
  if (cuda::int8_gemm_lt(nullptr, nullptr, 0, nullptr, nullptr, nullptr, 1, 4, 3, s) !=
          cuda::kInt8LtUnsupported ||
      cuda::int8_lt_status_name(0) == nullptr || !cuda::int8_quant_one_block(1, 64)) {
    std::printf("int8_gemm_lt / int8_quant_one_block: unexpected result\n");
    return 1;
  }
  for (cudaError_t e : r)
    if (e != cudaSuccess) {
      std::printf("an empty call returned %d\n", int(e));
      return 1;
    }
  std::printf("link_check: all %zu entry points linked; empty calls launch nothing\n",
              sizeof(r) / sizeof(r[0]));
  // The 4-bit product's dispatch (host code): each tier where the table and the forcing rules
  // say, on an H200-like device (cc 90, 132 SMs).
  using cuda::Gemm4Tier;
  struct Case {
    FloatType t;
    int64_t M, N, K;
    bool a16, p16;
    int cc;
    const char* force;
    Gemm4Tier want;
  };
  const Case cases[] = {
      {FloatType::bf16, 1, 4096, 4096, true, true, 90, "", Gemm4Tier::gemv},
      {FloatType::f32, 8, 4096, 4096, true, true, 90, "", Gemm4Tier::gemv},
      {FloatType::bf16, 9, 4096, 4096, true, true, 90, "", Gemm4Tier::mma},
      {FloatType::f16, 512, 4096, 4096, true, true, 90, "", Gemm4Tier::mma},
      {FloatType::bf16, 4096, 4096, 4096, true, true, 90, "", Gemm4Tier::dequant_gemm},
      {FloatType::f32, 16, 4096, 4096, true, true, 90, "", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 16, 4096, 4096, true, true, 75, "", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 1, 64, 100, true, true, 90, "", Gemm4Tier::generic},
      {FloatType::bf16, 16, 64, 4096, false, true, 90, "", Gemm4Tier::generic},
      {FloatType::bf16, 2048, 64, 100, true, true, 90, "", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 2048, 64, 100, true, false, 90, "", Gemm4Tier::generic},
      {FloatType::bf16, 1, 4096, 4096, true, true, 90, "mma:2:3", Gemm4Tier::mma},
      {FloatType::bf16, 16, 4096, 4096, true, true, 90, "gemv", Gemm4Tier::mma},  // M > 8
      {FloatType::bf16, 9, 4096, 4096, true, true, 90, "gemv", Gemm4Tier::mma},
      {FloatType::f32, 1, 4096, 4096, true, true, 90, "mma", Gemm4Tier::gemv},
      {FloatType::bf16, 1, 4096, 4096, true, true, 90, "dequant", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 16, 4096, 4096, true, true, 90, "generic", Gemm4Tier::generic},
  };
  int bad = 0;
  for (const Case& c : cases) {
    const cuda::Gemm4Plan p =
        cuda::plan_gemm_4bit(c.t, c.M, c.N, c.K, c.a16, c.p16, c.cc, 132, c.force);
    if (p.tier != c.want) {
      std::printf("plan_gemm_4bit(M=%lld, N=%lld, K=%lld, force '%s'): tier %d, expected %d\n",
                  (long long)c.M, (long long)c.N, (long long)c.K, c.force, int(p.tier),
                  int(c.want));
      ++bad;
    }
    if (p.tier == Gemm4Tier::mma && (p.split > 1) != (p.workspace_floats > 0)) ++bad;
  }
  // Split-K where the tiles do not fill the GPU, and the workspace that goes with it.
  const cuda::Gemm4Plan s16 =
      cuda::plan_gemm_4bit(FloatType::bf16, 16, 4096, 4096, true, true, 90, 132, "");
  if (s16.split < 2 || s16.workspace_floats != int64_t(s16.split) * 16 * 4096) ++bad;
  const cuda::Gemm4Plan g1 =
      cuda::plan_gemm_4bit(FloatType::bf16, 1, 1024, 8192, true, true, 90, 132, "");
  if ((g1.config & 15) < 2) ++bad;  // 1024 columns leave the SMs short: split K in the block
  if (cuda::plan_gemm_4bit(FloatType::bf16, 1, 4096, 4096, true, true, 90, 132, "gemv:8:4")
          .config != (8 | 4 << 4))
    ++bad;
  // The affine product: the 4-bit table for 4-bit codes in groups of a multiple of 32; for 8-bit
  // codes, other group sizes and wherever the 4-bit table says "generic", the affine GEMV at
  // M <= 8 (tier gemv) and dequantize + cuBLAS above.
  struct AffCase {
    FloatType t;
    int64_t M, N, K;
    int bits;
    int64_t gs;
    const char* force;
    Gemm4Tier want;
  };
  const AffCase acases[] = {
      {FloatType::bf16, 1, 4096, 4096, 4, 128, "", Gemm4Tier::gemv},
      {FloatType::f32, 8, 11008, 4096, 4, 32, "", Gemm4Tier::gemv},
      {FloatType::f16, 16, 4096, 11008, 4, 11008, "", Gemm4Tier::mma},
      {FloatType::bf16, 64, 4096, 4032, 4, 96, "", Gemm4Tier::mma},
      {FloatType::bf16, 4096, 4096, 4096, 4, 128, "", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 1, 4096, 4096, 8, 128, "", Gemm4Tier::gemv},  // the affine GEMV
      {FloatType::f32, 8, 11008, 4096, 8, 4096, "", Gemm4Tier::gemv},
      {FloatType::f16, 9, 4096, 4096, 8, 128, "", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 1, 4096, 4096, 8, 128, "dequant", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 1, 4096, 4096, 8, 128, "generic", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 4, 4096, 4096, 8, 128, "mma", Gemm4Tier::gemv},
      {FloatType::bf16, 1, 4096, 4096, 4, 16, "", Gemm4Tier::gemv},
      {FloatType::bf16, 1, 64, 100, 4, 100, "", Gemm4Tier::gemv},
      {FloatType::bf16, 16, 4096, 4096, 4, 48, "", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 1, 4096, 4096, 4, 128, "affgemv", Gemm4Tier::gemv},
      {FloatType::bf16, 4, 4096, 4096, 4, 128, "generic", Gemm4Tier::dequant_gemm},
      {FloatType::bf16, 4, 4096, 4096, 4, 128, "mma", Gemm4Tier::mma},
      {FloatType::bf16, 64, 4096, 4096, 4, 128, "dequant", Gemm4Tier::dequant_gemm},
  };
  for (const AffCase& c : acases) {
    const cuda::Gemm4Plan p =
        cuda::plan_gemm_affine(c.t, c.M, c.N, c.K, c.bits, c.gs, true, true, 90, 132, c.force);
    if (p.tier != c.want) {
      std::printf("plan_gemm_affine(M=%lld, N=%lld, K=%lld, bits %d, group %lld, force '%s'): "
                  "tier %d, expected %d\n",
                  (long long)c.M, (long long)c.N, (long long)c.K, c.bits, (long long)c.gs, c.force,
                  int(p.tier), int(c.want));
      ++bad;
    }
  }
  if (bad) {
    std::printf("link_check: %d dispatch expectation(s) failed\n", bad);
    return 1;
  }
  std::printf("link_check: 4-bit dispatch table OK (%zu cases, %zu affine)\n",
              sizeof(cases) / sizeof(cases[0]), sizeof(acases) / sizeof(acases[0]));
  return 0;
}
EOF

cmake -S "$DRIVER" -B "$DRIVER/build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$NVCC" "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" \
  "-DCMAKE_CUDA_FLAGS=-Werror all-warnings" >"$BUILD/cmake-configure.log" 2>&1 || {
  cat "$BUILD/cmake-configure.log" >&2
  echo "cuda_compile_check: FAILED: cmake configure" >&2
  exit 1
}
cmake --build "$DRIVER/build" -j "$JOBS"
"$DRIVER/build/link_check"

# ---- 3: syntax of the ATen wrappers -------------------------------------------------------------
TORCH_INC=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)
if [ -n "$TORCH_INC" ] && [ -f "$TORCH_INC/c10/cuda/CUDAGuard.h" ]; then
  PY_INC=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  CUDA_INC=()
  IFS=";" read -r -a dirs <"$DRIVER/build/cuda_include_dirs.txt" || true  # no final newline
  for d in "${dirs[@]}"; do CUDA_INC+=(-isystem "$d"); done
  # A CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h;
  # C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it (it only sets an export macro).
  for src in csrc/ops/cuda_backend.cpp csrc/ops/blockwise.cpp csrc/ops/fourbit.cpp \
    csrc/ops/int8.cpp csrc/ops/affine.cpp csrc/ops/optim.cpp csrc/registration.cpp; do
    "$CXX" -std=c++17 -fsyntax-only -Wall -Werror -DLOWBIT_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      -I"$ROOT/csrc/include" -I"$ROOT/csrc" -isystem "$TORCH_INC" \
      -isystem "$TORCH_INC/torch/csrc/api/include" "${CUDA_INC[@]}" -isystem "$PY_INC" \
      "$ROOT/$src"
    echo "cuda_compile_check: $src: syntax OK"
  done
else
  echo "cuda_compile_check: NOTICE: torch's c10/cuda headers not found; the CUDA host code (csrc/ops, registration) not checked"
fi

echo "cuda_compile_check: OK in $(($(date +%s) - start)) s"
