#!/usr/bin/env bash
# Static resource gate of lowbit's 4-bit CUDA kernels (issue #10, "when no GPU is at hand").
#
# Reads the objects that tools/cuda_compile_check.sh built (build/cuda-check; nothing is compiled
# here) and, for every kernel of the fourbit*.cu translation units and every architecture in them:
#   * registers, stack frame, static shared memory and local memory (cuobjdump
#     --dump-resource-usage), plus the dynamic shared memory the launcher asks for (mma tier);
#   * spills: the local-memory instructions in its SASS (STL = spill store, LDL = spill load; the
#     4-bit kernels keep no arrays in local memory, so any STL/LDL is the register allocator's);
#   * the width of its global loads: the GEMV must stream the packed weight with 128-bit loads
#     (ldg_stream16 -> LDG.E.NA.128) and read the activations with 128-bit loads too;
#   * the occupancy its launch configuration allows (blocks and warps per SM, from registers and
#     shared memory; the A100/H100 limits: 64K registers in 4 partitions, 64 warps, 32 blocks,
#     164 KB (sm_80) / 228 KB (sm_90) of shared memory with 1 KB reserved per block).
# Writes the table to benchmarks/results/cuda_resources.md (LOWBIT_CUDA_RESOURCES_OUT) and exits
# non-zero when a 4-bit kernel spills beyond one 32-bit value (one STL + one LDL, an 8-byte frame:
# what ptxas's occupancy heuristic leaves in a few GEMV instantiations; each is listed as a note),
# or a GEMV kernel lacks the 128-bit weight load.
#
# Not part of tools/cuda_compile_check.sh: the SASS dump of the ~540 kernels takes ~30 s of CPU
# (over a minute of wall time on the shared 2-core machine), past the ~20 s a CI step may add.
#
# cuobjdump and nvdisasm (which cuobjdump -sass runs) come from the CUDA toolkit when it has them;
# minimal toolkits (this project's CI) do not, so the pinned nvidia-cuda-cuobjdump and
# nvidia-cuda-nvdisasm wheels are downloaded once into the build folder (binaries only, ~6 MB).
#
# Environment: LOWBIT_CUDA_CHECK_DIR (as cuda_compile_check.sh), LOWBIT_CUDA_RESOURCES_OUT,
# JOBS (parallel SASS dumps, default 2), PYTHON (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${LOWBIT_CUDA_CHECK_DIR:-$ROOT/build/cuda-check}
OBJDIR=$BUILD/driver/build/kernels/CMakeFiles/lowbit_cuda_kernels.dir
OUT=${LOWBIT_CUDA_RESOURCES_OUT:-$ROOT/benchmarks/results/cuda_resources.md}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
TOOLS_PIN=${LOWBIT_CUDA_TOOLS_PIN:-13.5.37}
start=$(date +%s)

