"""The command line: demo, quantize, inspect, env, bench, and its error contract.

Most commands run in-process through lowbit.cli.main.main (fast: Transformers is imported once);
a few go through `python -m lowbit` to check the real entry point, exit codes and stderr.
"""

import json
import subprocess
import sys
import types

import pytest
import torch

import _helpers_nn

pytest.importorskip("transformers", reason="the CLI's model commands need transformers")

from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
)

import lowbit  # noqa: E402
from lowbit import nn as lnn  # noqa: E402
from lowbit.cli import _model  # noqa: E402
from lowbit.cli.main import main  # noqa: E402


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of one in-process CLI call."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(*argv):
    return subprocess.run(
        [sys.executable, "-m", "lowbit", *map(str, argv)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    _helpers_nn.tiny_llama(tie=False, vocab_size=256).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minilm():
    return _model.minilm_dir()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm):
    """A random 2-layer BERT with MiniLM's tokenizer: the demo's code path in a fraction of the
    time."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (path / name).write_bytes((minilm / name).read_bytes())
    return path


# ---- demo ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_demo():
    """The README's main job, end to end through `python -m lowbit demo --json`."""
    proc = run_module("demo", "--json", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_demo_on_minilm_ranks_the_formats(minilm_demo):
    r = {row["format"]: row for row in minilm_demo["results"]}
    assert list(r) == ["fp32", "int8", "nf4", "fp4"]
    assert minilm_demo["sentences"] == 16
    assert r["fp32"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    # Measured on all-MiniLM-L6-v2: int8 0.9993, nf4 0.974, fp4 0.950.
    assert r["int8"]["cosine_mean"] > 0.998
    assert r["nf4"]["cosine_mean"] > r["fp4"]["cosine_mean"]
    assert minilm_demo["nf4_beats_fp4"]
    assert r["nf4"]["cosine_mean"] > 0.95 and r["fp4"]["cosine_mean"] > 0.9
    # Linear weights: int8 ~4x and 4-bit ~7x smaller than fp32 (scales included).
    assert r["int8"]["linear_mb"] < r["fp32"]["linear_mb"] / 3.5
    assert r["nf4"]["linear_mb"] < r["fp32"]["linear_mb"] / 6
    assert r["nf4"]["linear_mb"] == r["fp4"]["linear_mb"]
    assert all(row["latency_ms"] > 0 and row["load_quantize_s"] > 0 for row in r.values())


def test_demo_table_on_a_small_model(capsys, tiny_bert, tmp_path):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a first sentence\n\nanother one, a bit longer than the first\n")
    rc, out, err = run_cli(
        capsys, "demo", "--model", tiny_bert, "--sentences", sentences, "--repeats", "1"
    )
    assert rc == 0, err
    assert "2 sentences" in out
    for name in ("fp32", "int8", "nf4", "fp4"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), out
    assert "accurate than FP4" in out


def test_demo_errors(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "demo", "--model", tmp_path / "missing")
    assert rc == 2 and "not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    rc, _, err = run_cli(capsys, "demo", "--sentences", empty)
    assert rc == 2 and "no sentences" in err


# ---- quantize / inspect ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, kind",
    [
        (["--bits", "4", "--quant-type", "nf4", "--double-quant"], lnn.Linear4bit),
        (["--bits", "4", "--quant-type", "fp4"], lnn.Linear4bit),
        (["--bits", "8", "--threshold", "5.0"], lnn.Linear8bitLt),
    ],
)
def test_quantize_loads_in_lowbit_and_transformers(capsys, tiny_llama, tmp_path, flags, kind):
    dst = tmp_path / "q"
    rc, out, err = run_cli(capsys, "quantize", tiny_llama, dst, *flags, "--skip", "down_proj")
    assert rc == 0, err
    assert "quantized 12 of 15 linear layers" in out
    assert (dst / "generation_config.json").is_file()
    saved = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lowbit" and "load_in_4bit" not in saved

    ids = torch.arange(10).reshape(1, 10)
    ours = lowbit.from_pretrained(dst)
    theirs = AutoModelForCausalLM.from_pretrained(dst, device_map="cpu")
    for model in (ours, theirs):
        layer = model.model.layers[0]
        assert isinstance(layer.self_attn.q_proj, kind) and layer.self_attn.q_proj.is_quantized
        assert type(layer.mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_inspect_with_and_without_reference(capsys, tiny_llama, tmp_path):
    results = {}
    for qtype in ("nf4", "fp4"):
        dst = tmp_path / qtype
        assert (
            run_cli(capsys, "quantize", tiny_llama, dst, "--bits", 4, "--quant-type", qtype)[0] == 0
        )
        rc, out, err = run_cli(capsys, "inspect", dst, "--reference", tiny_llama, "--json")
        assert rc == 0, err
        results[qtype] = json.loads(out)
    rc, out, _ = run_cli(capsys, "quantize", tiny_llama, tmp_path / "int8", "--bits", 8)
    rc, out, err = run_cli(
        capsys, "inspect", tmp_path / "int8", "--reference", tiny_llama, "--json"
    )
    results["int8"] = json.loads(out)

    for fmt, result in results.items():
        layers = {row["layer"]: row for row in result["layers"]}
        q = layers["model.layers.0.self_attn.q_proj"]
        assert q["format"] == fmt and q["shape"] == [64, 64]
        assert layers["lm_head"]["format"] == "float" and layers["lm_head"]["rel_error"] == 0
        assert result["totals"]["formats"][fmt]["layers"] == 14
    # Random (Gaussian) weights: NF4 is the better 4-bit code, int8 far better than both.
    err = {fmt: r["totals"]["weighted_rel_error"] for fmt, r in results.items()}
    assert err["int8"] < 0.01 < err["nf4"] < err["fp4"] < 0.2

    rc, out, err = run_cli(capsys, "inspect", tmp_path / "nf4")
    assert rc == 0, err
    assert "scale min" in out and "nf4" in out and "MB on disk" in out


def test_quantize_and_inspect_minilm(capsys, minilm, tmp_path):
    dst = tmp_path / "minilm-nf4"
    rc, out, err = run_cli(capsys, "quantize", minilm, dst, "--bits", 4, "--quant-type", "nf4")
    assert rc == 0, err
    assert "quantized 37 of 37 linear layers" in out
    assert (dst / "tokenizer.json").is_file() and (dst / "1_Pooling" / "config.json").is_file()
    rc, out, err = run_cli(capsys, "inspect", dst, "--reference", minilm, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["totals"]["formats"]["nf4"]["layers"] == 37
    assert 0.05 < result["totals"]["weighted_rel_error"] < 0.12

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    ref = AutoModel.from_pretrained(minilm)
    quantized = AutoModel.from_pretrained(dst, device_map="cpu")  # + the lowbit plug-in
    with torch.no_grad():
        a, b = ref(ids).last_hidden_state.mean(1), quantized(ids).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.95


def test_quantize_refuses_to_overwrite(capsys, tiny_llama, tmp_path):
    dst = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_llama, dst, "--bits", 8)[0] == 0
    rc, _, err = run_cli(capsys, "quantize", tiny_llama, dst, "--bits", 8)
    assert rc == 2 and "--force" in err
    assert run_cli(capsys, "quantize", tiny_llama, dst, "--bits", 4, "--force")[0] == 0
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["bits"] == 4


# ---- env / bench -------------------------------------------------------------------------------


def test_env(capsys):
    rc, out, _ = run_cli(capsys, "env", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["versions"]["lowbit"] == lowbit.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["transformers"] is not None
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cuda_available"] == torch.cuda.is_available()
    assert isinstance(info["lowbit_with_cuda"], bool)
    assert info["lowbit_cpu_isa"] in ("generic", "avx2", "avx512")
    assert info["lowbit_best_cpu_isa"] in ("generic", "avx2", "avx512")
    if info["cpu_flags"] is not None and info["cpu_flags"]["avx2"] and info["cpu_flags"]["fma"]:
        assert info["lowbit_best_cpu_isa"] != "generic"
    if info["cpu_flags"] is not None:
        assert set(info["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni", "f16c", "fma"}
    rc, out, _ = run_cli(capsys, "env")
    assert rc == 0 and "torch cpu capability" in out and "lowbit built w/ CUDA" in out


def test_bench_forwards_its_arguments(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("lowbit.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lowbit.bench", fake)
    fake.__spec__ = types.SimpleNamespace(name="lowbit.bench")
    rc, _, _ = run_cli(capsys, "bench", "--device", "cpu", "--help")
    assert rc == 0 and seen == [["--device", "cpu", "--help"]]


def test_bench_without_the_benchmark_module(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lowbit.bench" else real(name, *a),
    )
    monkeypatch.delitem(sys.modules, "lowbit.bench", raising=False)
    rc, _, err = run_cli(capsys, "bench", "--device", "cpu")
    assert rc == 2 and "lowbit.bench" in err and len(err.strip().splitlines()) == 1


# ---- the error contract: one line on stderr, exit 2, no traceback ------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["quantize", "/nonexistent/src", "/tmp/x", "--bits", "4"], "not found"),
        (["quantize", "/nonexistent/src", "/tmp/x", "--bits", "3"], "--bits"),
        (["inspect", "/nonexistent/dir"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line(argv, needle):
    proc = run_module(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_errors_in_process(capsys, tiny_llama, tmp_path):
    rc, _, err = run_cli(capsys, "inspect", tmp_path)
    assert rc == 2 and "no .safetensors" in err
    rc, _, err = run_cli(capsys, "inspect", tiny_llama, "--reference", tmp_path / "nope")
    assert rc == 2 and "--reference" in err
    rc, _, err = run_cli(capsys, "quantize", tiny_llama, tiny_llama, "--bits", 8)
    assert rc == 2 and "differ" in err
