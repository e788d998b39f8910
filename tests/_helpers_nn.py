"""Tiny models and layers shared by test_nn.py and test_loading.py (random weights, CPU)."""

from __future__ import annotations

import torch
from torch import nn

import lowbit


def float_linear(in_f=64, out_f=32, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def quantized_linear(kind: str, in_f=64, out_f=32, bias=True, **kwargs) -> nn.Module:
    """A quantized copy of float_linear(): kind is 'nf4', 'fp4', 'nf4-dq' (double quant) or 'int8'."""
    lin = float_linear(in_f, out_f, bias)
    if kind == "int8":
        kwargs.setdefault("threshold", 6.0)
        return lowbit.nn.Linear8bitLt.from_linear(lin, **kwargs)
    quant_type = kind.split("-")[0]
    return lowbit.nn.Linear4bit.from_linear(
        lin, quant_type=quant_type, compress_statistics=kind.endswith("-dq"), **kwargs
    )


def empty_like_layer(module: nn.Module, device="meta") -> nn.Module:
    """A fresh, unquantized layer of the same type and settings (what a loader builds)."""
    if isinstance(module, lowbit.nn.Linear8bitLt):
        return lowbit.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            module.bias is not None,
            has_fp16_weights=False,
            threshold=module.threshold,
            device=device,
        )
    return lowbit.nn.Linear4bit(
        module.in_features,
        module.out_features,
        module.bias is not None,
        compute_dtype=module.compute_dtype,
        quant_type=module.weight.quant_type,
        device=device,
    )


def tiny_llama(tie=True, seed=0, vocab_size=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tokens(vocab=128, shape=(2, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)
