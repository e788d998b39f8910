"""benchmarks/bench_gpu_formats.py runs its whole code path on the CPU (tiny shapes), so that an
error in it cannot waste a GPU run; its timings mean nothing here."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("hqq", reason="hqq is the baseline of this benchmark (tools/install.sh)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_gpu_formats_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_gpu_formats", ROOT / "benchmarks" / "bench_gpu_formats.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "formats.md"
    assert bench.main(["--device", "cpu", "--out", str(out)]) == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("| 256x128 |")]
    assert len(rows) == 2, rows  # M = 1 and 3 against hqq's eager forward
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[2] == "hqq eager (dequantize + matmul)"
        assert cells[-1] == "0", r  # lowbit decodes exactly hqq's weight
        assert float(cells[-3]) < 0.02, r  # lowbit's output vs the dequantized weight's product
