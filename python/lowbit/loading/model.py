"""Swap a model's linear layers for quantized ones (quantize_model, replace_linear_layers)."""

from __future__ import annotations

import functools
import logging
import math
import weakref

import torch
from torch import nn

from lowbit.config import LowbitConfig
from lowbit.nn.replace import (
    default_skip_modules,
    embeddings_to_quantize,
    float_weight_of,
    linear_features,
    linear_layers_to_quantize,
    make_quantized_embedding,
    make_quantized_linear,
    set_submodule,
    swap_in_empty,
)

logger = logging.getLogger("lowbit")


def progress_bar(iterable=None, total=None, desc="", enabled=None):
    """tqdm, shown on a terminal (enabled=None), forced on (True) or off (False)."""
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)


def as_config(config) -> LowbitConfig:
    """A LowbitConfig from a LowbitConfig, a dict, or any config with to_dict() (BitsAndBytesConfig)."""
    if isinstance(config, LowbitConfig):
        return config
    if isinstance(config, dict):
        return LowbitConfig.from_dict(config)
    if hasattr(config, "to_dict"):
        return LowbitConfig.from_dict(config.to_dict())
    raise TypeError(f"expected a LowbitConfig or a dict, got {type(config).__name__}")


def skip_list(model, config: LowbitConfig, skip_modules) -> list[str]:
    if skip_modules is not None and (
        isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules)
    ):
        raise TypeError(f"skip_modules must be a list of str, got {skip_modules!r}")
    return default_skip_modules(model) + config.skip_modules + list(skip_modules or [])


def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """PreTrainedModel.num_parameters for a model with lowbit 4-bit layers. Transformers' own
    version imports bitsandbytes whenever is_loaded_in_4bit is set (an ImportError without it)
    and counts only its own Params4bit at their logical size; this one counts every quantized
    4-bit weight by the shape in its quant state, everything else by numel()."""
    skip = set()
    if exclude_embeddings:
        skip = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
    total = 0
    for name, param in self.named_parameters():
        if name in skip or not (param.requires_grad or not only_trainable):
            continue
        state = getattr(param, "quant_state", None)
        quantized = state is not None and getattr(param, "bnb_quantized", False)
        total += math.prod(state.shape) if quantized else param.numel()
    return total


class _NumParameters:
    """model.num_parameters for a lowbit 4-bit model. It holds the model weakly: a strong
    reference from the model's own __dict__ would make a cycle, and a quantized model would then
    outlive `del model` until the cyclic garbage collector ran. __reduce__ rebuilds it from the
    model, so torch.save/load and deepcopy keep it (a bound method would be looked up again by
    name on the class when unpickled, and lost)."""

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)

    def __call__(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return num_parameters(self.model(), only_trainable, exclude_embeddings)

    def __reduce__(self):
        return (_NumParameters, (self.model(),))


def _save_pretrained_with_format(original):
    """`original` (a model class's save_pretrained) with a `format` argument: "bitsandbytes" writes
    the checkpoint through lowbit.save_pretrained in bitsandbytes' format (loadable without
    lowbit); None or "lowbit" call `original` unchanged (Transformers' own, which Trainer calls
    too)."""

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, format: str | None = None, **kwargs):
        from lowbit.loading.save import FORMATS, refuse_affine
        from lowbit.loading.save import save_pretrained as lowbit_save

        if format is not None and format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if format != "bitsandbytes":
            # Transformers would write a LinearAffine model's packed/scales/zeros under a config
            # without quantization_config: a checkpoint that reloads with random linear weights.
            refuse_affine(self)
            return original(self, save_directory, *args, **kwargs)
        unknown = sorted(set(kwargs) - {"max_shard_size", "safe_serialization"})
        if args or unknown or kwargs.get("safe_serialization", True) is not True:
            raise TypeError(
                "save_pretrained(format='bitsandbytes') takes save_directory and max_shard_size "
                f"(safetensors only); got extra arguments {unknown or list(args)}"
            )
        lowbit_save(
            self,
            save_directory,
            max_shard_size=kwargs.get("max_shard_size", "5GB"),
            format="bitsandbytes",
        )

    save_pretrained._lowbit_format = True
    return save_pretrained


