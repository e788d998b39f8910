"""lowbit's affine kernels against a format's own GPU kernels (issue 13): HQQ int4, group size 128.

    python benchmarks/bench_gpu_formats.py [--quick] [--repeats 30] [--out benchmarks/results/gpu_formats.md]

HQQ is the one of the four formats whose own GPU paths install without network or a CUDA build:
hqq itself (pure Python; its forward dequantizes then multiplies, eager or torch.compile) and
gemlite (Triton kernels, the backend hqq's `prepare_for_inference(backend="gemlite")` uses).
GPTQ's and AWQ's kernels (gptqmodel, autoawq) are CUDA extensions built for one torch, and
compressed-tensors has no kernel (it decompresses to dense weights, so its speed is bf16
F.linear's). On the GPU machine, which has no network, tools/gpu_prepare.sh puts hqq, gemlite and
their small pure-Python dependencies in .gpu-extras (carried there; tools/gpu_run.sh puts it on
PYTHONPATH).

Each layer is quantized once by hqq (round to nearest, axis 1), then converted into lowbit's affine
format through lowbit's HQQ checkpoint reader from HQQLinear.state_dict() (what a saved HQQ model
holds), so every side computes with the same codes, scales and zeros; the table shows how far
each output is from the dequantized weight's bf16 product. Times: medians of CUDA events with L2
flushed before every call; ratios are baseline time / lowbit time (> 1: lowbit faster). The
issue's bar: lowbit within 10% of the format's own kernels or faster (ratio >= 0.9).
`--device cpu` runs the same code paths on the CPU with tiny shapes (a smoke test, no meaning).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

import lowbit  # noqa: F401  (registers the ops)
from lowbit.bench import MsTimer as Timer
from lowbit.formats.hqq import HQQReader
from lowbit.nn import LinearAffine

SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (4096, 4096)]
QUICK_SHAPES = [(11008, 4096), (4096, 4096)]
MS = [1, 16, 128, 2048]
QUICK_MS = [1, 16, 2048]
GROUP = 128
BAR = 0.9  # within 10% of the format's own kernels, or faster


def hqq_layer(w: torch.Tensor, device: str):
    """hqq's HQQLinear of a bf16 weight (4-bit, group size 128, axis 1, round to nearest)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=4, group_size=GROUP, axis=1)
    cfg["weight_quant_params"]["optimize"] = False  # RTN: seconds to build; same forward
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16, device=device)
    lin.weight.data.copy_(w)
    return HQQLinear(lin, cfg, compute_dtype=torch.bfloat16, device=device, del_orig=True)


def lowbit_from_hqq(hq, N: int, K: int, device: str) -> LinearAffine:
    """The layer lowbit.from_pretrained builds from a saved HQQ checkpoint of `hq`."""
    reader = HQQReader({"quant_method": "hqq", "quant_config": {}})
    stash = {k: v for k, v in hq.state_dict().items() if isinstance(v, torch.Tensor)}
    aw = reader.convert("layer", stash, K, N)
    layer = LinearAffine(K, N, bias=False, bits=aw.bits, group_size=aw.group_size, device=device)
    layer.set_weight(
        aw.packed.to(device), aw.scales.to(device), aw.zeros.to(device), aw.bits, aw.group_size
    )
    return layer


def hqq_backends(hq, device: str) -> dict:
    """name -> forward of each of hqq's own paths that runs here; a failure is kept as a string."""
    from hqq.core.quantize import HQQBackend, HQQLinear

    out = {}

    def eager(x, hq=hq):
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        return hq(x)

    out["hqq eager (dequantize + matmul)"] = eager
    if device == "cuda":  # on a CPU smoke run neither has anything to measure
        try:
            from gemlite.helper import A16Wn

            gl = A16Wn(device=device, dtype=torch.bfloat16).from_hqqlinear(hq, del_orig=False)
            out["gemlite (Triton)"] = lambda x, gl=gl: gl(x)
        except Exception as e:  # noqa: BLE001  (not installed, or no kernel for this GPU)
            out["gemlite (Triton)"] = f"unavailable: {type(e).__name__}: {e}"[:160]

        def compiled(x, hq=hq):  # last: compiling for each M takes the longest
            HQQLinear.set_backend(HQQBackend.PYTORCH_COMPILE)
            return hq(x)

        out["hqq torch.compile"] = compiled
    return out


