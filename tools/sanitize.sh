#!/usr/bin/env bash
# Sanitizer run: builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer
# (CMake option LOWBIT_SANITIZE) in its own virtual environment, then runs the op tests under it.
# Any out-of-bounds access, use-after-free or undefined behaviour in the C++ aborts the run.
#   bash tools/sanitize.sh [extra pytest args]   (the op, bad-input, edge-value and property tests)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LOWBIT_ASAN_VENV:-build/asan-venv}
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check torch==2.13.0 "numpy>=1.26,<3" "pytest==9.1.1" hypothesis \
  "scikit-build-core==1.1.0" ninja
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation \
  -C cmake.define.LOWBIT_SANITIZE=ON -C build-dir=build/asan .
# libstdc++ preloaded too: ASan intercepts __cxa_throw and must find the real one at start-up
# (python itself does not link libstdc++), or the first C++ exception aborts.
asan_rt="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# The op tests; extra arguments are passed on to pytest (e.g. -x, -k int8).
tests=(tests/test_ops_blockwise.py tests/test_ops_4bit.py tests/test_ops_int8.py
       tests/test_ops_affine.py tests/test_optim.py
       tests/test_bad_input.py tests/test_edge_values.py tests/test_properties.py)
# -s: a sanitizer report must reach the terminal before the abort (pytest's capture loses it).
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# The tests import lowbit from the venv's installed copy: run them from a directory where
# python/ is not on sys.path (pytest's rootdir insertion only adds tests/).
LD_PRELOAD="$asan_rt" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$py" -m pytest -q -s -p no:cacheprovider "${tests[@]}" "$@"
