"""PEFT support: merging LoRA adapters into lowbit's quantized layers.

Training needs nothing from here: lowbit's layers subclass nn.Linear, so PEFT's LoRA wraps them
like any linear layer and gradients reach the adapters through the ops' autograd formulas. Merging
does: PEFT merges by adding the LoRA delta to `base_layer.weight.data`, which for a quantized
layer is packed integer codes. merge_and_unload() here decodes the weight, adds the delta in
float32 and, by default, quantizes the sum again in the layer's own format (as PEFT does for
bitsandbytes' layers).

    model = get_peft_model(quantized_model, LoraConfig(...))
    ...  # train
    merged = lowbit.integrations.peft.merge_and_unload(model)
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit import nn as lnn

__all__ = ["merge_and_unload"]

_QUANTIZED = (lnn.Linear4bit, lnn.Linear8bitLt)


def _float_linear(base, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(
        base.in_features, base.out_features, bias=base.bias is not None, device="meta"
    )
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().to(weight.dtype), requires_grad=False)
    return linear


def _requantized(base, weight: torch.Tensor) -> nn.Module:
    """A layer of `base`'s class and settings holding `weight` (quantized on its device)."""
    linear = _float_linear(base, weight)
    if isinstance(base, lnn.Linear4bit):
        w = base.weight
        new = lnn.Linear4bit.from_linear(
            linear,
            compute_dtype=base.compute_dtype,
            compress_statistics=w.compress_statistics,
            quant_type=w.quant_type,
            quant_storage=w.quant_storage,
        )
    else:
        new = lnn.Linear8bitLt.from_linear(linear, has_fp16_weights=False, threshold=base.threshold)
    if hasattr(base, "source_cls"):
        new.source_cls = base.source_cls
    return new.requires_grad_(False)


def _check_plain_lora(layer, adapter: str) -> None:
    use_dora = getattr(layer, "use_dora", {}).get(adapter, False)
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if use_dora or variant is not None:
        raise ValueError(
            f"adapter {adapter!r} is not plain LoRA (DoRA or another variant); lowbit can only "
            "merge plain LoRA into quantized layers"
        )


@torch.no_grad()
def merge_and_unload(peft_model, requantize: bool = True, adapter_names=None) -> nn.Module:
    """Merge the active (or the named) LoRA adapters into their base layers and return the base
    model without LoRA modules, like PeftModel.merge_and_unload.

    requantize=True: merged lowbit layers are quantized again in their original format (the
    model keeps its size; the merged weight carries one more rounding). requantize=False: they
    become float nn.Linear layers in the dtype the quantized weight was made from.
    """
    from peft.tuners.lora import LoraLayer

    for layer in [m for m in peft_model.modules() if isinstance(m, LoraLayer)]:
        base = layer.get_base_layer()
        if not isinstance(base, _QUANTIZED):
            if adapter_names is None:
                layer.merge()
            else:
                layer.merge(adapter_names=adapter_names)
            continue
        names = layer.active_adapters if adapter_names is None else adapter_names
        names = [a for a in names if a in layer.lora_A]
        dtype = base.quant_state.dtype if isinstance(base, lnn.Linear4bit) else torch.float32
        weight = base.dequantize(torch.float32)
        for adapter in names:
            _check_plain_lora(layer, adapter)
            weight += layer.get_delta_weight(adapter).to(weight.device, torch.float32)
        weight = weight.to(dtype)
        layer.base_layer = _requantized(base, weight) if requantize else _float_linear(base, weight)
    return peft_model.unload()
