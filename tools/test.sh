#!/usr/bin/env bash
# The test command: install + build (tools/install.sh), lint, then the whole pytest suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k int8`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
ruff check python tests benchmarks
ruff format --check python tests benchmarks
# C++/CUDA formatting (.clang-format); from a git checkout, where the file list is known.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' | xargs clang-format --dry-run --Werror
fi
python -m pytest -q "$@"
