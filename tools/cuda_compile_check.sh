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

# ---- 1 + 2: the kernels library through its CMakeLists, and the link check ----------------------
DRIVER="$BUILD/driver"
mkdir -p "$DRIVER"
cat >"$DRIVER/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.24)
project(lowbit_cuda_check LANGUAGES CXX CUDA)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
add_subdirectory("$ROOT/csrc/kernels/cuda" kernels)
add_executable(link_check link_check.cpp)
target_link_libraries(link_check PRIVATE lowbit_cuda_kernels)
# The toolkit's include folders, for the g++ syntax check of the ATen wrappers below (nvcc may be
# a wrapper script outside the toolkit, so its path does not say where the headers are).
find_package(CUDAToolkit REQUIRED)
file(WRITE "\${CMAKE_BINARY_DIR}/cuda_include_dirs.txt" "\${CUDAToolkit_INCLUDE_DIRS}")
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
      cuda::gemv_4bit(FloatType::f16, nullptr, 0, 0, nullptr, BlockAbsmax::plain(nullptr), nullptr,
                      64, nullptr, 0, s),
      cuda::int8_outlier_columns(FloatType::f32, nullptr, 0, 0, 6.0f, nullptr, s),
      cuda::int8_vectorwise_quant(FloatType::f32, nullptr, 0, 0, 6.0f, nullptr, nullptr, nullptr,
                                  s),
      cuda::int8_vectorwise_dequant(nullptr, nullptr, 0, 0, nullptr, s),
      cuda::int8_gemm(nullptr, nullptr, nullptr, 0, 0, 0, s),
      cuda::int8_mm_dequant(nullptr, nullptr, nullptr, FloatType::f32, nullptr, 0, 0,
                            FloatType::bf16, nullptr, s),
      cuda::optim_nonfinite_flags(FloatType::f32, nullptr, 0, nullptr, s),
      cuda::optimizer_update_8bit_blockwise(
          make_optim_scalars(OptimKind::adam, 0.9, 0.999, 1e-8, 1, 1e-3, 0.0, 1.0, false, -1),
          FloatType::bf16, FloatType::bf16, nullptr, 0, nullptr, nullptr, nullptr, nullptr,
          nullptr, nullptr, nullptr, s),
      cuda::optimizer_update_32bit(
          make_optim_scalars(OptimKind::lion, 0.9, 0.99, 0.0, 1, 1e-4, 0.0, 1.0, false, -1),
          FloatType::f16, FloatType::f32, nullptr, 0, nullptr, s),
  };
  for (cudaError_t e : r)
    if (e != cudaSuccess) {
      std::printf("an empty call returned %d\n", int(e));
      return 1;
    }
  std::printf("link_check: all %zu entry points linked; empty calls launch nothing\n",
              sizeof(r) / sizeof(r[0]));
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
    csrc/ops/int8.cpp csrc/ops/optim.cpp csrc/registration.cpp; do
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
