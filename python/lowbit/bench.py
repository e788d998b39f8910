"""Ratio benchmarks: `python -m lowbit bench --device cpu|cuda [--quick]`.

CPU (this docstring's first part) and CUDA (the section "CUDA" below, `--device cuda`, table in
benchmarks/results/gpu.md) share the command, the Row / render table and the rule: every figure
is a ratio against a baseline timed in the same process.

Every figure is a ratio against a baseline timed in the same process on the same shapes: torch
F.linear with bf16 weights, torch.ao dynamic int8 Linear (fbgemm), bitsandbytes' CPU backend
and a plain tensor copy (memory bandwidth). Weights and inputs rotate over enough copies that the
working set exceeds the last-level cache; each time is the median of several repeats, with all
of torch's threads. The table goes to stdout and to benchmarks/results/cpu.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lowbit import functional as LF
from lowbit._native import cpu_gemv_mode, cpu_isa, cpu_matmul_dtype

ops = torch.ops.lowbit
LLC_BYTES = 32 << 20  # rotate so that every timed working set exceeds this (x4)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copies_for(nbytes: int) -> int:
    return max(2, -(-4 * LLC_BYTES // max(nbytes, 1)))


def timeit(fn, args_list, repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` calls, cycling through args_list."""
    fn(*args_list[0])
    fn(*args_list[-1])
    times = []
    for i in range(repeats):
        a = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Row:
    case: str
    ours_ms: float
    base_name: str
    base_ms: float
    bar: float | None  # required ratio base/ours (speed-up); None: information only
    extra: str = ""
    bw: float | None = None  # bytes per second, compared with the copy bandwidth in render()
    bw_bar: float | None = None  # required percentage of copy bandwidth

    def notes(self, copy_bw: float) -> str:
        if self.bw is None:
            return self.extra
        text = f"{self.bw / 1e9:.1f} GB/s = {100 * self.bw / copy_bw:.0f}% of copy"
        if self.bw_bar is not None:
            text += f" (bar {self.bw_bar:g}%)"
        return f"{text}, {self.extra}" if self.extra else text

    @property
    def ratio(self) -> float:
        return self.base_ms / self.ours_ms

    def status(self) -> str:
        if self.bar is None:
            return ""
        if self.ratio >= self.bar:
            return "met"
        return f"MISSED by {100 * (1 - self.ratio / self.bar):.0f}%"


