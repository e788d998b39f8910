#!/usr/bin/env bash
# One run on a GPU machine: build lowbit with its CUDA kernels, run the CUDA tests (then the whole
# suite), and the GPU benchmarks when benchmarks/ has any. Everything it produces goes under $OUT
# (default ./out): env.txt, build.log, test_cuda.log + .xml, test_all.log + .xml, bench_*.log.
#
#   OUT=/some/dir bash tools/gpu_run.sh            # on the lent GPU machine, from the repo root
#
# A lent machine runs one command for at most 10 minutes, so the stages after the CUDA tests are
# optional and time-boxed: LOWBIT_GPU_SUITE=0 skips the whole-suite run, LOWBIT_GPU_BENCH=0 the
# benchmarks; LOWBIT_GPU_SUITE_TIMEOUT (default 240 s) and LOWBIT_GPU_BENCH_TIMEOUT (default 120 s
# per benchmark) bound them. Every log is written as it goes, so a run cut short keeps them.
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

# ---- environment --------------------------------------------------------------------------------
{
  date -u
  nvidia-smi || true
  command -v nvcc && nvcc --version
  "$PYTHON" -c 'import torch, sys; print("python", sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
  "$PYTHON" -m pip list 2>/dev/null | grep -iE "torch|scikit|pytest|numpy|transformers|bitsandbytes" || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)'; then
  say "FAILED: the installed torch has no CUDA or sees no GPU"
  exit 1
fi
ARCHS=${LOWBIT_CUDA_ARCHS:-$("$PYTHON" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')}

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

# ---- tests --------------------------------------------------------------------------------------
export HF_HUB_OFFLINE=1
"$PYTHON" -m pytest -q -rs tests/test_cuda.py --junitxml="$OUT/test_cuda.xml" >"$OUT/test_cuda.log" 2>&1
rc=$?
tail -25 "$OUT/test_cuda.log"
if [ $rc -ne 0 ]; then
  say "FAILED: tests/test_cuda.py (rc $rc)"
  status=1
  # Kernel errors are asynchronous: the failing test may not be the one whose launch went wrong.
  CUDA_LAUNCH_BLOCKING=1 timeout 120 "$PYTHON" -m pytest -q -rs --lf tests/test_cuda.py \
    >"$OUT/test_cuda_blocking.log" 2>&1
  say "failed tests again with CUDA_LAUNCH_BLOCKING=1: rc $? ($(tail -1 "$OUT/test_cuda_blocking.log"))"
else
  say "tests/test_cuda.py passed"
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
    sel=${LOWBIT_GPU_SANITIZE_K:-not past_int32 and not compile and not opcheck and not one_kernel}
    for tool in memcheck racecheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${LOWBIT_GPU_SANITIZE_TIMEOUT:-150}" \
        "$SAN" --tool "$tool" --error-exitcode 99 "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_cuda.py -k "$sel" >"$OUT/sanitize_$tool.log" 2>&1
      rc=$?
      say "compute-sanitizer $tool: rc $rc$([ $rc -eq 124 ] && echo " (timed out)")$([ $rc -eq 99 ] && echo " (ERRORS, see sanitize_$tool.log)")"
      [ $rc -eq 99 ] && status=1
    done
  fi
fi
if [ "${LOWBIT_GPU_SUITE:-1}" != 0 ]; then
  timeout "${LOWBIT_GPU_SUITE_TIMEOUT:-240}" "$PYTHON" -m pytest -q tests \
    --junitxml="$OUT/test_all.xml" >"$OUT/test_all.log" 2>&1
  rc=$?
  say "whole suite: rc $rc$([ $rc -eq 124 ] && echo " (timed out)") ($(tail -1 "$OUT/test_all.log"))"
else
  say "whole suite skipped (LOWBIT_GPU_SUITE=0)"
fi
[ "${LOWBIT_GPU_BENCH:-1}" != 0 ] || { say "benchmarks skipped (LOWBIT_GPU_BENCH=0)"; exit $status; }

# ---- benchmarks ---------------------------------------------------------------------------------
# Any benchmarks/*.py whose name or text mentions cuda/gpu; run from the repo root.
found=0
for b in benchmarks/*.py; do
  [ -f "$b" ] || continue
  if [[ "$b" == *gpu* || "$b" == *cuda* ]] || grep -qiE "cuda|gpu" "$b"; then
    found=1
    name=$(basename "$b" .py)
    timeout "${LOWBIT_GPU_BENCH_TIMEOUT:-120}" "$PYTHON" "$b" >"$OUT/bench_$name.log" 2>&1
    say "benchmark $b: rc $? (bench_$name.log)"
  fi
done
[ $found -eq 1 ] || say "no GPU benchmark in benchmarks/ yet"
for f in BENCHMARKS.md benchmarks/results; do [ -e "$f" ] && cp -r "$f" "$OUT/"; done
exit $status
