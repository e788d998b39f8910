"""quantize_model, replace_linear_layers, TensorLoader, from_pretrained and save_pretrained on
tiny generated Llama / GPT-2 models (random weights, CPU)."""

from __future__ import annotations

import copy
import gc
import io
import json
import sys
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit
from _helpers_nn import tiny_gpt2, tiny_llama, tokens
from lowbit import LowbitConfig
from lowbit.loading import TensorLoader, load_tensor, replace_linear_layers
from lowbit.nn import Linear4bit, Linear8bitLt

pytest.importorskip("transformers")

Q4 = dict(load_in_4bit=True)
Q8 = dict(load_in_8bit=True)
QUANTIZED = (Linear4bit, Linear8bitLt)


def _quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QUANTIZED))


def _plain_linear_names(model):
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    model = tiny_gpt2()
    model.save_pretrained(path)
    return path, model


# ---- quantize_model / replace_linear_layers --------------------------------------------------


@pytest.mark.parametrize("kw", [Q4, Q8])
def test_quantize_model_swaps_linears_and_skips_lm_head(kw):
    model = tiny_llama()
    x = tokens()
    ref = model(x).logits
    biases = {n: m.bias for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = lowbit.quantize_model(model, LowbitConfig(**kw))
    assert out is model
    assert _plain_linear_names(model) == ["lm_head"]
    assert len(_quantized_names(model)) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(m.is_quantized for m in model.modules() if isinstance(m, QUANTIZED))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie intact
    assert model.is_loaded_in_4bit == (kw == Q4) and model.is_loaded_in_8bit == (kw == Q8)
    logits = model(x).logits
    assert (logits - ref).abs().max() < (0.05 if kw == Q8 else 0.5)
    assert all(biases[n] is None for n in biases if n != "lm_head")  # llama: no bias, none added


def test_num_parameters_of_a_4bit_model_needs_no_bitsandbytes(monkeypatch):
    # Transformers' num_parameters imports bitsandbytes for any is_loaded_in_4bit model; lowbit's
    # models count their packed weights by logical shape instead, as the float model did.
    model = tiny_llama()
    want = [model.num_parameters(), model.num_parameters(exclude_embeddings=True)]
    lowbit.quantize_model(model, LowbitConfig(**Q4))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    assert [model.num_parameters(), model.num_parameters(exclude_embeddings=True)] == want
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # float ones
    assert 0 < model.num_parameters(only_trainable=True) == trainable < want[0]
    model.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == 0
    assert copy.deepcopy(model).num_parameters() == want[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).num_parameters() == want[0]
    # no reference cycle: the quantized model is freed by `del`, without the cyclic collector
    gc.disable()
    try:
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_quantize_model_keeps_bias_and_handles_gpt2_conv1d():
    model = tiny_gpt2()
    x = tokens()
    ref = model(x).logits
    c_attn = model.transformer.h[0].attn.c_attn
    bias = c_attn.bias.detach().clone()
    weight_t = c_attn.weight.detach().t().clone()  # Conv1D stores [in, out]
    lowbit.quantize_model(model, {"bits": 8})
    q = model.transformer.h[0].attn.c_attn
    assert isinstance(q, Linear8bitLt) and torch.equal(q.bias, bias)
    assert (q.dequantize() - weight_t).abs().max() <= weight_t.abs().max() / 127
    assert (model(x).logits - ref).abs().max() < 0.05
    assert _plain_linear_names(model) == ["lm_head"]


@pytest.mark.parametrize(
    "skip, kept",
    [
        (["mlp"], {"gate_proj", "up_proj", "down_proj"}),
        (["q_proj"], {"q_proj"}),
        (["layers.0"], None),  # all of layer 0, none of layer 1
        (["q"], set()),  # whole components only: "q" is not "q_proj"
        ([r"model.layers.\d+.mlp"], {"gate_proj", "up_proj", "down_proj"}),  # Transformers v5 regex
        (["model.layers.1.*"], None),  # regex: all of layer 1
    ],
)
def test_skip_modules_match_name_components(skip, kept):
    model = tiny_llama()
    lowbit.quantize_model(model, LowbitConfig(load_in_4bit=True, llm_int8_skip_modules=skip))
    plain = set(_plain_linear_names(model)) - {"lm_head"}
    if kept is None:
        layer = next(c for c in skip[0] if c.isdigit())  # the skipped layer's index
        assert plain and all(n.startswith(f"model.layers.{layer}.") for n in plain)
        assert not any(n.startswith(f"model.layers.{1 - int(layer)}.") for n in plain)
    else:
        assert {n.rsplit(".", 1)[1] for n in plain} == kept


def test_invalid_skip_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lowbit.quantize_model(
            tiny_llama(), LowbitConfig(load_in_4bit=True, llm_int8_skip_modules=["model.layers.[0"])
        )


def test_skip_modules_argument_and_untied_lm_head():
    model = tiny_llama(tie=False)
    lowbit.quantize_model(model, LowbitConfig(load_in_8bit=True), skip_modules=["o_proj"])
    plain = _plain_linear_names(model)
    assert "lm_head" in plain and all(n == "lm_head" or n.endswith("o_proj") for n in plain)
    with pytest.raises(TypeError, match="skip_modules"):
        lowbit.quantize_model(tiny_llama(), LowbitConfig(load_in_8bit=True), skip_modules="o_proj")


def test_quantize_model_needs_bits():
    with pytest.raises(ValueError, match="neither"):
        lowbit.quantize_model(tiny_llama(), LowbitConfig())


def test_quantize_model_progress_bar(capsys):
    lowbit.quantize_model(tiny_llama(), LowbitConfig(load_in_4bit=True), progress=True)
    assert "Quantizing" in capsys.readouterr().err


def test_replace_linear_layers_gives_empty_meta_layers_and_load_tensor_fills_them():
    model = tiny_llama()
    float_up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    replace_linear_layers(model, LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, Linear4bit) and up.weight.is_meta and not up.is_quantized
    load_tensor(model, "model.layers.0.mlp.up_proj.weight", float_up)
    assert up.is_quantized and up.weight.device.type == "cpu"
    ref = Linear4bit.from_linear(nn.Linear(64, 128, bias=False), quant_type="nf4")
    ref.load_state_dict({"weight": float_up}, assign=True)
    ref.quantize_()
    assert torch.equal(up.weight.data, ref.weight.data)


def test_tensor_loader_takes_prequantized_keys_in_any_order():
    src = tiny_llama()
    lowbit.quantize_model(src, LowbitConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    state = src.state_dict()
    dst = tiny_llama(seed=5)
    replace_linear_layers(dst, LowbitConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True))
    loader = TensorLoader(dst)
    for key in reversed(list(state)):  # aux keys before the weight
        loader.add(key, state[key])
    assert loader.finish() == []
    dst.tie_weights()
    x = tokens()
    assert torch.equal(dst(x).logits, src(x).logits)


def test_tensor_loader_reports_incomplete_layers():
    src = tiny_llama()
    lowbit.quantize_model(src, LowbitConfig(load_in_4bit=True))
    state = src.state_dict()
    dst = tiny_llama()
    replace_linear_layers(dst, LowbitConfig(load_in_4bit=True))
    loader = TensorLoader(dst)
    for key, t in state.items():
        if key != "model.layers.1.self_attn.v_proj.weight.absmax":
            loader.add(key, t)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight\.absmax"):
        loader.finish()


# ---- from_pretrained ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [Q4, Q8])
def test_from_pretrained_quantizes_while_loading(llama_dir, kw):
    path, ref_model = llama_dir
    model = lowbit.from_pretrained(path, **kw)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert _plain_linear_names(model) == ["lm_head"]
    assert all(m.is_quantized for m in model.modules() if isinstance(m, QUANTIZED))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    # same result as quantizing the float model in memory
    expected = lowbit.quantize_model(tiny_llama(), LowbitConfig(**kw))
    x = tokens()
    assert torch.equal(model(x).logits, expected(x).logits)
    assert isinstance(model.config.quantization_config, LowbitConfig)


def test_from_pretrained_gpt2_conv1d(gpt2_dir):
    path, ref_model = gpt2_dir
    model = lowbit.from_pretrained(path, quantization_config=LowbitConfig(**Q8))
    assert isinstance(model.transformer.h[0].mlp.c_fc, Linear8bitLt)
    x = tokens()
    assert (model(x).logits - ref_model(x).logits).abs().max() < 0.05


def test_from_pretrained_unquantized_and_dtype(llama_dir):
    path, ref_model = llama_dir
    x = tokens()
    plain = lowbit.from_pretrained(path)
    assert torch.equal(plain(x).logits, ref_model(x).logits)
    bf = lowbit.from_pretrained(path, load_in_4bit=True, torch_dtype=torch.bfloat16)
    assert bf.model.norm.weight.dtype == torch.bfloat16
    assert bf.model.layers[0].mlp.up_proj.quant_state.dtype == torch.bfloat16
    assert bf(x).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype"):
        lowbit.from_pretrained(path, torch_dtype="float99")


def test_from_pretrained_base_model_class(tmp_path):
    from transformers import LlamaModel

    base = LlamaModel(tiny_llama().config).eval()
    base.save_pretrained(tmp_path)
    model = lowbit.from_pretrained(tmp_path, load_in_8bit=True)
    assert type(model).__name__ == "LlamaModel"
    assert len(_quantized_names(model)) == 14


@pytest.mark.parametrize(
    "device_map", ["cpu", "auto", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}]
)
def test_device_maps(llama_dir, device_map):
    path, _ = llama_dir
    model = lowbit.from_pretrained(path, load_in_4bit=True, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model(tokens()).logits.shape == (2, 7, 128)


def test_device_map_must_cover_every_module(llama_dir):
    path, _ = llama_dir
    with pytest.raises(ValueError, match="lm_head"):
        lowbit.from_pretrained(path, load_in_4bit=True, device_map={"model": "cpu"})


def test_fp32_cpu_offload_needs_the_flag_with_an_accelerator(llama_dir):
    path, _ = llama_dir
    # an accelerator plus cpu entries: without the flag this is refused before any weight loads
    dmap = {
        "model.embed_tokens": 0,
        "model.layers": "cpu",
        "model.norm": 0,
        "model.rotary_emb": 0,
        "lm_head": 0,
    }
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        lowbit.from_pretrained(path, load_in_8bit=True, device_map=dmap)


def test_sharded_checkpoint(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    q = lowbit.from_pretrained(tmp_path, load_in_4bit=True)
    expected = lowbit.quantize_model(tiny_llama(), LowbitConfig(**Q4))
    assert torch.equal(q(tokens()).logits, expected(tokens()).logits)


def test_pickle_needs_opt_in(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="allow_pickle"):
        lowbit.from_pretrained(tmp_path, load_in_8bit=True)
    q = lowbit.from_pretrained(tmp_path, load_in_8bit=True, allow_pickle=True)
    assert isinstance(q.model.layers[0].mlp.up_proj, Linear8bitLt)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        lowbit.from_pretrained(tmp_path, load_in_4bit=True)


# ---- save_pretrained ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
        LowbitConfig(load_in_8bit=True, llm_int8_threshold=4.0),
    ],
)
def test_save_and_reload_is_exact(llama_dir, tmp_path, monkeypatch, config):
    path, _ = llama_dir
    model = lowbit.from_pretrained(path, quantization_config=config)
    lowbit.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["format_version"] == 1
    assert not any(k.startswith(("load_in", "_load_in")) for k in qc)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "lowbit_format_version": "1"}
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied: stored once
    if config.bits == 4:
        assert (
            "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__" + config.quant_type
            in keys
        )
    else:
        assert {
            "model.layers.0.mlp.up_proj.SCB",
            "model.layers.0.mlp.up_proj.weight_format",
        } <= keys

    # reloading must not quantize again
    def boom(*a, **k):
        raise AssertionError("re-quantized a pre-quantized checkpoint")

    monkeypatch.setattr(lowbit.nn.parameters.Params4bit, "_quantize", boom)
    monkeypatch.setattr(lowbit.nn.parameters.Int8Params, "_quantize", boom)
    again = lowbit.from_pretrained(tmp_path)
    assert again.config.quantization_config == config
    for x in (tokens(shape=(1, 1)), tokens()):
        assert torch.equal(again(x).logits, model(x).logits)


