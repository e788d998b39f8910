#!/usr/bin/env python3
"""Build lowbit's CUDA kernels for cudasim (the CPU simulator of tools/cudasim) into one .so.

    python tools/cudasim/build.py [--asan] [--jobs N] [--out DIR]   (prints the .so path)

Steps: copy csrc/kernels/cuda/*.cu and *.cuh (not int8_gemm_lt.cu: cuBLASLt) into
build/cudasim/<variant>/src, rewriting mechanically
  * `kernel<...><<<grid, block[, smem[, stream]]>>>(args)` into a cudasim::launch_chevrons call,
  * `[extern] __shared__ T name[dims]...;` into per-block storage (cudasim::shared_var), and
  * `__global__ ... __launch_bounds__(b[, m]) name(params) {` into a kernel whose body starts with
    CUDASIM_KERNEL_ENTRY(b[, m]) (the simulator learns the kernel's name and bounds from it),
then compile each file with g++ (-std=c++17 -O1 -g -ffp-contract=off, cudasim.h force-included)
together with the runtime (cudasim.cpp) and every other .cpp of tools/cudasim (the C shims
shim*.cpp, one per kernel family; host-library stand-ins *_sim.cpp), and link. Anything the rewriter
does not recognise is an error, never silently left for g++ to misread.

Cached: each object is named by a hash of everything it is built from (its rewritten source, every
header, the flags); the .so by the hash of its objects, so an unchanged tree links nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNELS = ROOT / "csrc" / "kernels" / "cuda"
INCLUDE = ROOT / "csrc" / "include"
EXCLUDE = {"int8_gemm_lt.cu"}  # cuBLASLt: not simulated

BASE_FLAGS = [
    "-std=c++17",
    "-O1",
    "-g",
    "-fPIC",
    "-ffp-contract=off",  # __fmul_rn / __fadd_rn must stay separate roundings
    "-fno-strict-aliasing",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Wno-unused-function",
    "-Wno-unused-variable",
    "-Wno-unused-but-set-variable",
]
ASAN_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]


class RewriteError(Exception):
    pass


def mask_comments(src: str) -> str:
    """src with comments and string / character literals blanked (same length, newlines kept)."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a: int, b: int) -> None:
        for j in range(a, b):
            if out[j] != "\n":
                out[j] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            if j < 0:
                raise RewriteError("unterminated comment")
            blank(i, j + 2)
            i = j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, j)  # keep the quotes
            i = j + 1
        else:
            i += 1
    return "".join(out)


def match_close(text: str, i: int, open_c: str, close_c: str) -> int:
    """Index just past the bracket that closes the one at text[i]."""
    assert text[i] == open_c
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_c:
            depth += 1
        elif text[j] == close_c:
            depth -= 1
            if depth == 0:
                return j + 1
    raise RewriteError(f"unbalanced {open_c}{close_c}")


def split_top(text: str) -> list[str]:
    """Split at commas outside (), [] and {}."""
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def rewrite_kernels(src: str, masked: str, edits: list) -> None:
    for m in re.finditer(r"\b__global__\b", masked):
        end = m.end()
        depth = 0
        j = end
        while j < len(masked):
            c = masked[j]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif depth == 0 and c in "{;":
                break
            j += 1
        else:
            raise RewriteError(f"line {line_of(src, m.start())}: __global__ without a body")
        head = masked[end:j]
        lb = re.search(r"\b__launch_bounds__\s*\(", head)
        args = ""
        if lb:
            a0 = end + lb.end() - 1
            a1 = match_close(masked, a0, "(", ")")
            args = src[a0 + 1 : a1 - 1].strip()
            edits.append((end + lb.start(), a1, ""))
        edits.append((m.start(), m.end(), "/*__global__*/"))
        if masked[j] == "{":
            entry = f" CUDASIM_KERNEL_ENTRY({args});" if args else " CUDASIM_KERNEL_ENTRY();"
            edits.append((j + 1, j + 1, entry))


DECL = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\[\]]*\]\s*)*)$")
TYPE = re.compile(
    r"^(?P<type>(?:(?:const|volatile|unsigned|signed|long|short)\s+)*"
    r"(?:::)?[A-Za-z_][\w:]*(?:\s*<[^;]*>)?)\s+(?P<rest>.+)$",
    re.S,
)


