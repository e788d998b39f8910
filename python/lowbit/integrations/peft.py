"""PEFT support: LoRA on lowbit's quantized layers, and merging it back.

Linear4bit and Linear8bitLt subclass nn.Linear, so PEFT's LoRA wraps them like any linear layer
and gradients reach the adapters through the ops' autograd formulas. Merging needs this module:
PEFT merges by adding the LoRA delta to `base_layer.weight.data`, which for a quantized layer is
packed integer codes. merge_and_unload() here decodes the weight, adds the delta in float32 and,
by default, quantizes the sum again in the layer's own format (as PEFT does for bitsandbytes'
layers).

LinearAffine (GPTQ / AWQ / compressed-tensors / HQQ checkpoints) is not an nn.Linear: it has no
float `weight` at all, only codes, scales, zeros and an optional input permutation, and PEFT's
default dispatcher refuses it ("Target module ... is not supported"). LoraLinearAffine below is its
LoRA layer (the role PEFT's GPTQLoraLinear plays for GPTQModel's QuantLinear): the base product
runs on torch.ops.lowbit.gemm_affine, the adapters in their own (fp32) dtype beside it, and
merge()/unmerge() decode, add and re-quantize instead of writing into a float weight. `import
lowbit` makes PEFT's LoRA dispatcher pick it (see install()), so the usual

    model = lowbit.from_pretrained("path/to/Llama-GPTQ")
    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    ...  # train
    merged = lowbit.integrations.peft.merge_and_unload(model)

works unchanged (PEFT's own model.merge_and_unload() runs the same layer merge, but PEFT refuses
it for any model whose quantization_method is "gptq", a guard meant for AutoGPTQ's kernels). Plain LoRA only: DoRA and the other variants need a float base weight on every
forward, and PiSSA/OLoRA/LoftQ/... initialisations rewrite the base weight; both are refused with
a ValueError when the adapter is created.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from lowbit import nn as lnn
from lowbit.nn.affine import LinearAffine

__all__ = ["LoraLinearAffine", "dispatch_affine", "install", "merge_and_unload"]

_QUANTIZED = (lnn.Linear4bit, lnn.Linear8bitLt)
# LoRA initialisations that only touch the adapters; the others (pissa, olora, loftq, corda,
# orthogonal, lora_ga, mica, eva) read or rewrite the float base weight or its inputs' statistics
# through it, which a LinearAffine layer does not hold.
_PLAIN_INITS = (True, False, "gaussian")


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


# ---- LoRA on LinearAffine -----------------------------------------------------------------------


class _AffineWeight:
    """The codes of a LinearAffine layer as they were before any merge (references, not copies:
    set_weight installs new tensors and leaves these alone), to decode or to put back exactly."""

    def __init__(self, layer: LinearAffine):
        self.tensors = (layer.packed, layer.scales, layer.zeros)
        self.bits, self.group_size, self.perm = layer.bits, layer.group_size, layer.perm
        self.bias = None if layer.bias is None else layer.bias.detach().clone()
        self.shape = (layer.in_features, layer.out_features)

    def restore(self, layer: LinearAffine) -> None:
        layer.set_weight(*self.tensors, self.bits, self.group_size, self.perm)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias)

    def dequantize(self) -> torch.Tensor:
        in_f, out_f = self.shape
        view = LinearAffine(in_f, out_f, False, self.bits, self.group_size, device="meta")
        view.set_weight(*self.tensors, self.bits, self.group_size, self.perm)
        return view.dequantize(torch.float32)


def quantize_into(layer: LinearAffine, weight: torch.Tensor) -> None:
    """Quantize the float weight [out_features, in_features] (original column order) into
    `layer` in place: round to nearest, asymmetric min/max (ops.quantize_affine), the layer's bits
    and group size, and the layer's input permutation kept.

    A GPTQ act-order layer (perm set) stores its columns permuted, and its groups are runs of
    stored columns: quantizing the merged weight in that same stored order keeps every group the
    checkpoint had, so a merged weight close to the original lands on (nearly) the original grid.
    Measured on the act-order layers of tests/test_peft_affine.py (4-bit, group 32, relative
    Frobenius error of the re-quantized merged weight): delta 0 -> 0.000-0.006 with the
    permutation, 0.071 without; delta 1% of the weight -> 0.011 vs 0.071; delta 10% -> 0.060 vs
    0.077. Dropping the permutation would save the per-call gather of the activations but costs a
    whole fresh quantization error, so the permutation stays."""
    N, K = layer.out_features, layer.in_features
    if weight.shape != (N, K):
        raise ValueError(f"weight must be [{N}, {K}], got {list(weight.shape)}")
    stored = weight.detach().float()
    if layer.perm is not None:
        stored = stored.index_select(1, layer.perm)  # stored column j = original column perm[j]
    packed, scales, zeros = torch.ops.lowbit.quantize_affine(
        stored.contiguous(), layer.bits, layer.group_size, False
    )
    layer.set_weight(packed, scales, zeros, layer.bits, layer.group_size, perm=layer.perm)


class LoraLinearAffine(nn.Module, LoraLayer):
    """PEFT LoRA layer around a LinearAffine base: y = base(x) + sum over active adapters of
    lora_B(lora_A(dropout(x))) * scaling, the adapters in their own dtype (fp32 by default; the
    input is cast to it and the sum cast back to the base output's dtype, as in PEFT's layers).

    merge() decodes the weight as it was before any merge, adds every merged adapter's delta in
    fp32 and re-quantizes once (quantize_into); unmerge() puts the original codes back exactly
    (they are kept while merged, one extra quantized copy of the layer)."""

    def __init__(
        self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs
    ):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._unmerged: _AffineWeight | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            variant = super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            raise ValueError(
                "LoRA on LinearAffine layers (GPTQ/AWQ/compressed-tensors/HQQ weights) is plain "
                f"LoRA only; the config asks for a variant: {e} (set use_dora=False and leave the "
                "other variant options unset)"
            ) from None
        return variant

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        init = config.init_lora_weights
        if not any(init is p or (isinstance(p, str) and init == p) for p in _PLAIN_INITS):
            raise ValueError(
                f"init_lora_weights={init!r} reads or rewrites the base weight, which a "
                "LinearAffine layer holds only as quantized codes; use True, False or "
                "'gaussian'"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A in fp32, [out_features, in_features]."""
        A = self.lora_A[adapter].weight.float()
        B = self.lora_B[adapter].weight.float()
        return (B @ A) * self.scaling[adapter]

    def merged_weight(self, adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 weight, bias or None): the layer's weight before any merge, decoded, plus the
        deltas of the already merged adapters and of `adapter_names`; the bias likewise."""
        base = self.get_base_layer()
        original = self._unmerged or _AffineWeight(base)
        weight = original.dequantize()
        bias = None if original.bias is None else original.bias.float()
        for adapter in dict.fromkeys([*self.merged_adapters, *adapter_names]):
            if adapter not in self.lora_A:
                continue
            _check_plain_lora(self, adapter)
            weight += self.get_delta_weight(adapter).to(weight.device)
            if self.lora_bias[adapter]:
                if bias is None:
                    raise RuntimeError(
                        f"adapter {adapter!r} has lora_bias=True but the base layer has no bias"
                    )
                b = self.lora_B[adapter].bias.detach().float() * self.scaling[adapter]
                bias = bias + b.to(bias.device)
        return weight, bias

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        weight, bias = self.merged_weight(names)
        if safe_merge and not (
            torch.isfinite(weight).all() and (bias is None or bias.isfinite().all())
        ):
            raise ValueError(f"NaNs detected in the merged weights; adapters {names} seem broken")
        if self._unmerged is None:
            self._unmerged = _AffineWeight(base)
        quantize_into(base, weight)
        if bias is not None:
            base.bias.data.copy_(bias)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._unmerged.restore(self.get_base_layer())
        self._unmerged = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs.pop("alora_offsets", None)  # an aLoRA argument; aLoRA is refused above
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            A, B = self.lora_A[adapter], self.lora_B[adapter]
            x = self._cast_input_dtype(x, A.weight.dtype)
            result = result + B(A(self.lora_dropout[adapter](x))) * self.scaling[adapter]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_affine(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module | None:
    """A LoraLinearAffine for a LinearAffine target, None for anything else (PEFT's own
    dispatchers then decide). A class the user mapped with LoraConfig._register_custom_module
    keeps precedence, and target_parameters (LoRA on a bare parameter) is left to PEFT."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, LinearAffine) or kwargs.get("parameter_name") is not None:
        return None
    custom = getattr(config, "_custom_modules", None) or {}
    if any(isinstance(base, cls) for cls in custom):
        return None
    return LoraLinearAffine(target, adapter_name, config=config, **kwargs)


