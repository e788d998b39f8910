"""GPU ratio benchmark of LLM.int8() (issue 11): the int8 GEMM and the int8 linear layer.

    python benchmarks/bench_gpu_int8.py [--quick] [--repeats 30] [--out benchmarks/results/gpu_int8.md]

Every figure is a ratio against a baseline timed in the same process, on the same GPU and shapes:
torch._int_mm (cuBLASLt) for the int8 GEMM, F.linear with bf16 weights for the layer, and
bitsandbytes' Linear8bitLt beside them when it imports. Each time is the median of CUDA-event
timings with L2 flushed (a 256 MB write) before every call, so weights come from HBM as in a real
model. Launch counts come from torch.profiler (device events: kernels, memsets and copies).
Bars are those of issue 11; "graph" rows time the replay of a captured CUDA graph (no launch
overhead), as torch.compile(mode="reduce-overhead") would run the layer.
`--device cpu` runs the script's code paths on the CPU (no ratios that mean anything) as a smoke test.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import lowbit  # noqa: F401  (registers the ops)
from lowbit.bench import MsTimer as Timer

ops = torch.ops.lowbit
# (N, K): Llama-2-7B / Llama-3-8B projections
SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (4096, 4096)]
QUICK_SHAPES = [(11008, 4096), (4096, 4096)]
THRESHOLD = 6.0
OUTLIER_FRACTION = 0.005  # < 1% outlier columns, as the bar asks


def launches(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    from torch.profiler import DeviceType, ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def kernel_breakdown(fn, device: str) -> str:
    """The device time of each kernel of one fn() call (torch.profiler), as 'name: us; ...'."""
    if device != "cuda":
        return ""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return "; ".join(f"{e.name[:48]}: {e.time_range.elapsed_us():.1f} us" for e in ev)


def graphed(fn, device: str):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns the replay."""
    if device != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def activations(M: int, K: int, device: str, outliers: bool) -> torch.Tensor:
    """bf16 activations, |a| <= 5, with OUTLIER_FRACTION of the columns holding one |a| >= 6."""
    x = torch.randn(M, K, device=device).clamp_(-5.0, 5.0)
    if outliers:
        n = max(1, int(K * OUTLIER_FRACTION))
        cols = torch.randperm(K, device=device)[:n]
        rows = torch.randint(0, M, (n,), device=device)
        x[rows, cols] = 8.0
    return x.to(torch.bfloat16)


def int8_weight(N: int, K: int, device: str):
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
    codes, scb, _ = ops.int8_vectorwise_quant(w, 0.0)
    return w, codes, scb


def bnb_layer(w: torch.Tensor, bias: torch.Tensor, threshold: float):
    """bitsandbytes' Linear8bitLt on the same weight, or None."""
    if w.device.type != "cuda":
        return None
    try:
        import bitsandbytes as bnb

        N, K = w.shape
        layer = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(
            w.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False
        )
        layer.bias = torch.nn.Parameter(bias.clone().cpu(), requires_grad=False)
        return layer.cuda()
    except Exception:  # noqa: BLE001  (no bitsandbytes, or no CUDA build of it: no column)
        return None