def rewrite_shared(src: str, masked: str, edits: list) -> None:
    for m in re.finditer(r"\b__shared__\b", masked):
        ext = re.search(r"\bextern\s+$", masked[max(0, m.start() - 40) : m.start()])
        start = m.start() - (len(ext.group(0)) if ext else 0)
        end = masked.find(";", m.end())
        if end < 0:
            raise RewriteError(f"line {line_of(src, m.start())}: __shared__ without ';'")
        body = " ".join(src[m.end() : end].split())
        align = 16
        am = re.search(r"__align__\s*\(\s*(\d+)\s*\)", body)
        if am:
            align = max(align, int(am.group(1)))
            body = (body[: am.start()] + body[am.end() :]).strip()
        tm = TYPE.match(body)
        if not tm:
            raise RewriteError(f"line {line_of(src, m.start())}: unrecognised __shared__ `{body}`")
        ty = tm.group("type")
        out = []
        for d in split_top(tm.group("rest")):
            dm = DECL.match(d)
            if not dm:
                raise RewriteError(f"line {line_of(src, m.start())}: unrecognised declarator `{d}`")
            name, dims = dm.group("name"), dm.group("dims").replace(" ", "")
            if ext:
                if dims != "[]":
                    raise RewriteError(f"line {line_of(src, m.start())}: extern __shared__ `{d}`")
                out.append(
                    f"{ty}* const {name} = ::cudasim::dyn_shared<{ty}>(); "
                    f'static_assert({align} <= 128, "dynamic smem alignment");'
                )
            else:
                if "[]" in dims:
                    raise RewriteError(f"line {line_of(src, m.start())}: unsized `{d}`")
                t = f"cudasim_shared_t_{name}"
                out.append(
                    f"using {t} = {ty}{dims}; static char cudasim_key_{name}; "
                    f'{t}& {name} = ::cudasim::shared_var<{t}>(&cudasim_key_{name}, "{name}");'
                )
        edits.append((start, end + 1, " ".join(out)))


