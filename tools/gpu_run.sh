#!/usr/bin/env bash
# One run on a GPU machine: build lowbit with its CUDA kernels, run the CUDA tests
# (tests/test_cuda*.py), the GPU benchmarks, then the whole suite. Everything it produces goes
# under $OUT (default ./out): summary.txt, env.txt, build.log, so_symbols.txt, test_unsorted.log,
# test_cuda.log + .xml, bench_lowbit_cuda.log + gpu.md, bench_model.log + model_gpu.md,
# bench_<other>.log, test_all.log + .xml.
#
#   OUT=/some/dir bash tools/gpu_run.sh            # on the lent GPU machine, from the repo root
#
# A lent machine runs one command for at most 10 minutes, so every stage after the build is
# time-boxed, most important first: LOWBIT_GPU_TEST_TIMEOUT (default 240 s, the CUDA tests),
# LOWBIT_GPU_BENCH_TIMEOUT (150 s, `python -m lowbit bench --device cuda --quick --tiers`),
# LOWBIT_GPU_MODEL_TIMEOUT (150 s, benchmarks/bench_model_gpu.py on LOWBIT_GPU_MODELS with
# LOWBIT_GPU_DECODE=graph|compile: a hand-captured CUDA graph, or torch.compile reduce-overhead),
# LOWBIT_GPU_OTHER_BENCH_TIMEOUT (90 s each), LOWBIT_GPU_SUITE_TIMEOUT (240 s, the whole suite).
# LOWBIT_GPU_SUITE=0 skips the whole suite, LOWBIT_GPU_BENCH=0 the benchmarks. Every log is
# written as it goes, so a run cut short keeps them.
#
# When the CUDA tests fail, the failed ones are run again with CUDA_LAUNCH_BLOCKING=1
# (test_cuda_blocking.log) so an asynchronous kernel error is reported at the launch that caused
# it. LOWBIT_GPU_SANITIZE=1 adds a compute-sanitizer stage (memcheck, then racecheck, on the kernel
# tests; sanitize_<tool>.log; LOWBIT_GPU_SANITIZE_TIMEOUT, default 150 s per tool, and
# LOWBIT_GPU_SANITIZE_K, a pytest -k selection); it is off by default because it is slow.
#
# The machine may have no network: nothing is downloaded. The installed torch must be a CUDA
# build; the kernels are compiled only for the GPU present (LOWBIT_CUDA_ARCHS overrides, e.g.
# "80;90"), which keeps the build to a minute or two. Exit status: non-zero if the build or the
# CUDA tests fail (the whole-suite result is reported but may fail for reasons unrelated to CUDA,
# e.g. optional packages missing offline).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
JOBS=$(nproc 2>/dev/null || echo 4)
status=0
say() { echo "gpu_run: $*" | tee -a "$OUT/summary.txt"; }

# nvcc is often installed but not on PATH (CMake's CUDA detection needs it): look where the
# toolkit usually lives, as tools/cuda_compile_check.sh does.
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDACXX:-}" ]; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
  done
fi

# Baselines carried from tools/gpu_prepare.sh (the machine has no network): bitsandbytes in .bnb,
# hqq and gemlite in .gpu-extras.
for d in .bnb .gpu-extras; do
  [ -d "$d" ] && export PYTHONPATH="$PWD/$d${PYTHONPATH:+:$PYTHONPATH}"
done

# ---- environment --------------------------------------------------------------------------------
{
  date -u
  nvidia-smi || true
  command -v nvcc && nvcc --version
  "$PYTHON" -c 'import torch, sys; print("python", sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
  "$PYTHON" -m pip list 2>/dev/null | grep -iE "torch|scikit|pytest|numpy|transformers|bitsandbytes" || true
  for m in bitsandbytes hqq gemlite triton; do
    "$PYTHON" -c "import $m; print('$m', getattr($m, '__version__', '?'), $m.__file__)" 2>&1 | tail -1
  done
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)'; then
  say "FAILED: the installed torch has no CUDA or sees no GPU"
  exit 1
