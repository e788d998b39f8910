"""The GPU benchmarks' Python on the CPU: tiny shapes and a trivial timer.

`python -m lowbit bench --device cuda`, benchmarks/bench_model_gpu.py and
benchmarks/bench_gpu_int8.py run for real only on a lent GPU machine, whose minutes are few: a
Python error there wastes them. Each takes its device and its timer as arguments, and only the
timer (CUDA events, L2 flush), CUDA-graph capture and torch.compile(mode="reduce-overhead") are
CUDA-only; everything else runs here, and the tables must come out with every row they promise.
The times are a constant: no ratio in these tables means anything.
"""

import importlib.util
import os
import pathlib
import re

import pytest
import torch

from lowbit import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class CallOnce:
    """A trivial timer: calls fn once (so every timed callable runs) and returns a fixed time. Its
    signature fits all three benchmarks: timer(fn) (lowbit.bench: seconds; bench_gpu_int8: ms)
    and timer(fn, n) (bench_model_gpu: ms)."""

    repeats = 1
    description = "smoke timer (one call, a fixed time)"

    def __init__(self, value: float):
        self.value = value
        self.calls = 0

    def __call__(self, fn, n=None):
        fn()
        self.calls += 1
        return self.value


def _cases(table: str) -> list[str]:
    """The first cell of every data row of the markdown tables in `table`."""
    return [
        line.split("|")[1].strip()
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| case") and "---" not in line
    ]


# ---- python -m lowbit bench --device cuda ------------------------------------------------------


def test_cuda_bench_renders_every_row_on_cpu():
    plan = bench.CudaPlan(
        gemv_shapes=[(256, 256), (128, 384)],
        gemm_shapes=[(128, 256)],
        ms=[2, 16],
        affine_shapes=[(256, 256), (128, 384)],
        affine8_shape=(128, 256),
        quant_n=3 * 4096 + 100,  # a partial 8-bit block
        copy_bytes=1 << 16,
        tier_ms=[1, 16],
    )
    timer = CallOnce(1e-4)
    before = os.environ.get("LOWBIT_GEMM4_FORCE")
    # bitsandbytes left out: its import takes seconds, and its call sits in a try (a failure there
    # is a note in the table, never a lost run)
    text = bench.run_cuda(
        plan,
        timer,
        "cpu",
        quick=True,
        tiers=True,
        tiers_affine=True,
        description="CPU smoke",
        bnb=False,
    )
    assert os.environ.get("LOWBIT_GEMM4_FORCE") == before  # the tiers table restores it
    assert "--device cuda --quick --tiers --tiers-affine" in text and "CPU smoke" in text
    assert timer.description in text
    rows = _cases(text.split("### 4-bit product tiers")[0])
    want = [f"NF4 M=1 {n}x{k} (bf16)" for n, k in plan.gemv_shapes]
    want += [f"NF4 M={m} {n}x{k} (bf16)" for n, k in plan.gemm_shapes for m in plan.ms]
    want += [
        f"int4 g128 asym M={m} {n}x{k} (bf16)" for n, k in plan.affine_shapes for m in [1, *plan.ms]
    ]
    want += [f"int8 g128 asym M={m} 128x256 (bf16)" for m in (1, 8, 16)]
    quant = ["NF4 quantize fp32", "NF4 dequantize fp32 (out=)", "NF4 dequantize bf16 (out=)"]
    quant += ["NF4 quantize bf16", "8-bit quantize fp32", "8-bit dequantize fp32 (out=)"]
    want += [f"{q}, 0 MiB" for q in quant]
    assert rows == want
    # every row has its ratio, the bars where the issues set one, bandwidth where promised
    for line in text.splitlines():
        if line.startswith("| NF4 M=1 ") or line.startswith("| int4 g128 asym M=1 "):
            assert "GB/s" in line and "(bar 75%)" in line and ">= 3x" in line, line
        if line.startswith("| int4 g128 asym M=16 "):
            assert ">= 2.5x" in line and "x NF4 time" in line, line
    assert not re.search(r"\b(nan|inf)\b", text)
    nf4_tiers, affine_tiers = text.split("### 4-bit product tiers")[1].split("### affine int4 g128")
    for tiers in (nf4_tiers, affine_tiers):
        assert [r for r in _cases(tiers) if r != "shape"] == ["128x256", "128x256"]
        assert "| 128x256 | 16 |" in tiers


def test_cuda_bench_plan_keeps_the_issue_shapes():
    """The real run's plan: every issue-10 shape at M = 1 for NF4 and the affine format, and every
    M the bars name; --quick keeps three shapes."""
    for quick in (False, True):
        plan = bench.cuda_plan(quick)
        shapes = bench.GPU_QUICK_SHAPES if quick else bench.GPU_SHAPES
        assert plan.gemv_shapes == shapes and plan.affine_shapes == shapes
        assert plan.ms == [16, 32, 64, 128, 512, 2048]
        assert set(bench.GPU_BARS) <= set(plan.ms)
    assert set(bench.GPU_SHAPES) >= {(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)}
    assert bench.gpu_bar(4096, 4096, 1) == 2.5 and bench.gpu_bar(11008, 4096, 1) == 3.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_bench_without_cuda_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--device", "cuda", "--quick"])