def _back_guest_memory(nbytes: int = 3 << 30) -> None:
    """Touch (and free) nbytes once. On a VM the first write to guest memory the host has never
    backed costs a host-side fault per page: measured 90 ms instead of 7 for one fresh 64 MiB
    output here, for the first calls only. After this, allocating ops (lowbit's and bitsandbytes'
    alike) time their own work and the guest kernel's page faults, as in a long-running process."""
    try:  # never more than a quarter of what is free now
        nbytes = min(nbytes, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError):
        nbytes = min(nbytes, 512 << 20)
    chunk = 256 << 20
    bufs = []
    for _ in range(max(1, nbytes // chunk)):
        b = torch.empty(chunk, dtype=torch.uint8)
        b.fill_(1)
        bufs.append(b)
    del bufs


def _copy_bandwidth(repeats: int) -> float:
    """Bytes moved (read + write) per second by a plain copy_ of 64 MiB buffers."""
    n = 64 << 20
    src = [torch.empty(n, dtype=torch.uint8).random_() for _ in range(2)]
    dst = [torch.empty(n, dtype=torch.uint8) for _ in range(2)]
    t = timeit(lambda s, d: d.copy_(s), list(zip(src, dst)), repeats)
    return 2 * n / t


def bench_gemv4(rows, shapes, repeats):
    code = LF.get_4bit_type("nf4")
    for N, K in shapes:
        w = torch.randn(N, K)
        packed, absmax = ops.quantize_4bit(w, 64, "nf4", torch.uint8)
        qbytes = packed.numel() + absmax.numel() * 4
        nq = copies_for(qbytes)
        qs = [(packed.clone(), absmax.clone()) for _ in range(nq)]
        wb = w.to(torch.bfloat16)
        wbs = [wb.clone() for _ in range(copies_for(wb.numel() * 2))]
        del w
        xb = torch.randn(1, K, dtype=torch.bfloat16)
        t_base = timeit(lambda W: F.linear(xb, W), [(W,) for W in wbs], repeats)
        for dt in (torch.bfloat16, torch.float32):
            x = xb.to(dt)
            t = timeit(lambda p, m: ops.gemv_4bit(x, p, [N, K], m, code, 64), qs, repeats)
            bw = qbytes / t
            tag = "bf16" if dt == torch.bfloat16 else "fp32"
            bar = 2.5 if (N, K) == (4096, 4096) else 3.0
            rows.append(
                Row(
                    f"NF4 GEMV M=1 {N}x{K} ({tag} act)",
                    1e3 * t,
                    "bf16 F.linear",
                    1e3 * t_base,
                    bar,
                    bw=bw,
                    bw_bar=75,
                )
            )
        del qs, wbs


def bench_int8(rows, shapes, ms, repeats, qdyn: bool):
    for N, K in shapes:
        w = torch.randn(N, K)
        wq, ws, _ = ops.int8_vectorwise_quant(w, 0.0)
        q8 = [(wq.clone(), ws.clone()) for _ in range(copies_for(wq.numel()))]
        wb = w.to(torch.bfloat16)
        wbs = [wb.clone() for _ in range(copies_for(wb.numel() * 2))]
        dyn = []
        if qdyn:
            for _ in range(copies_for(wq.numel())):
                lin = torch.nn.Linear(K, N, bias=False)
                lin.weight.data.copy_(w)
                dyn.append(
                    torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, torch.qint8)
                )
        del w
        for M in ms:
            reps = repeats if M <= 128 else max(3, repeats // 3)
            xb = torch.randn(M, K, dtype=torch.bfloat16)
            t = timeit(lambda W, s: ops.int8_linear(xb, W, s, None, 6.0), q8, reps)
            t_base = timeit(lambda W: F.linear(xb, W), [(W,) for W in wbs], reps)
            bar = 1.7 if M == 1 else 1.5
            rows.append(
                Row(f"LLM.int8 linear M={M} {N}x{K}", 1e3 * t, "bf16 F.linear", 1e3 * t_base, bar)
            )
            if qdyn and M > 1:
                xf = xb.float()
                t_dyn = timeit(lambda m: m(xf), [(m,) for m in dyn], reps)
                rows.append(
                    Row(
                        f"LLM.int8 linear M={M} {N}x{K}",
                        1e3 * t,
                        "torch dynamic int8 Linear",
                        1e3 * t_dyn,
                        1.0,
                    )
                )
        del q8, wbs, dyn


def bench_nf4_gemm(rows, shapes, ms, repeats):
    """NF4 Linear at M > 1 as Linear4bit runs it on the CPU: gemv_4bit, which picks the int8-
    activation kernel (M <= 32) or BLAS on dequantized weight tiles (larger M: bf16 tiles on CPUs
    with native bf16, _native.cpu_matmul_dtype())."""
    code = LF.get_4bit_type("nf4")
    for N, K in shapes:
        w = torch.randn(N, K)
        packed, absmax = ops.quantize_4bit(w, 64, "nf4", torch.uint8)
        qs = [(packed.clone(), absmax.clone()) for _ in range(copies_for(packed.numel()))]
        wb = w.to(torch.bfloat16)
        wbs = [wb.clone() for _ in range(copies_for(wb.numel() * 2))]
        del w
        for M in ms:
            reps = repeats if M <= 128 else max(3, repeats // 3)
            xb = torch.randn(M, K, dtype=torch.bfloat16)
            t = timeit(lambda p, m: ops.gemv_4bit(xb, p, [N, K], m, code, 64), qs, reps)
            t_base = timeit(lambda W: F.linear(xb, W), [(W,) for W in wbs], reps)
            rows.append(
                Row(
                    f"NF4 linear M={M} {N}x{K} (bf16 act)",
                    1e3 * t,
                    "bf16 F.linear",
                    1e3 * t_base,
                    0.8 if M >= 128 else None,
                    "int8 activations"
                    if M <= 32 and cpu_gemv_mode() == "int8"
                    else f"BLAS on {cpu_matmul_dtype() if M > 32 else 'fp32'} weight tiles",
                )
            )
        del qs, wbs


def bench_quant(rows, shape, repeats):
    """Blockwise 8-bit (blocksize 4096) and NF4 (blocksize 64) quantize / dequantize of a bf16
    tensor of `shape`, against bitsandbytes' CPU backend in the same process.

    Speed-up (bar 3x): the same call on both sides: bf16 in, codes + fp32 absmax out (quantize),
    or codes + absmax in, a new bf16 tensor out (dequantize); each side allocates its outputs
    inside the call (bitsandbytes' CPU ops have no out= form) and reads the same number of
    rotated input copies. bitsandbytes runs its C kernels where it has them (8-bit both ways,
    NF4 dequantize) and its torch fallback for NF4 quantize (it has no CPU kernel for it).

    Bandwidth (bar 60% of a plain copy_): bytes read + written by the kernel (bf16 = 2 bytes,
    codes 1 or 1/2 byte per element) over the time of our op with its output preallocated
    (dequantize .out) or allocated by the op (quantize has no out= form; its 8-16 MiB outputs
    come back from the allocator without new page faults). A fresh 16-32 MiB output costs page
    faults on first touch, which no kernel can avoid and both sides of the speed-up pay: the
    notes give that cost as measured here (torch.empty + fill_ of the same size).
    """
    try:
        import bitsandbytes.functional as BF
    except Exception:  # bitsandbytes missing or broken: bandwidth only
        BF = None
    n = shape[0] * shape[1]
    A = torch.randn(shape, dtype=torch.bfloat16)
    copies = copies_for(n * 2)
    As = [(A.clone(),) for _ in range(copies)]
    code8 = LF.create_dynamic_map(signed=True)
    out16 = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(2)]
    fresh_ms = 1e3 * timeit(
        lambda: torch.empty(shape, dtype=torch.bfloat16).fill_(0), [()], repeats
    )

    def dq8_out(q, m, o):
        return ops.dequantize_blockwise.out(q, m, code8, 4096, torch.bfloat16, out=o)

    def dq4_out(p, m, o):
        return ops.dequantize_4bit.out(p, m, 64, "nf4", list(shape), torch.bfloat16, out=o)

    q8 = [ops.quantize_blockwise(a, code8, 4096) for (a,) in As]
    q4 = [ops.quantize_4bit(a, 64, "nf4", torch.uint8) for (a,) in As]
    bq8 = [(BF.quantize_blockwise(a, blocksize=4096),) for (a,) in As] if BF else None
    bq4 = [BF.quantize_4bit(a, blocksize=64, quant_type="nf4") for (a,) in As] if BF else None
    # (name, ours, bnb, bytes moved, args for ours, args for bnb, out= form or None)
    cases = [
        (
            "8-bit blockwise quantize",
            lambda a: ops.quantize_blockwise(a, code8, 4096),
            (lambda a: BF.quantize_blockwise(a, blocksize=4096)) if BF else None,
            n * 3,
            As,
            As,
            None,
        ),
        (
            "8-bit blockwise dequantize",
            lambda q, m: ops.dequantize_blockwise(q, m, code8, 4096, torch.bfloat16),
            (lambda qs: BF.dequantize_blockwise(*qs)) if BF else None,
            n * 3,
            q8,
            bq8,
            dq8_out,
        ),
        (
            "NF4 quantize",
            lambda a: ops.quantize_4bit(a, 64, "nf4", torch.uint8),
            (lambda a: BF.quantize_4bit(a, blocksize=64, quant_type="nf4")) if BF else None,
            n * 2 + n // 2,
            As,
            As,
            None,
        ),
        (
            "NF4 dequantize",
            lambda p, m: ops.dequantize_4bit(p, m, 64, "nf4", list(shape), torch.bfloat16),
            (lambda p, s: BF.dequantize_4bit(p, s)) if BF else None,
            n * 2 + n // 2,
            q4,
            bq4,
            dq4_out,
        ),
    ]
    for name, ours, bnb, nbytes, args, bargs, out_form in cases:
        t = timeit(ours, args, repeats)
        if out_form is not None:
            t_bw = timeit(out_form, [(*a, out16[i % 2]) for i, a in enumerate(args)], repeats)
            how = f"kernel (out=) {1e3 * t_bw:.2f} ms"
            how += f"; fresh bf16 output first touch {fresh_ms:.1f} ms"
        else:
            t_bw = t
            how = "whole op"
        bw = nbytes / t_bw
        label = f"{name} {shape[0]}x{shape[1]} bf16"
        if bnb is not None:
            t_b = timeit(bnb, bargs, repeats)
            rows.append(Row(label, 1e3 * t, "bitsandbytes CPU", 1e3 * t_b, 3.0, how, bw, 60))
        else:
            rows.append(Row(label, 1e3 * t, "(bitsandbytes missing)", 1e3 * t, None, how, bw, 60))


def _ms(ms: float) -> str:
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"  # GPU kernels take microseconds


def _hqq_linear(w: torch.Tensor, group_size: int):
    """HQQ's own CPU path for its format (hqq 0.2.x, pytorch backend: dequantize, then matmul), or
    None when hqq does not import. Round-to-nearest (optimize=False) so that building it takes
    seconds; the forward it times is the same."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except Exception:
        return None
    cfg = BaseQuantizeConfig(nbits=4, group_size=group_size, axis=1)
    cfg["weight_quant_params"]["optimize"] = False
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    return HQQLinear(lin, cfg, compute_dtype=torch.bfloat16, device="cpu", del_orig=True)


def bench_affine(rows, ms, repeats):
    """The affine 4/8-bit format of GPTQ / AWQ / HQQ / compressed-tensors checkpoints
    (gemm_affine): int4 group size 128 asymmetric on 11008x4096 (bar at M = 1: 3x bf16 F.linear),
    against fp32 F.linear too, int8 at M = 1, and HQQ's own CPU forward where hqq installs.
    compressed-tensors has no CPU kernel: it decompresses its weights to dense bf16 once, so its
    forward is the bf16 F.linear baseline. M <= 32 runs the int8-activation kernel (4-bit), larger
    M BLAS on dequantized weight tiles, as for NF4."""
    N, K, g = 11008, 4096, 128
    w = torch.randn(N, K)
    packed, scales, zeros = ops.quantize_affine(w, 4, g, False)
    qbytes = packed.numel() + 8 * scales.numel()
    qs = [(packed.clone(), scales.clone(), zeros.clone()) for _ in range(copies_for(qbytes))]
    wb = w.to(torch.bfloat16)
    wbs = [(wb.clone(),) for _ in range(copies_for(wb.numel() * 2))]
    mode = "int8 activations" if cpu_gemv_mode() == "int8" else "fp32 activations"
    for M in ms:
        reps = repeats * 2 if M == 1 else repeats
        xb = torch.randn(M, K, dtype=torch.bfloat16)
        t = timeit(lambda p, s, z: ops.gemm_affine(xb, p, [N, K], s, z, 4, g), qs, reps)
        t_base = timeit(lambda W: F.linear(xb, W), wbs, reps)
        how = mode if M <= 32 else f"BLAS on {cpu_matmul_dtype()} weight tiles"
        bar = 3.0 if M == 1 else (0.8 if M >= 128 else None)
        bw = qbytes / t if M == 1 else None
        label = f"int4 g128 asym linear M={M} {N}x{K} (bf16 act)"
        rows.append(Row(label, 1e3 * t, "bf16 F.linear", 1e3 * t_base, bar, how, bw))
        if M == 1:
            xf = xb.float()
            t32 = timeit(lambda p, s, z: ops.gemm_affine(xf, p, [N, K], s, z, 4, g), qs, reps)
            wf = [(W.float(),) for (W,) in wbs[:2]]
            t_f = timeit(lambda W: F.linear(xf, W), wf, reps)
            del wf
            label = f"int4 g128 asym linear M=1 {N}x{K} (fp32 act)"
            rows.append(Row(label, 1e3 * t32, "fp32 F.linear", 1e3 * t_f, None, how, qbytes / t32))
            hqq = _hqq_linear(wb, g)
            if hqq is not None:
                import hqq as hqq_pkg

                t_h = timeit(lambda: hqq(xb), [()], max(3, repeats // 3))
                base = f"hqq {hqq_pkg.__version__} HQQLinear (CPU, pytorch backend)"
                rows.append(Row(label.replace("fp32", "bf16"), 1e3 * t, base, 1e3 * t_h, 2.0))
                del hqq
    del qs
    # int8 codes (GPTQ / compressed-tensors 8-bit): the exact fused kernel at M = 1.
    p8, s8, z8 = ops.quantize_affine(w, 8, g, False)
    q8bytes = p8.numel() + 8 * s8.numel()
    q8s = [(p8.clone(), s8.clone(), z8.clone()) for _ in range(copies_for(q8bytes))]
    xb = torch.randn(1, K, dtype=torch.bfloat16)
    t = timeit(lambda p, s, z: ops.gemm_affine(xb, p, [N, K], s, z, 8, g), q8s, repeats * 2)
    t_base = timeit(lambda W: F.linear(xb, W), wbs, repeats * 2)
    rows.append(
        Row(
            f"int8 g128 asym linear M=1 {N}x{K} (bf16 act)",
            1e3 * t,
            "bf16 F.linear",
            1e3 * t_base,
            None,
            mode,
            q8bytes / t,
        )
    )
    del q8s, wbs


def render(rows, header: list[str], copy_bw: float) -> str:
    lines = header + [
        "",
        "| case | lowbit ms | baseline | baseline ms | speed-up | bar | status | notes |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        bar = f">= {r.bar:g}x" if r.bar is not None else ""
        lines.append(
            f"| {r.case} | {_ms(r.ours_ms)} | {r.base_name} | {_ms(r.base_ms)} | "
            f"{r.ratio:.2f}x | {bar} | {r.status()} | {r.notes(copy_bw)} |"
        )
    return "\n".join(lines) + "\n"


def _emit(text: str, out: str | None) -> int:
    """Print the table and write it to `out` (the CPU and CUDA benchmarks alike)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(f"written to {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (< 2 minutes)")
    p.add_argument(
        "--out",
        default=os.path.join("benchmarks", "results", "cpu.md"),
        help="where to write the table (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--tiers", action="store_true", help="cuda: time every 4-bit product tier")
    p.add_argument(
        "--tiers-affine",
        action="store_true",
        help="cuda: the same for the affine int4 g128 product (as long again as --tiers)",
    )
    p.add_argument("--repeats", type=int, default=None, help="cuda: repeats per timing")
    args = p.parse_args(argv)
    if args.device == "cuda":
        if args.out == p.get_default("out"):
            args.out = os.path.join("benchmarks", "results", "gpu.md")
        return main_cuda(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quick = args.quick
    repeats = 7 if quick else 15
    t_start = time.perf_counter()
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception:
        bnb_version = "not installed"
    # The copy is timed at the start, in the middle and at the end, and the best of the three is
    # the denominator: on a shared machine a single timing can land in a slow moment, which would
    # flatter every bandwidth percentage.
    _back_guest_memory()
    copy_bws = [_copy_bandwidth(repeats)]
    rows: list[Row] = []
    gemv_shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    if not quick:
        gemv_shapes += [(14336, 4096), (4096, 14336)]
    bench_gemv4(rows, gemv_shapes, repeats * 2)
    bench_int8(
        rows,
        [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)],
        [1],
        repeats * 2,
        qdyn=False,
    )
    bench_int8(rows, [(4096, 4096)], [128] if quick else [128, 512, 2048], repeats, qdyn=True)
    bench_nf4_gemm(rows, [(4096, 4096)], [16, 128] if quick else [16, 128, 512, 2048], repeats)
    bench_affine(rows, [1, 16, 128], repeats)
    copy_bws.append(_copy_bandwidth(repeats))
    bench_quant(rows, (4096, 4096) if quick else (8192, 4096), repeats)
    copy_bws.append(_copy_bandwidth(repeats))
    copy_bw = max(copy_bws)
    header = [
        "## lowbit CPU benchmark",
        "",
        f"- command: `python -m lowbit bench --device cpu{' --quick' if quick else ''}`",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; kernels ISA: **{cpu_isa()}**;"
        f" 4-bit products with {cpu_gemv_mode()} activations (LOWBIT_CPU_GEMV)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads; bitsandbytes {bnb_version}",
        f"- copy bandwidth (read + write), best of {len(copy_bws)} timings: {copy_bw / 1e9:.1f} GB/s"
        f" ({', '.join(f'{b / 1e9:.1f}' for b in copy_bws)}); speed-up = baseline ms / lowbit ms;"
        f" medians of {repeats}+ runs, weights rotated over > {4 * LLC_BYTES >> 20} MiB",
        f"- total bench time {time.perf_counter() - t_start:.0f} s",
    ]
    text = render(rows, header, copy_bw)
    return _emit(text, args.out)


# ---- CUDA ---------------------------------------------------------------------------------------
# `python -m lowbit bench --device cuda [--quick] [--tiers]`: the same Row table, timed with CUDA
# events, L2 flushed (a 256 MiB write) before every call so weights come from HBM as in a model,
# median of repeats. Baselines timed in the same process: bf16 F.linear (cuBLAS), a device copy
# (bandwidth, bytes read + written) and bitsandbytes when it imports with CUDA.
#
# Every function below takes the device and the timer as arguments; the CUDA-only pieces are
# CudaTimer (events, L2 flush), _cuda_description and main_cuda. tests/test_bench_smoke.py runs the
# rest (run_cuda) on the CPU with tiny shapes and a trivial timer, so that a Python error in the
# GPU benchmark shows up here rather than in the few minutes a lent GPU machine gives.

GPU_SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (4096, 4096)]
GPU_QUICK_SHAPES = [(4096, 4096), (11008, 4096), (4096, 14336)]
GPU_MS = [16, 32, 64, 128, 512, 2048]  # M > 1 (M = 1 has its own rows)
GPU_TIER_MS = [1, 4, 8, 16, 32, 64, 128, 256, 512, 2048]
# speed-up bars over bf16 F.linear by M (issue #10); M = 1 is 3.0x (2.5x at 4096x4096)
GPU_BARS = {16: 2.5, 32: 2.0, 64: 1.3, 128: 0.8, 512: 0.8, 2048: 0.9}
AFFINE_GROUP = 128  # issue #13's GPU rows: int4, group size 128, asymmetric


def gpu_bar(N: int, K: int, M: int) -> float | None:
    """The speed-up bar over bf16 F.linear of a 4-bit product (NF4, FP4 and affine alike)."""
    if M == 1:
        return 2.5 if (N, K) == (4096, 4096) else 3.0
    return GPU_BARS.get(M)


@dataclass
class CudaPlan:
    """What run_cuda times: cuda_plan() gives the real run's; a smoke test passes tiny ones."""

    gemv_shapes: list[tuple[int, int]]  # NF4 at M = 1
    gemm_shapes: list[tuple[int, int]]  # NF4 at every M in ms; the --tiers table
    ms: list[int]  # M > 1
    affine_shapes: list[tuple[int, int]]  # affine int4 at M = 1 and every M in ms, NF4 beside
    affine8_shape: tuple[int, int]  # the one affine 8-bit row (M = 1)
    quant_n: int  # elements quantized / dequantized
    copy_bytes: int = 1 << 30  # the copy that gives the bandwidth
    tier_ms: list[int] = field(default_factory=lambda: list(GPU_TIER_MS))


def cuda_plan(quick: bool) -> CudaPlan:
    shapes = GPU_QUICK_SHAPES if quick else GPU_SHAPES
    return CudaPlan(
        gemv_shapes=list(shapes),
        gemm_shapes=list(shapes[:2]),
        ms=list(GPU_MS),
        affine_shapes=list(shapes),
        affine8_shape=(11008, 4096),
        quant_n=(4096 * 4096) if quick else (8192 * 8192),
    )


class CudaTimer:
    """Median seconds of fn() over `repeats` calls, CUDA events, L2 flushed before each."""

    def __init__(self, repeats: int):
        self.repeats = repeats
        self.description = f"CUDA events, L2 flushed before each call, median of {repeats}"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        fn()
        fn()
        ev = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.repeats)
        ]
        for a, b in ev:
            self.flush.zero_()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev) / 1e3


