#!/usr/bin/env bash
# Run HERE, before a device run: puts the Python packages the GPU benchmarks compare against into
# ignored folders of the checkout, since the GPU machine has no network. Name both in the device
# tool's `carry`; tools/gpu_run.sh puts them on PYTHONPATH when they are there.
#
#   bash tools/gpu_prepare.sh      # then carry [".bnb", ".gpu-extras"]
#
#   .bnb         bitsandbytes for Python 3.12 / CUDA 13 (../shared/tools/bnb_slim.sh, ~4.5 MB):
#                the NF4 and LLM.int8() baselines of `python -m lowbit bench --device cuda`,
#                benchmarks/bench_model_gpu.py and bench_gpu_int8.py.
#   .gpu-extras  hqq and gemlite (HQQ's own GPU paths; benchmarks/bench_gpu_formats.py) with their
#                pure-Python dependencies einops and termcolor, unpacked (< 1 MB). No CUDA build:
#                hqq's forward is PyTorch, gemlite's is Triton (shipped with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=("hqq==0.2.8.post1" "gemlite==0.6.0.post2" "einops==0.8.2" "termcolor==3.3.0")

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in .bnb .gpu-extras; do
  grep -qxF "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >>"$exclude"
done

if [ -f ../shared/tools/bnb_slim.sh ]; then
  bash ../shared/tools/bnb_slim.sh .bnb
else
  echo "gpu_prepare: ../shared/tools/bnb_slim.sh not found: no bitsandbytes baseline" >&2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-build-isolation \
  -d "$tmp" "${EXTRAS[@]}"
rm -rf .gpu-extras && mkdir -p .gpu-extras
# Wheels are zip files; sdists (hqq, gemlite) are tarballs whose package folder is all we need
# (their setup.py builds nothing for a plain install).
"$PYTHON" - "$tmp" .gpu-extras <<'PYEOF'
import glob, os, sys, tarfile, zipfile
src, dst = sys.argv[1], sys.argv[2]
for f in sorted(glob.glob(os.path.join(src, "*"))):
    if f.endswith(".whl"):
        with zipfile.ZipFile(f) as z:
            z.extractall(dst)
    elif f.endswith(".tar.gz"):
        with tarfile.open(f) as t:
            root = os.path.basename(f)[: -len(".tar.gz")]
            name = root.rsplit("-", 1)[0].replace("-", "_")
            members = [m for m in t.getmembers() if m.name.startswith(f"{root}/{name}/")]
            for m in members:
                m.name = m.name[len(root) + 1 :]
            t.extractall(dst, members=members, filter="data")
    else:
        sys.exit(f"gpu_prepare: unexpected download {f}")
    print("gpu_prepare: unpacked", os.path.basename(f))
PYEOF
PYTHONPATH=$PWD/.gpu-extras "$PYTHON" -c 'import hqq, einops, termcolor; print("gpu_prepare: hqq", hqq.__version__)'
du -sh .bnb .gpu-extras 2>/dev/null || true