fi
ARCHS=${LOWBIT_CUDA_ARCHS:-$("$PYTHON" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')}
# With a CUDA torch, torch's CMake config replaces CMAKE_CUDA_ARCHITECTURES by its own -gencode
# flags from TORCH_CUDA_ARCH_LIST (or a detection run): name the GPU present, so the build neither
# guesses nor compiles for other chips.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}

# ---- build --------------------------------------------------------------------------------------
# pip + scikit-build-core when present (the supported install), else plain CMake with the .so
# copied next to the Python sources and PYTHONPATH pointing there.
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
t0=$(date +%s)
if "$PYTHON" -c 'import scikit_build_core' 2>/dev/null; then
  "$PYTHON" -m pip install --no-build-isolation --no-deps -v \
    -C cmake.define.LOWBIT_CUDA=ON "-C" "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCHS" \
    -C build-dir=build/gpu . >"$OUT/build.log" 2>&1
  build_rc=$?
else
  {
    cmake -S . -B build/gpu-cmake -DCMAKE_BUILD_TYPE=Release -DLOWBIT_CUDA=ON \
      "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" "-DPython_EXECUTABLE=$(command -v "$PYTHON")" &&
      cmake --build build/gpu-cmake -j "$JOBS" &&
      cp build/gpu-cmake/_C*.so python/lowbit/
  } >"$OUT/build.log" 2>&1
  build_rc=$?
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ $build_rc -ne 0 ]; then
  tail -60 "$OUT/build.log"
  say "FAILED: build (see build.log)"
  exit 1
fi
say "build OK in $(($(date +%s) - t0)) s for sm_$ARCHS"
if ! (cd /tmp && "$PYTHON" -c 'import lowbit._C as c, sys; sys.exit(0 if c.with_cuda else 1)'); then
  say "FAILED: lowbit._C was built without CUDA"
  exit 1
fi
# How _C was linked (the SIGSEGV of 2026-11-30 was inside libstdc++ code that the backtrace put in
# _C): its NEEDED libraries, the std:: symbols it defines itself (a libstdc++ linked in statically
# shows here as locale/ostream/codecvt symbols), and the link command from the build log.
SO=$(cd /tmp && "$PYTHON" -c 'import lowbit._C as c; print(c.__file__)')
{
  echo "== $SO"
  readelf -d "$SO" | grep NEEDED
  echo "== std:: symbols defined in _C: $(nm -DC --defined-only "$SO" | grep -c ' std::')"
  nm -DC --defined-only "$SO" | grep -E " std::(locale|basic_ostream|basic_ios|codecvt|num_put|ctype|ios_base)" | head -20
  echo "== all defined std:: symbols (first 60)"
  nm -DC --defined-only "$SO" | grep " std::" | head -60
  echo "== compilers that built _C (.comment)"
  readelf -p .comment "$SO" 2>/dev/null | grep -v "^$"
  # A gcc-toolset / devtoolset g++ links libstdc++ through a linker script that adds
  # libstdc++_nonshared.a (pieces of libstdc++ copied into the .so): that would explain a second
  # copy of the locale/ostream code inside _C.
  LIBSTDCXX=$(${CXX:-g++} -print-file-name=libstdc++.so 2>/dev/null)
  echo "== $LIBSTDCXX: $(file -L "$LIBSTDCXX" 2>/dev/null)"
  head -c 300 "$LIBSTDCXX" 2>/dev/null | grep -a "INPUT\|GROUP" || true
  echo "== link line"
  grep -E -- "-o [^ ]*_C[^ ]*\.so" "$OUT/build.log" | tail -2
  echo "== compilers"
  grep -iE "compiler identification" "$OUT/build.log"
} >"$OUT/so_symbols.txt" 2>&1
say "$(grep '== std::' "$OUT/so_symbols.txt") (so_symbols.txt)"

# ---- tests --------------------------------------------------------------------------------------
export HF_HUB_OFFLINE=1
# The test that crashed the process on 2026-11-30 (SIGSEGV building an error message), alone
# first, so that a crash cannot take the rest of the CUDA tests with it.
timeout 60 "$PYTHON" -X faulthandler -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  -k rejects_unsorted_code >"$OUT/test_unsorted.log" 2>&1
say "test_quantize_blockwise_rejects_unsorted_code alone: rc $? ($(tail -1 "$OUT/test_unsorted.log"))"
# tests/test_cuda_4bit.py first: the new kernels' tests are what this run is for.
CUDA_TESTS="$(ls tests/test_cuda_4bit.py 2>/dev/null) $(ls tests/test_cuda*.py | grep -v test_cuda_4bit.py)"
timeout "${LOWBIT_GPU_TEST_TIMEOUT:-240}" "$PYTHON" -m pytest -q -rs $CUDA_TESTS \
  --deselect tests/test_cuda.py::test_quantize_blockwise_rejects_unsorted_code \
  --junitxml="$OUT/test_cuda.xml" >"$OUT/test_cuda.log" 2>&1
rc=$?
tail -25 "$OUT/test_cuda.log"
if [ $rc -ne 0 ]; then
  say "FAILED: CUDA tests (rc $rc$([ $rc -eq 124 ] && echo ", timed out"))"
  status=1
  # Kernel errors are asynchronous: the failing test may not be the one whose launch went wrong.
  CUDA_LAUNCH_BLOCKING=1 timeout 90 "$PYTHON" -m pytest -q -rs --lf $CUDA_TESTS \
    >"$OUT/test_cuda_blocking.log" 2>&1
  say "failed tests again with CUDA_LAUNCH_BLOCKING=1: rc $? ($(tail -1 "$OUT/test_cuda_blocking.log"))"
else
  say "CUDA tests passed: $(tail -1 "$OUT/test_cuda.log")"
fi

# ---- compute-sanitizer (optional) ---------------------------------------------------------------
# memcheck: out-of-bounds and misaligned device accesses; racecheck: shared-memory hazards (the
# staged code tables, the int8 GEMM tiles). The caching allocator is off so that memcheck sees
# each tensor's own bounds.
if [ "${LOWBIT_GPU_SANITIZE:-0}" != 0 ]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$SAN" ]; then
    say "compute-sanitizer not found: sanitizer stage skipped"
  else
    # Not under the sanitizer: CUDA-graph captures (with the caching allocator off a capture
    # would cudaMalloc, which is illegal), torch.compile, opcheck, the profiler-based tests and the
    # past-int32 sizes (minutes under memcheck).
    sel=${LOWBIT_GPU_SANITIZE_K:-not past_int32 and not compile and not opcheck and not one_kernel and not one_op and not graph}
    for tool in memcheck racecheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${LOWBIT_GPU_SANITIZE_TIMEOUT:-150}" \
        "$SAN" --tool "$tool" --error-exitcode 99 "$PYTHON" -m pytest -q -p no:cacheprovider \
        $CUDA_TESTS -k "$sel" >"$OUT/sanitize_$tool.log" 2>&1
      rc=$?
      say "compute-sanitizer $tool: rc $rc$([ $rc -eq 124 ] && echo " (timed out)")$([ $rc -eq 99 ] && echo " (ERRORS, see sanitize_$tool.log)")"
      [ $rc -eq 99 ] && status=1
    done
  fi
fi

# ---- benchmarks ---------------------------------------------------------------------------------
if [ "${LOWBIT_GPU_BENCH:-1}" != 0 ]; then
  # The package's bench module (4-bit products, every tier, quantize/dequantize): gpu.md.
  timeout "${LOWBIT_GPU_BENCH_TIMEOUT:-150}" "$PYTHON" -m lowbit bench --device cuda --quick \
    --tiers --out "$OUT/gpu.md" >"$OUT/bench_lowbit_cuda.log" 2>&1
  say "python -m lowbit bench --device cuda --quick --tiers: rc $? (bench_lowbit_cuda.log, gpu.md)"
  # Whole models (Llama-3-8B and TinyLlama shapes): model_gpu.md.
  timeout "${LOWBIT_GPU_MODEL_TIMEOUT:-150}" "$PYTHON" benchmarks/bench_model_gpu.py \
    --models "${LOWBIT_GPU_MODELS:-tinyllama,llama3-8b}" --decode "${LOWBIT_GPU_DECODE:-graph}" \
    --out "$OUT/model_gpu.md" \
    >"$OUT/bench_model.log" 2>&1
  say "benchmarks/bench_model_gpu.py: rc $? (bench_model.log, model_gpu.md)"
  # Any other benchmarks/*.py whose name mentions cuda/gpu (bench_gpu_int8.py: LLM.int8() and the
  # int8 GEMM; the 4-bit and quantize part ran above).
  for b in benchmarks/*.py; do
    [[ "$b" == *gpu* || "$b" == *cuda* ]] || continue
    [ "$b" = benchmarks/bench_model_gpu.py ] && continue
    name=$(basename "$b" .py)
    extra=()
    [ "$b" = benchmarks/bench_gpu_int8.py ] && extra=(--quick --out "$OUT/gpu_int8.md")
    [ "$b" = benchmarks/bench_gpu_formats.py ] && extra=(--quick --out "$OUT/gpu_formats.md")
    timeout "${LOWBIT_GPU_OTHER_BENCH_TIMEOUT:-90}" "$PYTHON" "$b" "${extra[@]}" \
      >"$OUT/bench_$name.log" 2>&1
    say "benchmark $b: rc $? (bench_$name.log)"
  done
else
  say "benchmarks skipped (LOWBIT_GPU_BENCH=0)"
fi

# ---- the whole suite (last: it may not fit the 10 minutes; its log is kept either way) ---------
if [ "${LOWBIT_GPU_SUITE:-1}" != 0 ]; then
  timeout "${LOWBIT_GPU_SUITE_TIMEOUT:-240}" "$PYTHON" -m pytest -q tests \
    --junitxml="$OUT/test_all.xml" >"$OUT/test_all.log" 2>&1
  rc=$?
  say "whole suite: rc $rc$([ $rc -eq 124 ] && echo " (timed out)") ($(tail -1 "$OUT/test_all.log"))"
else
  say "whole suite skipped (LOWBIT_GPU_SUITE=0)"
fi
for f in BENCHMARKS.md benchmarks/results; do [ -e "$f" ] && cp -r "$f" "$OUT/"; done
exit $status