class MsTimer:
    """Median milliseconds of fn() over `repeats` calls after 3 warm-up calls (plans, autotuning,
    compilation, the allocator), for the benchmarks/*gpu*.py scripts. On CUDA: events, L2 flushed
    (a 256 MiB write) before each call so weights come from HBM as in a model. Elsewhere:
    perf_counter, so the scripts' code paths run on the CPU (their smoke tests)."""

    def __init__(self, device: str, repeats: int):
        self.device, self.repeats = device, repeats
        cuda = torch.device(device).type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if cuda else None

    def __call__(self, fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _cuda_copy_bandwidth(timer, device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * nbytes / t


def _cuda_description() -> str:
    props = torch.cuda.get_device_properties(0)
    return (
        f"GPU: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )


def _bnb_functional(device):
    """bitsandbytes.functional when it imports and quantizes on `device`, else None."""
    try:
        import bitsandbytes.functional as bnb_F

        w = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4")  # has a library for the device?
        return bnb_F
    except Exception:  # noqa: BLE001  (no bitsandbytes, or no CUDA library in it)
        return None


def _q4(W, quant_type="nf4", nested=False):
    """(packed, state, gemv args after A) of a bf16 weight, on its device."""
    packed, st = LF.quantize_4bit(
        W, blocksize=64, quant_type=quant_type, compress_statistics=nested
    )
    N, K = W.shape
    args = (packed, [N, K], st.absmax, st.code, 64, *LF.nested_absmax_args(st))
    return packed, st, args


def _gemv_bytes(packed, st, x, N) -> int:
    return (
        packed.numel() * packed.element_size()
        + st.absmax.numel() * st.absmax.element_size()
        + (x.numel() + x.shape[0] * N) * x.element_size()
    )


def bench_cuda_gemv1(rows, timer, shapes, bnb_F, device):
    """M = 1: the decode of one token (memory-bound: the bar is bandwidth)."""
    for N, K in shapes:
        W = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        packed, st, args = _q4(W)
        _, st_dq, args_dq = _q4(W, nested=True)
        _, _, args_fp4 = _q4(W, "fp4")
        x = torch.randn(1, K, device=device, dtype=torch.bfloat16)
        base = timer(lambda: F.linear(x, W))
        t = timer(lambda: ops.gemv_4bit(x, *args))
        t_dq = timer(lambda: ops.gemv_4bit(x, *args_dq))
        t_fp4 = timer(lambda: ops.gemv_4bit(x, *args_fp4))
        xh = x.half()
        t16 = timer(lambda: ops.gemv_4bit(xh, *args))
        extra = (
            f"double quant {t_dq / t:.3f}x time (bar <= 1.05); FP4 {t_fp4 / t:.3f}x time "
            f"(bar <= 1.05); fp16 act {t16 / t:.3f}x time"
        )
        if bnb_F is not None:
            try:
                bp, bst = bnb_F.quantize_4bit(W, blocksize=64, quant_type="nf4")
                tb = timer(lambda: bnb_F.gemv_4bit(x, bp.t(), state=bst))
                extra += f"; bitsandbytes {1e3 * tb:.4f} ms ({tb / t:.2f}x ours)"
            except Exception as e:  # noqa: BLE001
                extra += f"; bitsandbytes failed: {type(e).__name__}"
        rows.append(
            Row(
                f"NF4 M=1 {N}x{K} (bf16)",
                1e3 * t,
                "bf16 F.linear",
                1e3 * base,
                gpu_bar(N, K, 1),
                extra,
                bw=_gemv_bytes(packed, st, x, N) / t,
                bw_bar=75,
            )
        )


def bench_cuda_gemm(rows, timer, shapes, ms, device):
    """M > 1: the tier the table picks, against bf16 F.linear; FP4 alongside."""
    for N, K in shapes:
        W = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        _, _, args = _q4(W)
        _, _, args_fp4 = _q4(W, "fp4")
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            base = timer(lambda: F.linear(x, W))
            t = timer(lambda: ops.gemv_4bit(x, *args))
            t_fp4 = timer(lambda: ops.gemv_4bit(x, *args_fp4))
            rows.append(
                Row(
                    f"NF4 M={M} {N}x{K} (bf16)",
                    1e3 * t,
                    "bf16 F.linear",
                    1e3 * base,
                    gpu_bar(N, K, M),
                    f"FP4 {t_fp4 / t:.3f}x time; {2 * M * N * K / t / 1e12:.0f} TFLOP/s",
                )
            )


def _affine_bytes(packed, scales, zeros, x, N) -> int:
    """Bytes one gemm_affine call must move at least: codes, fp32 scales and zeros, A and out."""
    return (
        packed.numel()
        + 4 * (scales.numel() + zeros.numel())
        + (x.numel() + x.shape[0] * N) * x.element_size()
    )


def bench_cuda_affine(rows, timer, shapes, ms, device):
    """Issue #13 on the GPU: the affine format of GPTQ / AWQ / HQQ / compressed-tensors weights
    (gemm_affine: int4, group size 128, asymmetric, as quantize_affine makes it and the checkpoint
    readers convert to) at M = 1 and every M in ms, against bf16 F.linear with NF4's bars (issue
    #10: the same tiers serve both), and NF4 (gemv_4bit, blocksize 64) on the same weight and input
    timed beside it: "affine t x NF4 time" in the notes (< 1: the affine product is faster)."""
    g = AFFINE_GROUP
    for N, K in shapes:
        W = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        packed, scales, zeros = ops.quantize_affine(W, 4, g, False)
        _, _, args_nf4 = _q4(W)
        for M in [1, *ms]:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            base = timer(lambda: F.linear(x, W))
            t = timer(lambda: ops.gemm_affine(x, packed, [N, K], scales, zeros, 4, g))
            t_nf4 = timer(lambda: ops.gemv_4bit(x, *args_nf4))
            extra = f"NF4 {_ms(1e3 * t_nf4)} ms, affine {t / t_nf4:.3f}x NF4 time"
            if M > 1:
                extra += f"; {2 * M * N * K / t / 1e12:.0f} TFLOP/s"
            rows.append(
                Row(
                    f"int4 g{g} asym M={M} {N}x{K} (bf16)",
                    1e3 * t,
                    "bf16 F.linear",
                    1e3 * base,
                    gpu_bar(N, K, M),
                    extra,
                    bw=_affine_bytes(packed, scales, zeros, x, N) / t if M == 1 else None,
                    bw_bar=75 if M == 1 else None,
                )
            )


def bench_cuda_affine8(rows, timer, shape, device):
    """The affine 8-bit codes (GPTQ / compressed-tensors int8 weights) at M = 1 and 8 (the affine
    GEMV's range) and 16 (dequantize + cuBLAS): information only (8-bit codes are half of bf16's
    bytes, so no 4-bit bar applies)."""
    g = AFFINE_GROUP
    N, K = shape
    W = torch.randn(N, K, device=device, dtype=torch.bfloat16)
    packed, scales, zeros = ops.quantize_affine(W, 8, g, False)
    for M in (1, 8, 16):
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        base = timer(lambda x=x: F.linear(x, W))
        t = timer(lambda x=x: ops.gemm_affine(x, packed, [N, K], scales, zeros, 8, g))
        rows.append(
            Row(
                f"int8 g{g} asym M={M} {N}x{K} (bf16)",
                1e3 * t,
                "bf16 F.linear",
                1e3 * base,
                None,
                "8-bit codes, information only",
                bw=_affine_bytes(packed, scales, zeros, x, N) / t if M == 1 else None,
            )
        )


def bench_cuda_tiers(lines, timer, shapes, ms, device, affine: bool = False):
    """Every tier (LOWBIT_GEMM4_FORCE) at every M: the data for the table in fourbit.cu. NF4
    (gemv_4bit), or with affine=True the affine int4 g128 product (gemm_affine), whose plan reuses
    the same table and the same LOWBIT_GEMM4_FORCE."""
    tiers = ["", "gemv:1:1", "gemv:2:1", "gemv:1:2", "gemv:2:2", "gemv:4:2", "gemv:8:2"]
    tiers += ["gemv:1:4", "gemv:2:4", "mma:0", "mma:1", "mma:2", "mma:0:1"]
    tiers += ["mma:1:1", "mma:2:1", "dequant", "generic"]
    what = f"affine int4 g{AFFINE_GROUP} asym" if affine else "4-bit"
    lines += [
        "",
        f"### {what} product tiers (ms; table = the table's choice; LOWBIT_GEMM4_FORCE: gemv:W:C ="
        " W warps per column group, C columns per group (M = 1); mma:C:S = tile config C, S splits)",
        "",
        "| shape | M | bf16 F.linear | " + " | ".join(t or "table" for t in tiers) + " |",
        "|---|---:|---:|" + "---:|" * len(tiers),
    ]
    old = os.environ.get("LOWBIT_GEMM4_FORCE")
    try:
        for N, K in shapes:
            W = torch.randn(N, K, device=device, dtype=torch.bfloat16)
            if affine:
                p, s, z = ops.quantize_affine(W, 4, AFFINE_GROUP, False)

                def product(x):
                    return ops.gemm_affine(x, p, [N, K], s, z, 4, AFFINE_GROUP)
            else:
                _, _, args = _q4(W)

                def product(x):
                    return ops.gemv_4bit(x, *args)

            for M in ms:
                x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
                cells = [f"{1e3 * timer(lambda: F.linear(x, W)):.4f}"]
                for tier in tiers:
                    if tier.startswith("gemv") and M > 8:
                        cells.append("")
                        continue
                    os.environ["LOWBIT_GEMM4_FORCE"] = tier
                    cells.append(f"{1e3 * timer(lambda: product(x)):.4f}")
                lines.append(f"| {N}x{K} | {M} | " + " | ".join(cells) + " |")
    finally:
        if old is None:
            os.environ.pop("LOWBIT_GEMM4_FORCE", None)
        else:
            os.environ["LOWBIT_GEMM4_FORCE"] = old


def bench_cuda_quant(rows, timer, n, device):
    """NF4 and blockwise 8-bit quantize / dequantize of n fp32 values against copy bandwidth."""
    A = torch.randn(n, device=device)
    p4, am4 = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    code8 = LF.create_dynamic_map().to(device)
    q8, am8 = ops.quantize_blockwise(A, code8, 4096)
    out = torch.empty_like(A)
    Ab = A.bfloat16()
    outb = torch.empty_like(Ab)
    cases = [
        ("NF4 quantize fp32", lambda: ops.quantize_4bit(A, 64, "nf4", torch.uint8), n * 4.5),
        (
            "NF4 dequantize fp32 (out=)",
            lambda: ops.dequantize_4bit.out(p4, am4, 64, "nf4", [n], torch.float32, out=out),
            n * 4.5,
        ),
        (
            "NF4 dequantize bf16 (out=)",
            lambda: ops.dequantize_4bit.out(p4, am4, 64, "nf4", [n], torch.bfloat16, out=outb),
            n * 2.5,
        ),
        ("NF4 quantize bf16", lambda: ops.quantize_4bit(Ab, 64, "nf4", torch.uint8), n * 2.5),
        ("8-bit quantize fp32", lambda: ops.quantize_blockwise(A, code8, 4096), n * 5),
        (
            "8-bit dequantize fp32 (out=)",
            lambda: ops.dequantize_blockwise.out(q8, am8, code8, 4096, torch.float32, out=out),
            n * 5,
        ),
    ]
    copy = timer(lambda: out.copy_(A))
    for name, fn, nbytes in cases:
        t = timer(fn)
        rows.append(
            Row(
                f"{name}, {n * 4 >> 20} MiB",
                1e3 * t,
                "copy fp32",
                1e3 * copy,
                None,
                bw=nbytes / t,
                bw_bar=80,
            )
        )


def run_cuda(
    plan: CudaPlan,
    timer,
    device,
    *,
    quick: bool,
    tiers: bool,
    description: str,
    bnb: bool = True,
    tiers_affine: bool = False,
) -> str:
    """Time everything in `plan` with `timer` (fn -> median seconds; .description) on `device` and
    return the table: what `python -m lowbit bench --device cuda` prints. bnb=False leaves
    bitsandbytes out (its import alone takes seconds)."""
    torch.manual_seed(0)
    t_start = time.perf_counter()
    bnb_F = _bnb_functional(device) if bnb else None
    copy_bws = [_cuda_copy_bandwidth(timer, device, plan.copy_bytes)]
    rows: list[Row] = []
    bench_cuda_gemv1(rows, timer, plan.gemv_shapes, bnb_F, device)
    bench_cuda_gemm(rows, timer, plan.gemm_shapes, plan.ms, device)
    bench_cuda_affine(rows, timer, plan.affine_shapes, plan.ms, device)
    bench_cuda_affine8(rows, timer, plan.affine8_shape, device)
    bench_cuda_quant(rows, timer, plan.quant_n, device)
    copy_bws.append(_cuda_copy_bandwidth(timer, device, plan.copy_bytes))
    copy_bw = max(copy_bws)
    cmd = "python -m lowbit bench --device cuda" + (" --quick" if quick else "")
    header = [
        "## lowbit CUDA benchmark",
        "",
        f"- command: `{cmd}{' --tiers' if tiers else ''}{' --tiers-affine' if tiers_affine else ''}`;"
        f" date {time.strftime('%Y-%m-%d')}",
        f"- {description}; bitsandbytes: {'yes' if bnb_F else 'not available'}",
        f"- copy bandwidth (read + write, {plan.copy_bytes >> 20} MiB), best of {len(copy_bws)}: "
        f"{copy_bw / 1e9:.0f} GB/s; {timer.description}; speed-up = baseline ms / lowbit ms",
    ]
    extra: list[str] = []
    if tiers:
        bench_cuda_tiers(extra, timer, plan.gemm_shapes, plan.tier_ms, device)
    if tiers_affine:
        bench_cuda_tiers(extra, timer, plan.gemm_shapes, plan.tier_ms, device, affine=True)
    header.append(f"- total bench time {time.perf_counter() - t_start:.0f} s")
    return render(rows, header, copy_bw) + "\n".join(extra) + ("\n" if extra else "")


def main_cuda(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("lowbit bench: --device cuda needs a CUDA device")
    timer = CudaTimer(args.repeats or (10 if args.quick else 25))
    text = run_cuda(
        cuda_plan(args.quick),
        timer,
        "cuda",
        quick=args.quick,
        tiers=args.tiers,
        tiers_affine=args.tiers_affine,
        description=_cuda_description(),
    )
    return _emit(text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