# ---- benchmarks/bench_model_gpu.py --------------------------------------------------------------


def test_model_bench_renders_every_lowbit_variant_on_cpu(tmp_path):
    """Through main(), as tools/gpu_run.sh runs it (--decode graph falls back to eager off CUDA).
    bitsandbytes' variants are left out: its import alone takes seconds here, and a failing
    variant is a note in the table, never a lost run."""
    mod = _load("bench_model_gpu")
    out = tmp_path / "model.md"
    assert "lowbit-int4" in mod.VARIANTS
    variants = [v for v in mod.VARIANTS if not v.startswith("bnb-")]
    argv = ["--device", "cpu", "--models", "toy", "--variants", ",".join(variants)]
    argv += ["--decode", "graph", "--prefill", "16"]
    assert mod.main([*argv, "--out", str(out)], timer=CallOnce(2.0)) == 0
    text = out.read_text()
    assert f"`python benchmarks/bench_model_gpu.py {' '.join(argv)} --out" in text  # the real argv
    assert "decode: eager" in text and "prefill 1x16" in text
    rows = {
        line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| toy |")
    }
    assert list(rows) == variants
    for row in rows.values():
        # weights counted, decode and prefill timed, ratios against bf16 (a constant timer: 1.00x)
        assert "failed" not in row, row
        assert re.search(
            r"\| 0\.\d\d \| [01]\.\d+x \| 2\.000 \| 1\.00x \| 2\.00 \| 1\.00x \|", row
        ), row
    # the linears' bytes against bf16: int4 codes + fp32 scale and zero per 128 = 0.28x
    assert "| 1.000x |" in rows["bf16"] and "| 0.281x |" in rows["lowbit-int4"]


def test_model_bench_affine_variant_is_a_loaded_affine_model():
    """lowbit-int4 holds LinearAffine int4 g128 layers whose output is that of the dense weight
    they decode to (the layer from_pretrained builds for GPTQ / AWQ / HQQ / compressed-tensors)."""
    from lowbit.nn import LinearAffine

    mod = _load("bench_model_gpu")
    model, cfg = mod.build("toy", "cpu")
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    mod.quantize(model, "lowbit-int4")
    layers = [m for m in model.modules() if isinstance(m, LinearAffine)]
    assert len(layers) == 7 * cfg.num_hidden_layers
    assert {(m.bits, m.group_size, m.perm is None) for m in layers} == {(4, 128, True)}
    lin = layers[0]
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), lin.dequantize(torch.float32))
    torch.testing.assert_close(lin(x).float(), ref, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    # a linear with a bias: the codes are within half a step of the weight, the bias carried over
    dense = torch.nn.Linear(256, 48, dtype=torch.bfloat16)
    q = mod.affine_from_linear(dense, 4, 128)
    half_step = q.scales.max().item() / 2 * (1 + 1e-5)
    torch.testing.assert_close(q.dequantize(), dense.weight.float(), rtol=0, atol=half_step)
    assert torch.equal(q.bias, dense.bias) and not q.bias.requires_grad
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), q.dequantize(), dense.bias.float())
    torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)


# ---- benchmarks/bench_gpu_int8.py ---------------------------------------------------------------


def test_int8_bench_renders_every_row_on_cpu(tmp_path):
    mod = _load("bench_gpu_int8")
    out = tmp_path / "int8.md"
    argv = ["--device", "cpu", "--shapes", "64x128,48x64", "--lt-algos", "2", "--out", str(out)]
    assert mod.main(argv, timer=CallOnce(0.5)) == 0
    assert "LOWBIT_INT8_LT_ALGO" not in os.environ
    text = out.read_text()
    want = []
    for shape in ("64x128", "48x64"):
        want += [f"int8 GEMM M=2048 cuBLASLt cand. 1|{shape}", f"int8 GEMM M=2048|{shape}"]
    for shape in ("64x128", "48x64"):
        for case in ("t=6 M=2048", "t=6 M=16", "t=6 M=16 graph", "t=6 M=1", "t=6 M=1 graph"):
            want.append(f"LLM.int8() {case}|{shape}")
        want += [f"LLM.int8() t=0 M=2048|{shape}", f"LLM.int8() t=6 M=128|{shape}"]
    rows = [
        "|".join(c.strip() for c in line.split("|")[1:3])
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| case") and "---" not in line
    ]
    assert rows == want
    assert "1.00x" in text and "nan" not in text


def test_int8_bench_rejects_bad_shapes(capsys):
    mod = _load("bench_gpu_int8")
    with pytest.raises(SystemExit):
        mod.main(["--device", "cpu", "--shapes", "64by128"])
    assert "NxK" in capsys.readouterr().err
