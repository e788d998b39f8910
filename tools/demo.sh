#!/usr/bin/env bash
# The main job: quantize the real all-MiniLM-L6-v2 weights to int8, NF4 and FP4 and print memory,
# speed and accuracy against fp32. Extra arguments go to `python -m lowbit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
HF_HUB_OFFLINE=1 python -m lowbit demo "$@"
