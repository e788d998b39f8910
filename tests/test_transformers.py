"""The Transformers plug-in: quantize on load, save / reload without re-quantizing, generate.

A tiny random Llama saved to a temporary directory stands in for a real checkpoint; every check
is about the plumbing (which layers, which keys, bit-exact round trips), not model quality.
"""

import json
import subprocess
import sys

import pytest
import torch

import _helpers_nn

pytest.importorskip("transformers", reason="the plug-in needs transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lowbit  # noqa: E402, F401  (registers the "lowbit" quantizer)
from lowbit import nn as lnn  # noqa: E402
from lowbit._native import cpu_gemv_mode  # noqa: E402
from lowbit.config import LowbitConfig  # noqa: E402
from lowbit.nn.parameters import Int8Params, Params4bit  # noqa: E402

CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
    },
    "int8": {"load_in_8bit": True},
}
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    _helpers_nn.tiny_llama(tie=False, vocab_size=256).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def float_logits(tiny_llama, input_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        return model(input_ids).logits


def _load(path, **kwargs):
    # The plug-in's default device is the GPU when lowbit has CUDA kernels; these tests are on CPU.
    kwargs.setdefault("device_map", "cpu")
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


# 4-bit layers on an AVX2 CPU round their activations to int8 (LOWBIT_CPU_GEMV=int8, the default
# there), so "the same float weight" gives the same logits only up to that rounding.
INT8_ACTIVATIONS = cpu_gemv_mode() == "int8"


def _same_weights_same_logits(a, b, tol):
    if INT8_ACTIVATIONS:
        assert _cosine(a, b) > 0.9995
    else:
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _no_requantize(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint was quantized again")

    monkeypatch.setattr(Params4bit, "_quantize", refuse)
    monkeypatch.setattr(Int8Params, "_quantize", refuse)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_on_load(tiny_llama, input_ids, float_logits, name):
    config = LowbitConfig(**CONFIGS[name])
    model = _load(tiny_llama, quantization_config=config)
    kind = lnn.Linear8bitLt if config.load_in_8bit else lnn.Linear4bit
    quantized = [m for m in model.modules() if isinstance(m, kind)]
    assert len(quantized) == LINEARS_PER_LAYER * 2
    assert all(m.is_quantized for m in quantized)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == (torch.int8 if config.load_in_8bit else torch.uint8)
    if not config.load_in_8bit:
        assert attn.q_proj.weight.quant_type == config.bnb_4bit_quant_type
        assert attn.q_proj.weight.quant_state.nested == config.bnb_4bit_use_double_quant
    # The output head stays in float (Transformers' default skip list), as with bitsandbytes.
    assert type(model.lm_head) is torch.nn.Linear
    assert model.is_quantized and model.hf_quantizer.quantization_config.quant_method == "lowbit"
    bar = 0.999 if config.load_in_8bit else 0.97
    assert _cosine(_logits(model, input_ids), float_logits) > bar


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_reload_is_exact(tiny_llama, input_ids, tmp_path, monkeypatch, name):
    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS[name]))
    logits = _logits(model, input_ids)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lowbit"
    assert not {"load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit"} & set(saved)
    assert saved["bits"] == (8 if "load_in_8bit" in CONFIGS[name] else 4)

    tensors = load_file(tmp_path / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj."
    if saved["bits"] == 8:
        assert tensors[q + "weight"].dtype == torch.int8 and q + "SCB" in tensors
    else:
        assert q + f"weight.quant_state.bitsandbytes__{saved['bnb_4bit_quant_type']}" in tensors

    _no_requantize(monkeypatch)
    reloaded = _load(tmp_path)
    assert reloaded.hf_quantizer.pre_quantized
    assert torch.equal(_logits(reloaded, input_ids), logits)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resave_after_reload_is_identical(tiny_llama, tmp_path):
    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS["fp4-double"]))
    model.save_pretrained(tmp_path / "a")
    _load(tmp_path / "a").save_pretrained(tmp_path / "b")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_generate(tiny_llama, input_ids, tmp_path, name):
    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS[name]))
    out = model.generate(input_ids[:1], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, input_ids.shape[1] + 6)
    model.save_pretrained(tmp_path)
    again = _load(tmp_path).generate(input_ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(again, out)


def _tiny_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    GPT2LMHeadModel(config).save_pretrained(path)


def _tiny_tied_bf16_llama(path):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


@pytest.mark.parametrize(
    "make, name",
    [(_tiny_gpt2, "nf4"), (_tiny_gpt2, "int8"), (_tiny_tied_bf16_llama, "fp4-double")],
    ids=["gpt2-conv1d-nf4", "gpt2-conv1d-int8", "llama-tied-bf16-fp4"],
)
def test_other_architectures(tmp_path, input_ids, make, name):
    """GPT-2 keeps its weights in Conv1D ([in, out]); a tied bf16 Llama must stay bf16 and keep
    its output head tied to the (float) embeddings."""
    torch.manual_seed(0)
    make(tmp_path / "src")
    reference = _logits(_load(tmp_path / "src"), input_ids).float()
    model = _load(tmp_path / "src", quantization_config=LowbitConfig(**CONFIGS[name]))
    quantized = [m for m in model.modules() if isinstance(m, (lnn.Linear4bit, lnn.Linear8bitLt))]
    assert len(quantized) == (8 if make is _tiny_gpt2 else 14)
    logits = _logits(model, input_ids)
    assert _cosine(logits.float(), reference) > 0.98
    if make is _tiny_tied_bf16_llama:
        assert model.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "q")
    reloaded = _load(tmp_path / "q")
    assert torch.equal(_logits(reloaded, input_ids), logits)
    assert torch.equal(_logits(lowbit.from_pretrained(tmp_path / "q"), input_ids), logits)