def attach_save_pretrained(model: nn.Module) -> None:
    """Give the model's class a save_pretrained(..., format=...) (see _save_pretrained_with_format).

    Set on the class, not the instance: an instance attribute holding the model would make a
    reference cycle (the model freed only by the cyclic garbage collector), and holding it weakly
    would lose a temporary model (`load(...).save_pretrained(...)`) before the call. Every call
    without `format` runs the class's own method unchanged; Transformers would otherwise drop an
    unknown `format` argument silently."""
    cls = type(model)
    original = getattr(cls, "save_pretrained", None)
    if callable(original) and not getattr(original, "_lowbit_format", False):
        cls.save_pretrained = _save_pretrained_with_format(original)


def _mark_quantized(model: nn.Module, config: LowbitConfig) -> None:
    # PEFT's prepare_model_for_kbit_training looks for these flags.
    model.is_loaded_in_4bit = config.bits == 4
    model.is_loaded_in_8bit = config.bits == 8
    if config.bits == 4 and hasattr(model, "num_parameters"):
        model.num_parameters = _NumParameters(model)
    attach_save_pretrained(model)
    model.quantization_method = "lowbit"
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        hf_config.quantization_config = config


def replace_linear_layers(model: nn.Module, config, skip_modules=None) -> nn.Module:
    """Swap every quantizable linear layer (nn.Linear, Transformers' Conv1D) for an EMPTY quantized
    layer on the meta device, in place. Weights are then loaded tensor by tensor (TensorLoader,
    or the layer's load_state_dict). Returns the model."""
    config = as_config(config)
    for name in linear_layers_to_quantize(model, skip_list(model, config, skip_modules)):
        swap_in_empty(model, name, config)
    _mark_quantized(model, config)
    return model


@torch.no_grad()
def quantize_model(
    model: nn.Module, config, skip_modules=None, progress=None, quantize_embeddings: bool = False
) -> nn.Module:
    """Swap the model's linear layers for quantized copies in place (each quantized on its own
    device; bias kept), skipping lm_head, tied output layers and the skip lists. Returns the model.

    quantize_embeddings=True also swaps the nn.Embedding tables for Embedding4bit (the config's
    quant type, no double quantization) or Embedding8bit, under the same skip lists; tables tied
    to another module (e.g. to lm_head) and tables with max_norm stay float. Off by default, as in
    Transformers."""
    config = as_config(config)
    if config.bits is None:
        raise ValueError("the config selects neither load_in_4bit nor load_in_8bit")
    if not isinstance(quantize_embeddings, bool):
        raise TypeError(f"quantize_embeddings must be a bool, got {quantize_embeddings!r}")
    skip = skip_list(model, config, skip_modules)
    if quantize_embeddings:
        # Only the user's skip lists: Transformers names the input embeddings in
        # _tied_weights_keys even when tie_word_embeddings is off, and a real tie is detected
        # by the shared parameter itself.
        user_skip = config.skip_modules + list(skip_modules or [])
        for name in embeddings_to_quantize(model, user_skip):
            _quantize_embedding(model, name, config)
    names = linear_layers_to_quantize(model, skip)
    for name in progress_bar(names, desc="Quantizing", enabled=progress):
        old = model.get_submodule(name)
        in_f, out_f = linear_features(old)
        new = make_quantized_linear(in_f, out_f, old.bias is not None, config, device="meta")
        new.source_cls = type(old)
        new.train(old.training)
        state = {"weight": float_weight_of(old)}
        if old.bias is not None:
            state["bias"] = old.bias.detach()
        new.load_state_dict(state, assign=True)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        if not old.weight.is_meta and not (config.bits == 8 and config.llm_int8_has_fp16_weight):
            new.quantize_()
        set_submodule(model, name, new)
    _mark_quantized(model, _with_user_skips(config, skip_modules))
    return model


def _with_user_skips(config: LowbitConfig, skip_modules) -> LowbitConfig:
    """The config to record on the model: with the skip_modules argument in its skip list, so a
    saved checkpoint reloads with those layers float (not quantized on load)."""
    if not skip_modules:
        return config
    d = config.to_dict()
    d["llm_int8_skip_modules"] = list(dict.fromkeys(config.skip_modules + list(skip_modules)))
    return LowbitConfig.from_dict(d)


def _quantize_embedding(model: nn.Module, name: str, config: LowbitConfig) -> None:
    old = model.get_submodule(name)
    new = make_quantized_embedding(
        old.num_embeddings, old.embedding_dim, config, dtype=old.weight.dtype, device="meta"
    )
    new.padding_idx = old.padding_idx  # lookups only: the padding row quantizes to exact zeros
    new.train(old.training)
    new.load_state_dict({"weight": old.weight.detach()}, assign=True)
    if not old.weight.is_meta:
        new.quantize_()
    set_submodule(model, name, new)