def rows_for(args, emit) -> list[dict]:
    """Every row; emit(rows) after each, so a run cut short keeps its table."""
    dev = args.device
    timer = Timer(dev, args.repeats)
    if dev == "cuda":
        shapes, ms = (QUICK_SHAPES, QUICK_MS) if args.quick else (SHAPES, MS)
    else:
        shapes, ms = [(256, 128)], [1, 3]
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        hq = hqq_layer(w, dev)
        ours = lowbit_from_hqq(hq, N, K, dev)
        dense = ours.dequantize(torch.bfloat16)
        # Same weights on every side: lowbit's decode equals hqq's own.
        w_err = (dense.float() - hq.dequantize().float()).abs().max().item()
        for name, fn in hqq_backends(hq, dev).items():
            for M in ms:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                row = {"shape": f"{N}x{K}", "M": M, "base": name, "w_err": w_err}
                if isinstance(fn, str):
                    rows.append({**row, "skip": fn})
                    emit(rows)
                    continue
                ref = F.linear(x.float(), dense.float())
                scale = ref.abs().max().item() or 1.0
                try:
                    err_base = (fn(x).float() - ref).abs().max().item() / scale
                    t_base = timer(lambda x=x, fn=fn: fn(x))
                except Exception as e:  # noqa: BLE001  (a baseline that fails is reported)
                    rows.append({**row, "skip": f"failed: {type(e).__name__}: {e}"[:160]})
                    emit(rows)
                    continue
                err = (ours(x).float() - ref).abs().max().item() / scale
                t = timer(lambda x=x, layer=ours: layer(x))
                rows.append({**row, "ms": t, "base_ms": t_base, "err": err, "err_base": err_base})
                emit(rows)
        del hq, ours, dense
    return rows


def write_table(rows: list[dict], path: str, device_name: str, argv: list[str]) -> str:
    lines = [
        f"# lowbit affine int4 vs HQQ's own GPU paths ({device_name}, torch {torch.__version__})",
        "",
        f"{datetime.date.today()}, `python benchmarks/bench_gpu_formats.py {' '.join(argv)}`.",
        "int4, group size 128, asymmetric, bf16 activations, no bias. Ratio: baseline ms / lowbit ms"
        f" (> 1: lowbit faster); bar {BAR}x (within 10% or faster). err: max |out - x @ W_deq^T| /"
        " max |x @ W_deq^T| with W_deq the dequantized weight; max |W_lowbit - W_hqq| = 0 means"
        " both decode the same weight.",
        "",
        "| N x K | M | baseline | baseline ms | lowbit ms | ratio | bar | err lowbit | err base |"
        " max abs W_lowbit - W_hqq |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['shape']} | {r['M']} | {r['base']} |"
        if "skip" in r:
            lines.append(f"{head} {r['skip']} | - | - | - | - | - | {r['w_err']:.3g} |")
            continue
        ratio = r["base_ms"] / r["ms"]
        lines.append(
            f"{head} {r['base_ms']:.4f} | {r['ms']:.4f} | {ratio:.2f}x | "
            f"{'ok' if ratio >= BAR else 'MISSED'} | {r['err']:.2e} | {r['err_base']:.2e} | "
            f"{r['w_err']:.3g} |"
        )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines[-1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="two shapes and three M instead of 5 x 4")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/gpu_formats.md")
    args = p.parse_args(argv)
    try:
        import hqq  # noqa: F401
    except ImportError:
        print("bench_gpu_formats: hqq does not import (tools/gpu_prepare.sh): nothing to compare")
        return 2
    if args.device == "cpu":
        args.repeats = min(args.repeats, 2)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU smoke run"
    rows_for(args, lambda rows: print(write_table(rows, args.out, name, argv), flush=True))
    print(open(args.out).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