def rows_for(args, timer=None) -> list[dict]:
    """The table's rows on args.device; timer(fn) -> median ms (default: Timer, CUDA events and an
    L2 flush on the GPU). tests/test_bench_smoke.py passes a trivial one on the CPU."""
    dev = args.device
    timer = timer or Timer(dev, args.repeats)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    out = []

    def row(case, shape, ms, base_name, base_ms, bar, n_launch=None, bnb_ms=None):
        ratio = base_ms / ms if ms > 0 else float("nan")
        out.append(
            dict(
                case=case,
                shape=shape,
                ms=ms,
                base=base_name,
                base_ms=base_ms,
                ratio=ratio,
                bar=bar,
                ok=(ratio >= bar) if bar else None,
                launches=n_launch,
                bnb_ms=bnb_ms,
            )
        )
        print(
            f"{case:34s} {shape:12s} {ms:8.4f} ms  {base_name} {base_ms:8.4f} ms  {ratio:5.2f}x"
            f"  bar {bar or '-'}  launches {n_launch}",
            flush=True,
        )

    # ---- int8 GEMM, M = 2048: lowbit (cuBLASLt) against torch._int_mm (cuBLASLt via ATen) ----
    for N, K in shapes:
        M = 2048
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
        c = torch.empty(M, N, dtype=torch.int32, device=dev)
        ms = timer(lambda: ops.int8_linear_matmul.out(a, b, out=c))
        if dev == "cuda":
            base = timer(lambda: torch._int_mm(a, b.t()))
            name = "torch._int_mm"
        else:
            base = timer(lambda: a.float() @ b.float().t())
            name = "fp32 matmul"
        for i in range(1, args.lt_algos):  # cuBLASLt's other heuristic candidates
            os.environ["LOWBIT_INT8_LT_ALGO"] = str(i)
            t = timer(lambda: ops.int8_linear_matmul.out(a, b, out=c))
            row(f"int8 GEMM M=2048 cuBLASLt cand. {i}", f"{N}x{K}", t, name, base, None)
        os.environ.pop("LOWBIT_INT8_LT_ALGO", None)
        row(
            "int8 GEMM M=2048",
            f"{N}x{K}",
            ms,
            name,
            base,
            1.0,
            launches(lambda: ops.int8_linear_matmul.out(a, b, out=c), dev),
        )

    # ---- the LLM.int8() layer against bf16 F.linear ----
    for N, K in shapes:
        w, codes, scb = int8_weight(N, K, dev)
        bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
        bnb = bnb_layer(w, bias, THRESHOLD)
        cases = [
            (2048, THRESHOLD, 1.3),
            (16, THRESHOLD, 1.2),
            (1, THRESHOLD, 1.3),
            (2048, 0.0, 1.5),
        ]
        if not args.quick:
            cases.append((128, THRESHOLD, None))
        for M, thr, bar in cases:
            x = activations(M, K, dev, outliers=thr > 0)

            def int8_fn(x=x, thr=thr):
                return ops.int8_linear(x, codes, scb, bias, thr)

            def bf16_fn(x=x):
                return F.linear(x, w, bias)

            ms, base = timer(int8_fn), timer(bf16_fn)
            bnb_ms = None
            if bnb is not None and thr > 0:
                xh = x.to(torch.float16)
                try:
                    with torch.no_grad():
                        bnb_ms = timer(lambda xh=xh: bnb(xh))
                except Exception as e:  # noqa: BLE001  (bitsandbytes' failure is not ours)
                    print(f"   bitsandbytes failed: {type(e).__name__}: {e}", flush=True)
            row(
                f"LLM.int8() t={thr:g} M={M}",
                f"{N}x{K}",
                ms,
                "bf16 F.linear",
                base,
                bar,
                launches(int8_fn, dev),
                bnb_ms,
            )
            if N == shapes[0][0] and K == shapes[0][1]:
                print("   kernels:", kernel_breakdown(int8_fn, dev), flush=True)
            if M <= 16:  # off CUDA graphed() returns fn itself: the smoke run covers this code
                gi, gb = graphed(int8_fn, dev), graphed(bf16_fn, dev)
                row(
                    f"LLM.int8() t={thr:g} M={M} graph",
                    f"{N}x{K}",
                    timer(gi),
                    "bf16 graph",
                    timer(gb),
                    None,
                )
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def write_table(rows: list[dict], path: str, device_name: str) -> None:
    lines = [
        f"# LLM.int8() GPU benchmark ({device_name}, torch {torch.__version__})",
        "",
        "Ratios are baseline time / lowbit time in one process (> 1: lowbit faster); medians of CUDA"
        " events, L2 flushed before every call. bnb: bitsandbytes Linear8bitLt (fp16 activations).",
        "",
        "| case | N x K | lowbit ms | baseline | baseline ms | ratio | bar | launches | bnb ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bar = "-" if r["bar"] is None else f"{r['bar']}x {'ok' if r['ok'] else 'MISSED'}"
        bnb = "-" if r["bnb_ms"] is None else f"{r['bnb_ms']:.4f}"
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['ms']:.4f} | {r['base']} | {r['base_ms']:.4f} | "
            f"{r['ratio']:.2f}x | {bar} | {r['launches'] if r['launches'] is not None else '-'} | {bnb} |"
        )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _shapes(text: str) -> list[tuple[int, int]]:
    """'11008x4096,4096x4096' -> [(11008, 4096), (4096, 4096)] (N x K)."""
    try:
        return [(int(n), int(k)) for n, _, k in (s.partition("x") for s in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must be NxK[,NxK...], got {text!r}") from None


def main(argv=None, timer=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="two shapes instead of five")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shapes", type=_shapes, default=None, help="N x K list (default: by --quick)")
    p.add_argument("--out", default="benchmarks/results/gpu_int8.md")
    p.add_argument(
        "--lt-algos",
        type=int,
        default=1,
        help="also time cuBLASLt's heuristic candidates 1..N-1 for the int8 GEMM "
        "(LOWBIT_INT8_LT_ALGO; the candidate index is clamped to those returned)",
    )
    args = p.parse_args(argv)
    if args.device == "cpu" and args.repeats > 3:
        args.repeats = 3
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU smoke run"
    rows = rows_for(args, timer)
    write_table(rows, args.out, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