def rewrite_launches(src: str, masked: str, edits: list, fname: str) -> None:
    for m in re.finditer(r"<<<", masked):
        # The kernel expression: an identifier (with ::) and optional template arguments.
        j = m.start()
        while j > 0 and masked[j - 1].isspace():
            j -= 1
        k_end = j
        if masked[j - 1] == ">":
            depth = 0
            while j > 0:
                j -= 1
                if masked[j] == ">":
                    depth += 1
                elif masked[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
            while j > 0 and masked[j - 1].isspace():
                j -= 1
        while j > 0 and (masked[j - 1].isalnum() or masked[j - 1] in "_:"):
            j -= 1
        kexpr = " ".join(src[j:k_end].split())
        if not re.match(r"^(?:::)?[A-Za-z_][\w:]*(?:\s*<.*>)?$", kexpr, re.S):
            raise RewriteError(f"{fname}:{line_of(src, m.start())}: kernel expression `{kexpr}`")
        c_end = masked.find(">>>", m.end())
        if c_end < 0:
            raise RewriteError(f"{fname}:{line_of(src, m.start())}: <<< without >>>")
        cfg = split_top(src[m.end() : c_end])
        if not 2 <= len(cfg) <= 4 or any(not c for c in cfg):
            raise RewriteError(f"{fname}:{line_of(src, m.start())}: launch config {cfg}")
        cfg += ["0", "nullptr"][len(cfg) - 2 :]
        p = c_end + 3
        while masked[p].isspace():
            p += 1
        if masked[p] != "(":
            raise RewriteError(f"{fname}:{line_of(src, m.start())}: no argument list")
        p_end = match_close(masked, p, "(", ")")
        args = src[p + 1 : p_end - 1].strip()
        line = line_of(src, m.start())
        call = (
            f'::cudasim::launch_chevrons({kexpr}, "{kexpr}", "{fname}", {line}, '
            f"dim3({cfg[0]}), dim3({cfg[1]}), size_t({cfg[2]}), {cfg[3]}"
            + (f", {args})" if args else ")")
        )
        edits.append((j, p_end, call))


def preprocess(src: str, fname: str) -> str:
    masked = mask_comments(src)
    edits: list = []
    try:
        rewrite_kernels(src, masked, edits)
        rewrite_shared(src, masked, edits)
        rewrite_launches(src, masked, edits, fname)
    except RewriteError as e:
        raise RewriteError(f"{fname}: {e}") from None
    edits.sort(key=lambda e: (e[0], e[1]))
    for a, b in zip(edits, edits[1:]):
        if b[0] < a[1]:
            raise RewriteError(f"{fname}: overlapping rewrites at line {line_of(src, b[0])}")
    out = src
    for a, b, text in reversed(edits):
        # Keep the line numbers of the original (compiler messages, fault reports): a rewrite that
        # joined lines is padded with the newlines it removed.
        pad = src.count("\n", a, b) - text.count("\n")
        out = out[:a] + text + "\n" * max(0, pad) + out[b:]
    return out


def sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--asan", action="store_true", help="-fsanitize=address,undefined")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "cudasim")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    args = ap.parse_args(argv)
    variant = "asan" if args.asan else "default"
    out = args.out / variant
    src_dir = out / "src"
    obj_dir = out / "obj"
    src_dir.mkdir(parents=True, exist_ok=True)
    obj_dir.mkdir(parents=True, exist_ok=True)

    flags = BASE_FLAGS + (ASAN_FLAGS if args.asan else [])
    inc = [f"-I{src_dir}", f"-I{HERE / 'include'}", f"-I{INCLUDE}", f"-I{HERE}"]
    # Every header any TU may include: a change to one rebuilds everything (cheap to reason about).
    headers = (
        sorted(INCLUDE.rglob("*.h"))
        + sorted(HERE.glob("*.h"))
        + sorted((HERE / "include").glob("*.h"))
    )
    rewritten = {}
    for f in sorted(KERNELS.iterdir()):
        if f.suffix not in (".cu", ".cuh") or f.name in EXCLUDE:
            continue
        rewritten[f.name] = preprocess(f.read_text(), f.name)
    for name, text in rewritten.items():
        dst = src_dir / name
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
    hdr_hash = sha(
        *[h.read_bytes() for h in headers],
        *[rewritten[n].encode() for n in sorted(rewritten) if n.endswith(".cuh")],
        " ".join([args.cxx] + flags).encode(),
        Path(__file__).read_bytes(),
    )
    units = [(src_dir / n, ["-x", "c++"]) for n in sorted(rewritten) if n.endswith(".cu")]
    # The runtime, then every other .cpp here: the C shims (shim*.cpp, one per kernel family) and the
    # host-library stand-ins (*_sim.cpp), compiled like the kernels (cudasim.h force-included).
    units += [(HERE / "cudasim.cpp", [])]
    units += [(f, []) for f in sorted(HERE.glob("*.cpp")) if f.name != "cudasim.cpp"]
    jobs = []
    for path, lang in units:
        h = sha(path.read_bytes(), hdr_hash.encode())
        obj = obj_dir / f"{path.stem}-{h}.o"
        cmd = [args.cxx, *lang, *flags, *inc, "-include", str(HERE / "cudasim.h")]
        if path.name == "cudasim.cpp":
            cmd = [args.cxx, *flags, f"-I{HERE}"]
        cmd += ["-c", str(path), "-o", str(obj) + ".tmp"]
        jobs.append((path, obj, cmd))

    def compile_one(job):
        path, obj, cmd = job
        if obj.exists():
            return None
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return f"{path.name}: g++ failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}"
        os.replace(str(obj) + ".tmp", obj)
        return None

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as ex:
        errors = [e for e in ex.map(compile_one, jobs) if e]
    if errors:
        sys.stderr.write("\n".join(errors))
        raise SystemExit(1)
    objs = [j[1] for j in jobs]
    so_hash = sha(*[o.name.encode() for o in objs])
    so = out / f"libcudasim-{so_hash}.so"
    if not so.exists():
        cmd = [args.cxx, "-shared", *flags, *map(str, objs), "-o", str(so) + ".tmp"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(f"link failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
            raise SystemExit(1)
        os.replace(str(so) + ".tmp", so)
    # Old objects and libraries of this variant are stale: keep the folder small.
    keep = {o.name for o in objs}
    for o in obj_dir.glob("*.o"):
        if o.name not in keep:
            o.unlink()
    for s in out.glob("libcudasim-*.so"):
        if s != so:
            s.unlink()
    print(so)
    return so


if __name__ == "__main__":
    try:
        main()
    except RewriteError as e:
        sys.stderr.write(f"cudasim build: {e}\n")
        raise SystemExit(2) from None