shopt -s nullglob
OBJS=("$OBJDIR"/fourbit*.cu.o)
shopt -u nullglob
if [ ${#OBJS[@]} -eq 0 ]; then
  echo "cuda_resources: FAILED: no fourbit*.cu.o in $OBJDIR (run tools/cuda_compile_check.sh first)" >&2
  exit 2
fi

# ---- cuobjdump + nvdisasm -----------------------------------------------------------------------
find_tool() {  # $1: name; prints its path or nothing
  local d
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return; fi
  for d in "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")" \
    /usr/local/cuda/bin /usr/local/cuda-*/bin "$BUILD/cuda-tools/bin"; do
    if [ -x "$d/$1" ]; then echo "$d/$1"; return; fi
  done
}
CUOBJDUMP=$(find_tool cuobjdump)
NVDISASM=$(find_tool nvdisasm)
if [ -z "$CUOBJDUMP" ] || [ -z "$NVDISASM" ]; then
  echo "cuda_resources: no cuobjdump/nvdisasm in the toolkit; fetching the $TOOLS_PIN wheels once"
  rm -rf "$BUILD/cuda-tools/wheels" && mkdir -p "$BUILD/cuda-tools/wheels" "$BUILD/cuda-tools/bin"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
    "nvidia-cuda-cuobjdump==$TOOLS_PIN" "nvidia-cuda-nvdisasm==$TOOLS_PIN" \
    -d "$BUILD/cuda-tools/wheels" || {
    echo "cuda_resources: FAILED: could not download the cuobjdump/nvdisasm wheels" >&2
    exit 2
  }
  "$PYTHON" - "$BUILD/cuda-tools/wheels" "$BUILD/cuda-tools/bin" <<'PYEOF'
import glob, os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
for whl in glob.glob(os.path.join(src, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if n.endswith("/bin/cuobjdump") or n.endswith("/bin/nvdisasm"):
                out = os.path.join(dst, os.path.basename(n))
                with z.open(n) as f, open(out, "wb") as g:
                    g.write(f.read())
                os.chmod(out, 0o755)
PYEOF
  rm -rf "$BUILD/cuda-tools/wheels"
  CUOBJDUMP=$BUILD/cuda-tools/bin/cuobjdump
  NVDISASM=$BUILD/cuda-tools/bin/nvdisasm
fi
export NVDISASM_PATH
NVDISASM_PATH=$(dirname "$NVDISASM")
export PATH="$NVDISASM_PATH:$PATH"

# ---- dump resources and SASS (in parallel, one object per job) -----------------------------------
DUMP=$BUILD/resources
rm -rf "$DUMP" && mkdir -p "$DUMP"
export CUOBJDUMP DUMP
printf '%s\n' "${OBJS[@]}" | xargs -P "$JOBS" -I{} sh -c \
  'b=$(basename "{}" .cu.o); "$CUOBJDUMP" --dump-resource-usage "{}" >"$DUMP/$b.res" &&
   "$CUOBJDUMP" -sass "{}" >"$DUMP/$b.sass"'

NVCC_VERSION=$(nvcc --version 2>/dev/null | tail -1 || echo "nvcc ?")
CUOBJDUMP_VERSION=$("$CUOBJDUMP" --version | tail -1)
mkdir -p "$(dirname "$OUT")"
"$PYTHON" - "$DUMP" "$OUT" "$NVCC_VERSION" "$CUOBJDUMP_VERSION" <<'PYEOF'
import glob, os, re, subprocess, sys

dump, out_path, nvcc_version, cuobjdump_version = sys.argv[1:5]

# Per (arch, mangled function): resources from --dump-resource-usage.
res = {}
for path in sorted(glob.glob(os.path.join(dump, "*.res"))):
    unit = os.path.basename(path)[: -len(".res")]
    arch = None
    fn = None
    for line in open(path):
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            reg, stack, shared, local = map(int, m.groups())
            res[(arch, fn)] = dict(unit=unit, reg=reg, stack=stack, shared=shared, local=local)
            fn = None

# Per (arch, function): SASS instruction counts.
LDG = re.compile(r"\bLDG\.E((?:\.\w+)*)")
sass = {}
for path in sorted(glob.glob(os.path.join(dump, "*.sass"))):
    arch = None
    cur = None
    for line in open(path):
        m = re.match(r"\s*code for (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = sass.setdefault((arch, m.group(1)), dict(stl=0, ldl=0, ldg128=0, ldg128na=0, ldg=0))
            continue
        if cur is None or "/*" not in line:
            continue
        ins = line.split("*/", 1)[-1]
        if re.search(r"\bSTL\b|\bSTL\.", ins):
            cur["stl"] += 1
        if re.search(r"\bLDL\b|\bLDL\.", ins):
            cur["ldl"] += 1
        m = LDG.search(ins)
        if m:
            mods = m.group(1).split(".")
            cur["ldg"] += 1
            if "128" in mods:
                cur["ldg128"] += 1
                if "NA" in mods:
                    cur["ldg128na"] += 1

names = sorted({fn for _, fn in res} | {fn for _, fn in sass})
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    demangled = dict(zip(names, dem))
except (OSError, subprocess.CalledProcessError):
    demangled = {n: n for n in names}


def short(name: str) -> str:
    s = demangled.get(name, name)
    s = re.sub(r"^void ", "", s)
    s = s.replace("lowbit::cuda::(anonymous namespace)::", "").replace("lowbit::cuda::", "")
    s = s.replace("(anonymous namespace)::", "")
    s = s.split("(", 1)[0]  # the parameter list
    s = s.replace("lowbit::", "")
    s = s.replace("CodeTablePolicy<float const*>", "CodeTable<absmax>")
    s = s.replace("CodeTablePolicy<BlockAbsmax>", "CodeTable<nested>")
    s = s.replace("AffinePolicy", "Affine").replace("bfloat16_t", "bf16").replace("half_t", "f16")
    s = s.replace("float const*", "absmax").replace("BlockAbsmax", "nested")
    return s


def family(s: str) -> str:
    return s.split("<", 1)[0]


# Launch configuration of each kernel family (the launchers in fourbit.cu, fourbit_gemv.cuh,
# fourbit_mma.cu): threads per block, and the dynamic shared memory of the mma tier, from its
# template arguments <T, Policy, BM, KC, STAGES> (MmaSmem: BM rows of 64 KC + 64 bytes and 128 W
# rows of 16 KC + 16 bytes per stage).
THREADS = {
    "gemv_4bit_fast_kernel": 256,
    "mma_4bit_kernel": 128,
    "splitk_reduce_kernel": 256,
    "gemm_4bit_generic_kernel": 128,
    "dequantize_4bit_kernel": 256,
    "dequantize_4bit_vec_kernel": 256,
    "quantize_4bit_kernel": 256,
    "quantize_4bit_vec_kernel": 256,
}


def dynamic_smem(s: str) -> int:
    if family(s) != "mma_4bit_kernel":
        return 0
    bm, kc, stages = map(int, re.findall(r",\s*(\d+)", s)[-3:])  # the last three arguments
    return stages * (bm * (64 * kc + 64) + 128 * (16 * kc + 16))


SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}


def occupancy(arch: str, threads: int, reg: int, smem: int):
    warps_per_block = threads // 32
    if reg > 0:
        per_warp = -(-reg * 32 // 256) * 256  # allocated per warp in units of 256 registers
        warps_regs = 4 * (16384 // per_warp)  # 4 partitions of 16K registers each
        by_regs = warps_regs // warps_per_block
    else:
        by_regs = 32
    by_smem = SMEM_PER_SM.get(arch, 164 * 1024) // (smem + 1024) if smem > 0 else 32
    blocks = min(32, 64 // warps_per_block, by_regs, by_smem)
    limit = "regs" if blocks == by_regs and by_regs < 64 // warps_per_block else (
        "smem" if blocks == by_smem and by_smem < 64 // warps_per_block else "warps")
    return blocks, blocks * warps_per_block, limit


rows, failures, warnings = [], [], []
for arch, fn in sorted(set(res) | set(sass), key=lambda k: (short(k[1]), k[0])):
    r = res.get((arch, fn), dict(unit="?", reg=0, stack=0, shared=0, local=0))
    a = sass.get((arch, fn), dict(stl=0, ldl=0, ldg128=0, ldg128na=0, ldg=0))
    s = short(fn)
    fam = family(s)
    threads = THREADS.get(fam, 256)
    dyn = dynamic_smem(s)
    blocks, warps, limit = occupancy(arch, threads, r["reg"], r["shared"] + dyn)
    rows.append((s, arch, r, a, dyn, threads, blocks, warps, limit))
    if a["stl"] or a["ldl"] or r["local"] or r["stack"]:
        msg = (f"{s} [{arch}]: local memory (STL {a['stl']}, LDL {a['ldl']}, "
               f"stack {r['stack']} B, local {r['local']} B)")
        # The budget: one spilled 32-bit value (one STL, one LDL, an 8-byte frame). ptxas's own
        # occupancy heuristic produces exactly that in a few GEMV instantiations (a loop-invariant
        # kept in L1 to stay at 64 / 80 registers, i.e. one more block per SM); forcing it out
        # (__launch_bounds__ min-blocks) cost a third of the warps per SM in the experiments of
        # issue #10. Anything beyond it fails.
        if a["stl"] <= 1 and a["ldl"] <= 1 and r["stack"] <= 8 and r["local"] == 0:
            warnings.append(msg + ": one spilled value, within the budget")
        else:
            failures.append(msg + ": spills")
    if fam == "gemv_4bit_fast_kernel" and a["ldg128na"] == 0:
        failures.append(f"{s} [{arch}]: no 128-bit streaming weight load (LDG.E.NA.128)")

# Summary per (family, arch): worst registers and lowest occupancy.
summary = {}
for s, arch, r, a, dyn, threads, blocks, warps, limit in rows:
    key = (family(s), arch)
    e = summary.setdefault(key, dict(n=0, reg_max=0, warps_min=64, spills=0))
    e["n"] += 1
    e["reg_max"] = max(e["reg_max"], r["reg"])
    e["warps_min"] = min(e["warps_min"], warps)
    e["spills"] += a["stl"] + a["ldl"]

with open(out_path, "w") as f:
    f.write("# CUDA 4-bit kernels: static resources\n\n")
    f.write(
        "Written by `tools/cuda_resources.sh` from the objects of `tools/cuda_compile_check.sh` "
        f"(nvcc: {nvcc_version}; cuobjdump: {cuobjdump_version}). Static analysis of the compiled "
        "code, not a GPU "
        "measurement. regs: registers per thread; stack: stack frame bytes; spill st/ld: local "
        "memory store/load instructions in the SASS (the gate allows one spilled value per kernel); smem: static + dynamic shared "
        "bytes per block; LDG128 (NA): 128-bit global loads (of them L1::no_allocate, the packed "
        "weight stream) / all global loads, as instructions in the code; blocks, warps/SM: the "
        "occupancy the launch configuration allows (limit: what bounds it), from 64K registers "
        "in 4 partitions, 64 warps, 32 blocks, 164 KB (sm_80) / 228 KB (sm_90) shared memory. "
        "Template arguments: gemv_4bit_fast_kernel<T, policy, MT (rows held), KSPLIT (warps per "
        "column group), COLS (columns per group)>; mma_4bit_kernel<T, policy, BM, KC (32-element "
        "chunks per k-tile), STAGES>.\n\n"
    )
    f.write("Gate: " + ("PASS" if not failures else f"FAIL ({len(failures)})") + "\n\n")
    for msg in failures:
        f.write(f"- FAIL: {msg}\n")
    for msg in warnings:
        f.write(f"- note: {msg}\n")
    f.write("\n## Summary per kernel family\n\n")
    f.write("| kernel | arch | instantiations | max regs | min warps/SM | spill instrs |\n")
    f.write("|---|---|---:|---:|---:|---:|\n")
    for (fam, arch), e in sorted(summary.items()):
        f.write(f"| {fam} | {arch} | {e['n']} | {e['reg_max']} | {e['warps_min']} | "
                f"{e['spills']} |\n")
    f.write("\n## Every kernel\n\n")
    f.write("| kernel | arch | regs | stack | spill st/ld | smem | LDG128 (NA) / LDG | threads "
            "| blocks/SM | warps/SM | limit |\n")
    f.write("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for s, arch, r, a, dyn, threads, blocks, warps, limit in rows:
        smem = f"{r['shared']}" + (f" + {dyn}" if dyn else "")
        f.write(
            f"| `{s}` | {arch} | {r['reg']} | {r['stack']} | {a['stl']}/{a['ldl']} | {smem} | "
            f"{a['ldg128']} ({a['ldg128na']}) / {a['ldg']} | {threads} | {blocks} | {warps} | "
            f"{limit} |\n"
        )

print(f"cuda_resources: {len(rows)} kernels x archs, table in {out_path}")
for (fam, arch), e in sorted(summary.items()):
    print(f"  {fam:28s} {arch}: {e['n']:3d} kernels, max {e['reg_max']:3d} regs, "
          f"min {e['warps_min']:2d} warps/SM, {e['spills']} spill instructions")
for msg in warnings:
    print(f"cuda_resources: note: {msg}")
if failures:
    for msg in failures:
        print(f"cuda_resources: {msg}", file=sys.stderr)
    print(f"cuda_resources: FAILED: {len(failures)} problem(s)", file=sys.stderr)
    sys.exit(1)
PYEOF
echo "cuda_resources: OK in $(($(date +%s) - start)) s"