def _all_linear_with_affine(inner):
    """PEFT's target_modules="all-linear" resolver (tuners_utils._maybe_include_all_linear_layers)
    collects nn.Linear / Conv1D modules, so on a GPTQ/AWQ/... model it finds only lm_head, which
    it then excludes. The wrapped resolver adds the LinearAffine layers for a LoraConfig."""

    def resolve(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(target, str) and target.lower() == "all-linear"
        peft_config = inner(peft_config, model)
        if all_linear and isinstance(peft_config, LoraConfig):
            affine = {n for n, m in model.named_modules() if isinstance(m, LinearAffine)}
            peft_config.target_modules = set(peft_config.target_modules) | affine
        return peft_config

    resolve._lowbit_affine = True
    resolve.__wrapped__ = inner
    resolve.__doc__ = inner.__doc__
    return resolve


def install() -> None:
    """Make PEFT's LoRA wrap LinearAffine layers (idempotent): dispatch_affine goes in front of
    the dispatchers PEFT builds inside LoraModel._create_new_module (PEFT offers no registry to add
    to; its custom-module hook is per LoraConfig, which the user writes), and target_modules=
    "all-linear" includes LinearAffine layers. `import lowbit` calls this as soon as
    peft.tuners.lora.model has been imported."""
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    current = LoraModel.__dict__["_create_new_module"]
    inner = current.__func__ if isinstance(current, staticmethod) else current
    if not getattr(inner, "_lowbit_affine", False):

        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            new = dispatch_affine(target, adapter_name, lora_config, **kwargs)
            if new is None:
                new = inner(lora_config, adapter_name, target, **kwargs)
            return new

        _create_new_module._lowbit_affine = True
        _create_new_module.__wrapped__ = inner
        _create_new_module.__doc__ = inner.__doc__
        LoraModel._create_new_module = staticmethod(_create_new_module)

    resolver = getattr(tuners_utils, "_maybe_include_all_linear_layers", None)
    if resolver is not None and not getattr(resolver, "_lowbit_affine", False):
        tuners_utils._maybe_include_all_linear_layers = _all_linear_with_affine(resolver)


install()


# ---- merging ------------------------------------------------------------------------------------


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first float parameter outside the adapters (fp32 if none)."""
    for name, p in model.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            return p.dtype
    return torch.float32


def _forget_affine_checkpoint(model: nn.Module) -> None:
    """A model whose LinearAffine layers all became float nn.Linear layers is a float model: drop
    the GPTQ/AWQ/... quantization_config and flags, or Transformers' save_pretrained would write
    float weights under a config that tells every loader to read packed codes."""
    if any(isinstance(m, (LinearAffine, *_QUANTIZED)) for m in model.modules()):
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    for attr in ("quantization_method", "lowbit_format"):
        if attr in model.__dict__:
            delattr(model, attr)


@torch.no_grad()
def merge_and_unload(peft_model, requantize: bool = True, adapter_names=None) -> nn.Module:
    """Merge the active (or the named) LoRA adapters into their base layers and return the base
    model without LoRA modules, like PeftModel.merge_and_unload.

    requantize=True: merged lowbit layers are quantized again in their original format (the
    model keeps its size; the merged weight carries one more rounding). LinearAffine layers keep
    their bits, group size and input permutation (GPTQ act-order) and are rounded to nearest,
    asymmetric min/max, in their groups (see quantize_into). requantize=False: they
    become float nn.Linear layers in the dtype the quantized weight was made from (LinearAffine:
    the model's float dtype), holding exactly decode(W) + the LoRA deltas, and a model left with
    no quantized layer loses its quantization_config (it saves as a plain float model).
    """
    if not isinstance(requantize, bool):
        raise TypeError(f"requantize must be a bool, got {requantize!r}")
    affine_model = False
    dense_dtype = _float_dtype(peft_model)
    for layer in [m for m in peft_model.modules() if isinstance(m, LoraLayer)]:
        base = layer.get_base_layer()
        if isinstance(layer, LoraLinearAffine):
            affine_model = True
            names = layer.active_adapters if adapter_names is None else adapter_names
            names = [a for a in names if a in layer.lora_A]
            if requantize:
                layer.merge(adapter_names=names)
            else:
                weight, bias = layer.merged_weight(names)
                if layer._unmerged is not None:  # merged earlier: the layer's own bias moved
                    layer._unmerged.restore(base)
                linear = _float_linear(base, weight.to(dense_dtype))
                if bias is not None:
                    linear.bias.data = bias.to(dense_dtype)
                layer.base_layer = linear
                layer._unmerged = None
                layer.merged_adapters.clear()
            continue
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
    model = peft_model.unload()
    if affine_model and not requantize:
        _forget_affine_checkpoint(model)
    return model