def test_skip_modules(tiny_llama):
    config = LowbitConfig(load_in_4bit=True, llm_int8_skip_modules=["q_proj", "lm_head"])
    model = _load(tiny_llama, quantization_config=config)
    layer = model.model.layers[1]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear
    assert isinstance(layer.self_attn.k_proj, lnn.Linear4bit)


def test_dequantize(tiny_llama, input_ids):
    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS["nf4"]))
    logits = _logits(model, input_ids)
    model.dequantize()
    assert not any(isinstance(m, (lnn.Linear4bit, lnn.Linear8bitLt)) for m in model.modules())
    assert not hasattr(model.config, "quantization_config")
    _same_weights_same_logits(_logits(model, input_ids), logits, 1e-4)


def test_lowbit_and_transformers_read_each_others_checkpoints(tiny_llama, input_ids, tmp_path):
    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS["nf4"]))
    logits = _logits(model, input_ids)
    model.save_pretrained(tmp_path / "hf")
    ours = lowbit.loading.from_pretrained(tmp_path / "hf")
    assert torch.equal(_logits(ours, input_ids), logits)

    lowbit.loading.save_pretrained(ours, tmp_path / "lowbit")
    assert torch.equal(_logits(_load(tmp_path / "lowbit"), input_ids), logits)


@pytest.mark.parametrize("name, key", [("int8", "SCB"), ("nf4", "weight.absmax")])
def test_a_corrupt_checkpoint_is_refused(tiny_llama, tmp_path, name, key):
    from safetensors.torch import save_file

    _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS[name])).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    bad = "model.layers.0.self_attn.q_proj." + key
    tensors[bad] = tensors[bad][:5]  # too few scales for the layer
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")


def test_a_config_without_bits_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="neither load_in_4bit nor load_in_8bit"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=LowbitConfig())


def test_quantize_model_then_transformers_save_and_reload(tiny_llama, input_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lowbit.quantize_model(model, LowbitConfig(**CONFIGS["int8"]), progress=False)
    logits = _logits(model, input_ids)
    model.save_pretrained(tmp_path)  # Transformers' own save, no quantizer attached
    assert torch.equal(_logits(_load(tmp_path), input_ids), logits)


def test_disk_offload_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="disk"):
        AutoModelForCausalLM.from_pretrained(
            tiny_llama,
            quantization_config=LowbitConfig(load_in_4bit=True),
            device_map={"": "disk"},
        )


@pytest.mark.parametrize("order", ["lowbit first", "transformers first"])
def test_registration_does_not_depend_on_import_order(order):
    imports = ["import lowbit", "import transformers.quantizers.auto as auto"]
    if order == "transformers first":
        imports.reverse()
    code = "; ".join(
        [
            *imports,
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q",
            "print(Q['lowbit'].__name__)",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LowbitHfQuantizer"


def test_import_lowbit_does_not_import_the_quantizer_registry():
    code = "import sys, lowbit; print('transformers.quantizers.auto' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- QLoRA with PEFT on a model quantized by the plug-in ---------------------------------------


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_qlora_trains_and_merges(tiny_llama, input_ids, name):
    peft = pytest.importorskip("peft", reason="QLoRA needs peft")
    from lowbit.integrations.peft import merge_and_unload

    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS[name]))
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    model = peft.get_peft_model(model, lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # The quantized base stays frozen: codes and scales are bit-identical after training.
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())

    logits = _logits(model, input_ids)
    merged = merge_and_unload(model, requantize=False)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(merged.model.layers[0].self_attn.k_proj, (lnn.Linear4bit, lnn.Linear8bitLt))
    if name == "nf4":  # the same float weight, whether split into base + LoRA or merged
        _same_weights_same_logits(_logits(merged, input_ids), logits, 1e-3)
    else:  # LLM.int8() also rounds the activations; the merged float layer does not
        assert _cosine(_logits(merged, input_ids), logits) > 0.9995


def test_merge_requantizes_in_the_same_format(tiny_llama, input_ids):
    peft = pytest.importorskip("peft", reason="QLoRA needs peft")
    from lowbit.integrations.peft import merge_and_unload

    model = _load(tiny_llama, quantization_config=LowbitConfig(**CONFIGS["fp4-double"]))
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, lora)
    logits = _logits(model, input_ids)
    merged = merge_and_unload(model)
    q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q, lnn.Linear4bit) and q.is_quantized
    assert q.weight.quant_type == "fp4" and q.weight.quant_state.nested
    assert _cosine(_logits(merged, input_ids), logits) > 0.97
