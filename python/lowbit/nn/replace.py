"""Finding the linear layers of a model to quantize, and swapping in quantized layers.

Skipping follows Transformers + bitsandbytes: the output embeddings (`lm_head`), linear layers
whose weights are tied to other parameters, and user patterns. A pattern matches a module name
by whole dotted components: "lm_head" matches "lm_head" and "model.lm_head", "mlp" matches
"model.layers.0.mlp.up_proj", "layers.0" matches "model.layers.0.self_attn.q_proj"; "q" does NOT
match "q_proj".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from lowbit.nn.embedding import Embedding4bit, Embedding8bit
from lowbit.nn.modules import Linear4bit, Linear8bitLt

QUANTIZED_LINEAR_TYPES = (Linear4bit, Linear8bitLt)
QUANTIZED_EMBEDDING_TYPES = (Embedding4bit, Embedding8bit)
QUANTIZED_TYPES = QUANTIZED_LINEAR_TYPES + QUANTIZED_EMBEDDING_TYPES  # what TensorLoader fills


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2): a linear layer with a transposed [in, out] weight."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_quantizable_linear(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not isinstance(module, QUANTIZED_LINEAR_TYPES)) or (
        is_conv1d(module)
    )


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if is_conv1d(module):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


_REGEX_CHARS = frozenset("*+?[](){}|^$\\")


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name is covered by a skip pattern: a pattern equal to whole dotted name
    components ("mlp", "layers.0", "q_proj"; "q" is not "q_proj"), or, when it contains regex
    characters, a regular expression matched from the start up to a component boundary, as
    Transformers v5 does ("model.layers.[0-3].mlp", "model.layers.*.self_attn")."""
    dotted = f".{name}."
    for p in patterns:
        if not p:
            continue
        if f".{p.strip('.')}." in dotted:
            return True
        if _REGEX_CHARS.intersection(p):
            try:
                if re.match(f"(?:{p})(?:\\.|$)", name):
                    return True
            except re.error as e:
                raise ValueError(
                    f"skip pattern {p!r} is not a valid regular expression: {e}"
                ) from None
    return False


def _tied_module_names(model: nn.Module) -> set[str]:
    """Modules owning a parameter tied to another (Transformers' `_tied_weights_keys`, v4 list or v5
    dict, plus any linear weight that IS the input embedding weight)."""
    names: set[str] = set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = list(tied) + (list(tied.values()) if isinstance(tied, dict) else [])
    for key in keys:
        if isinstance(key, str):
            names.add(key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = None
    try:
        emb = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        pass
    emb_weight = getattr(emb, "weight", None)
    for name, m in model.named_modules():
        if emb_weight is not None and getattr(m, "weight", None) is emb_weight and m is not emb:
            names.add(name)
    return names


def default_skip_modules(model: nn.Module) -> list[str]:
    """Names never quantized by default: the output embeddings and tied layers (+ "lm_head")."""
    skip = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    try:
        out = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        pass
    if out is not None:
        skip.update(name for name, m in model.named_modules() if m is out and name)
    skip.update(_tied_module_names(model))
    return sorted(skip)


def linear_layers_to_quantize(model: nn.Module, skip: Iterable[str]) -> list[str]:
    skip = list(skip)
    return [
        name
        for name, m in model.named_modules()
        if name and is_quantizable_linear(m) and not name_matches(name, skip)
    ]


def make_quantized_linear(
    in_features: int, out_features: int, bias: bool, config, device="meta"
) -> nn.Module:
    """An empty Linear4bit / Linear8bitLt set up as `config` says."""
    if config.bits == 4:
        return Linear4bit(
            in_features,
            out_features,
            bias,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            device=device,
        )
    if config.bits == 8:
        return Linear8bitLt(
            in_features,
            out_features,
            bias,
            has_fp16_weights=config.llm_int8_has_fp16_weight,
            threshold=config.llm_int8_threshold,
            device=device,
        )
    raise ValueError("the config selects neither load_in_4bit nor load_in_8bit")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_in_empty(model: nn.Module, name: str, config) -> nn.Module:
    """Replace the linear layer `name` by an empty (meta) quantized one; returns the new module."""
    old = model.get_submodule(name)
    in_f, out_f = linear_features(old)
    new = make_quantized_linear(in_f, out_f, old.bias is not None, config, device="meta")
    # Transformers' convention: a Conv1D source means float weights arrive transposed.
    new.source_cls = type(old)
    new.requires_grad_(False)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    set_submodule(model, name, new)
    return new


def float_weight_of(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a Conv1D."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


# ---- embeddings (opt-in: quantize_model(..., quantize_embeddings=True)) -------------------------


def embeddings_to_quantize(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """Names of the float nn.Embedding modules to quantize: not skipped, not already quantized,
    without max_norm (which renormalizes the table in place on lookup), and not sharing their
    weight with another module (a tied lm_head would keep the float table alive, and the tie
    would break on reload)."""
    skip = list(skip)
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        name
        for name, m in model.named_modules()
        if name
        and isinstance(m, nn.Embedding)
        and not isinstance(m, QUANTIZED_EMBEDDING_TYPES)
        and m.max_norm is None
        and owners.get(id(m.weight), 0) == 1
        and not name_matches(name, skip)
    ]


def make_quantized_embedding(num_embeddings: int, embedding_dim: int, config, dtype, device="meta"):
    """An empty Embedding4bit / Embedding8bit set up as `config` says (no double quantization:
    a lookup gathers a few rows' scales, which plain fp32 absmax serves directly)."""
    if config.bits == 4:
        return Embedding4bit(
            num_embeddings,
            embedding_dim,
            dtype=dtype,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            device=device,
        )
    if config.bits == 8:
        return Embedding8bit(num_embeddings, embedding_dim, device=device, dtype=dtype)
    raise ValueError("the config selects neither load_in_4bit nor load_in_8bit")
