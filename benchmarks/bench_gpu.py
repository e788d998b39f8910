"""GPU ratio benchmarks for the CUDA kernels.

    python benchmarks/bench_gpu.py [--quick] [--tiers] [--out benchmarks/results/gpu_int8.md]

The 4-bit products, quantize and dequantize are benchmarked by the package's one bench module,
`python -m lowbit bench --device cuda` (python/lowbit/bench.py; table in
benchmarks/results/gpu.md), which this script runs first with the same --quick / --tiers /
--repeats. What follows here is the LLM.int8() and 8-bit blockwise part (table in --out).

Every figure is a ratio against a baseline timed in the same process on the same GPU and shapes:
torch F.linear with bf16 weights, torch._int_mm, a device-to-device copy (bandwidth) and, when it
imports, bitsandbytes. Each time is the median over repeats of CUDA-event timings with L2 flushed
before every call (a 256 MB write), so weights come from HBM as they would in a real model.
`--device cpu` runs the same code on the CPU (wall clock, no flush) as a smoke test of the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import lowbit.functional as LF

ops = torch.ops.lowbit
SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (4096, 4096)]
QUICK_SHAPES = [(4096, 4096), (11008, 4096)]


class Timer:
    """Median milliseconds of fn() with CUDA events and an L2 flush before each call."""

    def __init__(self, device: str, repeats: int):
        self.device = device
        self.repeats = repeats
        self.flush_buf = (
            torch.empty(256 << 20, dtype=torch.uint8, device=device) if device == "cuda" else None
        )

    def __call__(self, fn) -> float:
        fn()  # warm-up: lazy init, autotuning, allocator
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                self.flush_buf.zero_()
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def kernel_launches(fn, device: str) -> int | None:
    """Number of GPU kernels one call of fn launches (torch.profiler)."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def row(table, name, shape, ours_ms, base_ms, base_name, bar=None, extra=""):
    ratio = base_ms / ours_ms
    verdict = "" if bar is None else ("met" if ratio >= bar else f"MISSED by {bar / ratio:.2f}x")
    table.append(
        f"| {name} | {shape} | {ours_ms:.4f} | {base_name} {base_ms:.4f} | {ratio:.2f}x | "
        f"{'' if bar is None else f'>= {bar:.2f}x'} {verdict} | {extra} |"
    )


def bench_int8(table, timer, device, shapes):
    for N, K in shapes:
        Wf = torch.randn(N, K, device=device)
        W, SCB, _ = ops.int8_vectorwise_quant(Wf)
        Wb = Wf.bfloat16()
        for M in (1, 2048):
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            x[:, torch.randperm(K, device=device)[: max(1, K // 200)]] *= 20  # < 1% outlier columns
            base = timer(lambda x=x: F.linear(x, Wb))
            ours = timer(lambda x=x: ops.int8_linear(x, W, SCB, None, 6.0))
            launches = kernel_launches(lambda x=x: ops.int8_linear(x, W, SCB, None, 6.0), device)
            extra = "" if launches is None else f"{launches} launch(es)"
            row(
                table,
                f"LLM.int8() M={M}",
                f"{N}x{K}",
                ours,
                base,
                "bf16 F.linear",
                1.5 if M == 1 else 1.3,
                extra,
            )
        if device == "cuda":
            A = torch.randint(-127, 128, (2048, K), dtype=torch.int8, device=device)
            ours = timer(lambda A=A: ops.int8_linear_matmul(A, W))
            base = timer(lambda A=A: torch._int_mm(A, W.t()))
            row(table, "int8 GEMM M=2048", f"{N}x{K}", ours, base, "torch._int_mm", 1.0)


def bench_quant(table, timer, device, quick):
    n = (4096 * 4096) if quick else (8192 * 8192)  # 64 MB / 256 MB of fp32
    A = torch.randn(n, device=device)
    copy_ms = timer(lambda: A.clone())
    copy_bytes = 2 * A.numel() * 4
    code = LF.create_dynamic_map().to(device)
    q8, am8 = ops.quantize_blockwise(A, code, 4096)
    p4, am4 = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    cases = [
        ("8-bit quantize", lambda: ops.quantize_blockwise(A, code, 4096), A.numel() * 5),
        (
            "8-bit dequantize",
            lambda: ops.dequantize_blockwise(q8, am8, code, 4096, torch.float32),
            A.numel() * 5,
        ),
        ("NF4 quantize", lambda: ops.quantize_4bit(A, 64, "nf4", torch.uint8), A.numel() * 4.5),
        (
            "NF4 dequantize",
            lambda: ops.dequantize_4bit(p4, am4, 64, "nf4", [n], torch.float32),
            A.numel() * 4.5,
        ),
    ]
    for name, fn, nbytes in cases:
        ms = timer(fn)
        frac = (nbytes / ms) / (copy_bytes / copy_ms)
        table.append(
            f"| {name} | {n * 4 >> 20} MB fp32 | {ms:.4f} | copy {copy_ms:.4f} | {frac:.0%} of copy bandwidth | >= 80% "
            f"{'met' if frac >= 0.8 else 'MISSED'} | |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--tiers", action="store_true", help="also time every 4-bit product tier")
    p.add_argument(
        "--skip-4bit", action="store_true", help="only the int8 part (the 4-bit one ran apart)"
    )
    p.add_argument("--out", default="benchmarks/results/gpu_int8.md")
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not args.skip_4bit:
        from lowbit.bench import main as bench_main

        bench_main(
            ["--device", "cuda"]
            + (["--quick"] if args.quick else [])
            + (["--tiers"] if args.tiers else [])
            + (["--repeats", str(args.repeats)] if args.repeats else [])
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    timer = Timer(device, args.repeats or (5 if args.quick else 25))
    shapes = QUICK_SHAPES if args.quick or device == "cpu" else SHAPES
    if device == "cpu":
        shapes = [(512, 512)]
    table = [
        "| case | shape (N x K) | lowbit ms | baseline ms | ratio | bar | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    bench_int8(table, timer, device, shapes)
    bench_quant(table, timer, device, args.quick or device == "cpu")
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    header = (
        f"lowbit GPU benchmarks on {machine}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; command: python benchmarks/bench_gpu.py {' '.join(argv or [])}"
    )
    text = header + "\n\n" + "\n".join(table) + "\n"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
