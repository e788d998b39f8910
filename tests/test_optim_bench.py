"""Smoke test of benchmarks/bench_gpu_optim.py on CPU, so that a Python error in the benchmark
cannot waste a run on the lent GPU machine: the tiny parameter set through every row, the table,
and the refusal without a CUDA device."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu_optim.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_optim", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_optim_cpu_smoke(tmp_path):
    bench = _bench()
    out = tmp_path / "gpu_optim.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate a busy machine
    try:
        rc = bench.main(
            ["--device", "cpu", "--tiny", "--no-bnb", "--repeats", "1", "--group", "1",
             "--out", str(out)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = out.read_text()
    for name in (
        "torch AdamW fused=True",
        "torch AdamW foreach=True",
        "lowbit AdamW8bit",
        "lowbit 8-bit op only (one call)",
        "lowbit 8-bit op only, block kernel",
    ):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
        assert "Error" not in row and "FAILED" not in row, row
    assert "state memory bar" in text and "speed bar" in text
    # the 8-bit op keeps 2 bytes + 2 absmax floats per 256 values for every tensor: 0.254x of
    # AdamW's 8 bytes, whatever the sizes
    op_row = next(line for line in text.splitlines() if line.startswith("| lowbit 8-bit op"))
    assert "| 0.25" in op_row


def test_bench_gpu_optim_rows_and_bars():
    bench = _bench()
    rows = [
        dict(name="torch AdamW fused=True", error=None, step_ms=8.0, state_bytes=800,
             counted_bytes=800),
        dict(name="lowbit AdamW8bit", error=None, step_ms=4.0, state_bytes=203, counted_bytes=203),
        dict(name="bitsandbytes AdamW8bit", error="ImportError: x"),
    ]  # fmt: skip
    bench.add_ratios(rows)
    assert rows[1]["speed"] == pytest.approx(2.0) and rows[1]["state_ratio"] == pytest.approx(
        0.25375
    )
    assert rows[2]["speed"] is None
    lines = bench.bar_lines(rows)
    assert "2.00x, met" in lines[0] and "0.254x, met" in lines[1]
    shapes = bench.llama_shapes(**bench.MODELS["tinyllama"])
    assert len(shapes) == 201 and sum(torch.Size(s).numel() for s in shapes) == 1_100_048_384


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_bench_gpu_optim_refuses_without_cuda(tmp_path, capsys):
    out = tmp_path / "x.md"
    assert _bench().main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()
