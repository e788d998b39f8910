#!/usr/bin/env bash
# The test command: install + build (tools/install.sh), lint, then the whole pytest suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k int8`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
ruff check python tests benchmarks
python -m pytest -q "$@"