def test_sharded_save(llama_dir, tmp_path):
    path, _ = llama_dir
    model = lowbit.from_pretrained(path, load_in_4bit=True)
    lowbit.save_pretrained(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    again = lowbit.from_pretrained(tmp_path)
    assert torch.equal(again(tokens()).logits, model(tokens()).logits)


def test_prequantized_checkpoint_refuses_another_format(llama_dir, tmp_path):
    path, _ = llama_dir
    lowbit.save_pretrained(lowbit.from_pretrained(path, load_in_4bit=True), tmp_path)
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.from_pretrained(tmp_path, load_in_8bit=True)
    lowbit.from_pretrained(tmp_path, load_in_4bit=True)  # the same format is fine


# ---- bitsandbytes checkpoints -------------------------------------------------------------------


def _write_bnb_checkpoint(path, kind):
    """What Transformers + bitsandbytes write: bnb layers' state dicts in safetensors + config."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = tiny_llama()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    layers = {}
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name == "lm_head":
            continue
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(
                m.in_features, m.out_features, bias=False, has_fp16_weights=False
            )
        else:
            layer = bnb.nn.Linear4bit(
                m.in_features, m.out_features, bias=False, quant_type=kind, compress_statistics=True
            )
        layer.load_state_dict({"weight": m.weight.detach().half().float()})
        layer = layer.to("cpu")
        layers[name] = layer
        del state[name + ".weight"]
        state.update({f"{name}.{k}": v.contiguous() for k, v in layer.state_dict().items()})
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc = (
        BitsAndBytesConfig(load_in_8bit=True)
        if kind == "int8"
        else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True
        )
    )
    cfg = model.config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["quantization_config"] = json.loads(qc.to_json_string(use_diff=False))
    (path / "config.json").write_text(json.dumps(cfg))
    return layers


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_loads_bitsandbytes_checkpoint(tmp_path, kind):
    bnb = pytest.importorskip("bitsandbytes")
    layers = _write_bnb_checkpoint(tmp_path, kind)
    model = lowbit.from_pretrained(tmp_path)
    assert model.config.quantization_config.bits == (8 if kind == "int8" else 4)
    for name, theirs in layers.items():
        ours = model.get_submodule(name)
        if kind == "int8":
            assert torch.equal(ours.weight.data, theirs.weight.data)
            assert torch.equal(ours.weight.SCB, theirs.weight.SCB)
        else:
            w = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
            assert torch.equal(ours.dequantize(torch.float32), w), name
    assert model(tokens()).logits.isfinite().all()


def test_checkpoint_dtype_read_without_the_deprecated_alias(tmp_path, monkeypatch):
    # Transformers 5 keeps `config.torch_dtype` as a property that logs a deprecation on every
    # read; the saved dtype (config.json "dtype", or a legacy "torch_dtype") comes from `dtype`.
    from transformers import AutoConfig, PretrainedConfig

    from lowbit.loading.pretrained import _resolve_dtype

    def no_read(self):
        raise AssertionError("read the deprecated config.torch_dtype")

    monkeypatch.setattr(PretrainedConfig, "torch_dtype", property(no_read))
    for saved, expected in (({"torch_dtype": "bfloat16"}, torch.bfloat16), ({}, None)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **saved}))
        config = AutoConfig.from_pretrained(tmp_path)
        assert _resolve_dtype(None, config) == expected
        assert _resolve_dtype("auto", config) == expected
    assert _resolve_dtype("float16", config) == torch.float16
