"""The command line and other formats: `demo --formats`, `inspect` and `env`."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the CLI's model commands need transformers")

from transformers import BertConfig, BertModel  # noqa: E402

import _helpers_formats as H  # noqa: E402
from lowbit.cli import _formats_demo, _model  # noqa: E402
from lowbit.cli.main import main  # noqa: E402


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def minilm():
    return _model.minilm_dir()


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory, minilm):
    """A random 2-layer BERT (hidden 128, so group size 128 applies) with MiniLM's tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
    )
    path = tmp_path_factory.mktemp("small-bert")
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            (path / name).write_bytes((minilm / name).read_bytes())
    return path


def test_demo_formats_on_a_small_model(capsys, small_bert):
    rc, out, _ = run_cli(
        capsys,
        "demo",
        "--model",
        small_bert,
        "--formats",
        "hqq,compressed-tensors",
        "--repeats",
        "1",
        "--json",
    )
    assert rc == 0
    result = json.loads(out)
    rows = {r["format"]: r for r in result["results"]}
    assert set(rows) == {"hqq", "compressed-tensors"}
    for r in rows.values():
        # int4 codes + fp32 scale and zero per 128 weights = 0.5625 B/w vs 2 B/w in bf16
        assert r["ratio_vs_bf16"] == pytest.approx(0.5625 / 2)
        assert r["cosine_min"] > 0.95


def test_demo_formats_falls_back_to_lowbit_quantizer(capsys, small_bert, monkeypatch):
    """Without hqq / compressed-tensors installed, the demo writes their layouts itself."""
    import builtins

    real_import = builtins.__import__

    def no_format_libs(name, *args, **kwargs):
        if name.split(".")[0] in ("hqq", "compressed_tensors"):
            raise ImportError(f"hidden: {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_format_libs)
    rc, out, _ = run_cli(
        capsys,
        "demo",
        "--model",
        small_bert,
        "--formats",
        "compressed-tensors,hqq",
        "--repeats",
        "1",
        "--json",
    )
    assert rc == 0
    for r in json.loads(out)["results"]:
        assert r["quantized_by"].startswith("lowbit quantize_affine")
        assert r["cosine_min"] > 0.95


def test_demo_formats_errors(capsys):
    rc, _, err = run_cli(capsys, "demo", "--formats", "gguf")
    assert rc == 2 and "--formats" in err and "hqq" in err


def test_minilm_int4_g128_compressed_tensors_gptq(capsys, minilm):
    """The issue's bars on the real all-MiniLM-L6-v2: an int4 g128 compressed-tensors checkpoint
    (GPTQ-calibrated on sentences disjoint from the evaluation ones, compressed by
    compressed-tensors when installed) run by lowbit keeps the sentence embeddings at cosine >= 0.97
    to fp32 (mean over the demo's sentences), with linear weights <= 0.3x their bf16 size.
    (Calibration-free int4 g128 stays near 0.962 on this model: see README.)"""
    rc, out, _ = run_cli(
        capsys, "demo", "--formats", "compressed-tensors-gptq", "--repeats", "1", "--json"
    )
    assert rc == 0
    r = json.loads(out)["results"][0]
    assert r["ratio_vs_bf16"] <= 0.3
    assert r["cosine_mean"] >= 0.97


def test_inspect_gptq_and_hqq(capsys, tmp_path):
    model = H.tiny_llama()
    model.save_pretrained(tmp_path / "float")
    dense = H.write_gptq(model, tmp_path / "gptq", 4, 32, False, True, zero_groups=False)
    rc, out, _ = run_cli(
        capsys, "inspect", tmp_path / "gptq", "--reference", tmp_path / "float", "--json"
    )
    assert rc == 0
    result = json.loads(out)
    rows = {r["layer"]: r for r in result["layers"]}
    q = rows["model.layers.0.mlp.up_proj"]
    assert q["format"] == "gptq-int4+perm" and q["shape"] == [256, 128]
    W = model.model.layers[0].mlp.up_proj.weight.detach()
    want = ((dense["model.layers.0.mlp.up_proj"] - W).norm() / W.norm()).item()
    assert q["rel_error"] == pytest.approx(want, rel=1e-5)
    assert rows["lm_head"]["format"] == "float"
    rc, out, _ = run_cli(capsys, "inspect", tmp_path / "gptq")
    assert "quantization_config: gptq (gptq, 4-bit, group size 32)" in out


def test_inspect_names_a_bad_layer(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    model = H.tiny_llama()
    H.write_awq(model, tmp_path, 32)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.qzeros"
    state[key] = state[key][:1].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    rc, _, err = run_cli(capsys, "inspect", tmp_path)
    assert rc == 2 and "model.layers.0.mlp.up_proj" in err and "qzeros" in err


def test_env_lists_the_formats(capsys):
    rc, out, _ = run_cli(capsys, "env", "--json")
    assert rc == 0
    formats = json.loads(out)["checkpoint_formats"]
    assert {"gptq", "awq", "compressed-tensors", "hqq"} <= set(formats["read"])
    assert "hqq" in formats["libraries_present"]
    rc, out, _ = run_cli(capsys, "env")
    assert "checkpoint formats lowbit reads" in out


def test_formats_are_known_to_the_parser():
    assert _formats_demo.parse_formats("hqq, compressed-tensors,hqq") == [
        "hqq",
        "compressed-tensors",
    ]


def test_gptq_codes_survive_the_compressed_tensors_writer(small_bert, tmp_path):
    """compressed-tensors-gptq: the codes lowbit loads are exactly the GPTQ codes (the
    compressor's own rounding of the dequantized weight lands on them)."""
    from transformers import AutoModel, AutoTokenizer

    import lowbit
    from lowbit.cli import _gptq

    model = AutoModel.from_pretrained(small_bert, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(small_bert)
    cal = tok(_gptq.CALIBRATION, padding=True, truncation=True, return_tensors="pt")
    name = "encoder.layer.1.intermediate.dense"
    H = _gptq.hessians(model, cal, [name])[name]
    codes, s, z = _gptq.gptq(model.get_submodule(name).weight, H, 128)
    W = model.get_submodule(name).weight.detach()
    _formats_demo.write_compressed_tensors_gptq(model, tmp_path, small_bert)
    loaded = lowbit.from_pretrained(tmp_path, progress=False)
    got = loaded.get_submodule(name).dequantize()
    want = (codes.float() - z.repeat_interleave(128, 1)) * s.repeat_interleave(128, 1)
    assert torch.equal(got, want)
    assert (got - W).abs().max() < 0.1
