"""Load a checkpoint one tensor at a time into a model with quantized layers (TensorLoader)."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from lowbit.nn.affine import LinearAffine
from lowbit.nn.embedding import Embedding4bit, Embedding8bit
from lowbit.nn.modules import Linear4bit, Linear8bitLt
from lowbit.nn.parameters import Int8Params, Params4bit
from lowbit.nn.replace import (
    QUANTIZED_TYPES,
)

_FOUR_BIT = (Linear4bit, Embedding4bit)
_EIGHT_BIT = (Linear8bitLt, Embedding8bit)

logger = logging.getLogger("lowbit")


def _required_4bit(stash: dict[str, torch.Tensor]) -> set[str]:
    need = {"weight", "weight.absmax", "weight.quant_map"}
    qs = [k for k in stash if k.startswith("weight.quant_state.")]
    if not qs:
        return need | {"weight.quant_state.bitsandbytes__<nf4|fp4>"}
    try:
        meta = json.loads(bytes(stash[qs[0]].reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return set()  # let the layer's loader report the bad JSON, naming the key
    if isinstance(meta, dict) and "nested_offset" in meta:
        need |= {"weight.nested_absmax", "weight.nested_quant_map"}
    return need


class TensorLoader:
    """Places checkpoint tensors one at a time into a model prepared by replace_linear_layers.

    - a float `weight` of a quantized layer is quantized on arrival (on the layer's device),
      transposed first when the layer replaced a Conv1D;
    - pre-quantized keys (`weight` + `weight.absmax`... or `weight` + `SCB`) are gathered per layer
      and loaded when the layer's set is complete;
    - any other tensor replaces the matching parameter or buffer, cast to `dtype` if it is float.

    device_for(module_name) gives each tensor's device (default: cpu). Call finish() at the end: it
    reports incomplete quantized layers and returns the checkpoint keys the model has no place for.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, device_for=None):
        self.model = model
        self.dtype = dtype
        self.device_for = device_for or (lambda name: torch.device("cpu"))
        self.modules = dict(model.named_modules())
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.stash: dict[str, dict[str, torch.Tensor]] = {}
        self.unexpected: list[str] = []
        self.fp32_modules: set[str] = set()  # kept in float32 (fp32 CPU offload)
        # Other libraries' checkpoints (lowbit.formats): the reader, and per LinearAffine module
        # (checkpoint key prefix, the local keys the checkpoint holds for it), from a key scan.
        self.reader = None
        self.affine: dict[str, tuple[str, set[str]]] = {}

    # key -> (module name, local key)
    def _resolve(self, key: str) -> tuple[str, str] | None:
        candidates = [key]
        if self.prefix:
            p = self.prefix + "."
            candidates.append(key[len(p) :] if key.startswith(p) else p + key)
        for cand in candidates:
            parts = cand.split(".")
            for i in range(len(parts) - 1, -1, -1):
                mod = ".".join(parts[:i])
                if mod in self.modules:
                    local = ".".join(parts[i:])
                    if self._accepts(self.modules[mod], local):
                        return mod, local
                    break
        return None

    def _accepts(self, module: nn.Module, local: str) -> bool:
        if isinstance(module, LinearAffine):
            return self.reader is not None and self.reader.accepts(local)
        if isinstance(module, QUANTIZED_TYPES):
            return local in ("weight", "bias", "SCB", "weight_format") or local.startswith(
                "weight."
            )
        return local in module._parameters or local in module._buffers

    def _float_dtype(self, mod_name: str, t: torch.Tensor) -> torch.dtype:
        if mod_name in self.fp32_modules or any(
            mod_name.startswith(m + ".") for m in self.fp32_modules
        ):
            return torch.float32
        return self.dtype or t.dtype

    def add(self, key: str, tensor: torch.Tensor) -> None:
        where = self._resolve(key)
        if where is None:
            self.unexpected.append(key)
            return
        mod_name, local = where
        module = self.modules[mod_name]
        device = torch.device(self.device_for(mod_name))
        full = f"{mod_name}.{local}" if mod_name else local
        if isinstance(module, LinearAffine):
            self._add_affine(mod_name, module, local, tensor, device)
        elif isinstance(module, QUANTIZED_TYPES):
            self._add_quantized(mod_name, module, local, tensor, device, full)
        else:
            self._set_plain(module, local, tensor, device, mod_name, full)

    def _set_plain(self, module, local, t, device, mod_name, full):
        old = module._parameters.get(local)
        if old is None:
            old = module._buffers.get(local)
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise ValueError(
                f"{full}: checkpoint shape {list(t.shape)} does not match the model's {list(old.shape)}"
            )
        dtype = self._float_dtype(mod_name, t) if t.is_floating_point() else t.dtype
        # copy=True: never keep a view into the checkpoint's memory map (it would pin the file).
        value = t.to(device=device, dtype=dtype, copy=True)
        if local in module._parameters:
            requires_grad = old.requires_grad if old is not None else value.is_floating_point()
            module._parameters[local] = nn.Parameter(value, requires_grad=requires_grad)
        else:
            module._buffers[local] = value

    def _add_quantized(self, mod_name, module, local, t, device, full):
        stash = self.stash.get(mod_name)
        if local == "bias":
            self._set_plain(module, "bias", t, device, mod_name, full)
            return
        if local == "weight_format" and stash is None and module.is_quantized:
            value = t.item() if t.numel() == 1 else None
            if value != 0:
                raise ValueError(f"{full}: only the row-major format (0) is supported, got {value}")
            return
        # A float [out, in] (Conv1D: [in, out]) weight; packed 4-bit data is [n, 1] or integer.
        is_float_weight = (
            local == "weight"
            and stash is None
            and t.is_floating_point()
            and _float_shape_ok(module, t)
        )
        if is_float_weight:
            self._quantize_float(mod_name, module, t, device, full)
            return
        stash = self.stash.setdefault(mod_name, {})
        stash[local] = t.to(device=device, copy=True)
        if self._complete(module, stash):
            self._flush(mod_name, module)

    def _quantize_float(self, mod_name, module, t, device, full):
        if is_conv1d_source(module):
            t = t.t()
        w = t.to(device=device, dtype=self._float_dtype(mod_name, t), copy=True).contiguous()
        if isinstance(module, _FOUR_BIT):
            old = module.weight
            module.weight = Params4bit(
                w,
                requires_grad=False,
                blocksize=old.blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
            )
        else:
            has_fp16 = module.weight.has_fp16_weights
            module.weight = Int8Params(w, requires_grad=has_fp16, has_fp16_weights=has_fp16)
        if not (isinstance(module, _EIGHT_BIT) and module.weight.has_fp16_weights):
            module.quantize_()

    @staticmethod
    def _complete(module, stash) -> bool:
        if isinstance(module, _EIGHT_BIT):
            return "weight" in stash and "SCB" in stash
        need = _required_4bit(stash)
        return bool(need) and need <= set(stash)

    def _flush(self, mod_name: str, module) -> None:
        stash = self.stash.pop(mod_name)
        prefix = f"{mod_name}." if mod_name else ""
        errors: list[str] = []
        module._load_from_state_dict(
            {prefix + k: v for k, v in stash.items()}, prefix, {}, False, [], [], errors
        )
        if errors:
            raise ValueError("; ".join(errors))

    def _add_affine(self, mod_name, module, local, t, device):
        # Gather every key the checkpoint holds for the layer (known from the key scan), then
        # convert them at once: optional keys (g_idx, bias, zero points) may come last.
        stash = self.stash.setdefault(mod_name, {})
        stash[local] = t.to(device=device, copy=True)
        prefix, expected = self.affine[mod_name]
        if expected <= set(stash):
            self._flush_affine(mod_name, module)

    def _flush_affine(self, mod_name, module) -> None:
        stash = self.stash.pop(mod_name)
        prefix, _ = self.affine[mod_name]
        missing = self.reader.missing(prefix, stash)
        if missing:
            raise ValueError(
                f"{prefix}: incomplete {self.reader.method} weight, missing "
                + ", ".join(f"{prefix}.{k}" for k in missing)
            )
        w = self.reader.convert(prefix, stash, module.in_features, module.out_features)
        module.set_weight(w.packed, w.scales, w.zeros, w.bits, w.group_size, w.perm)
        if w.bias is not None:
            dtype = self._float_dtype(mod_name, w.bias)
            module.bias = nn.Parameter(w.bias.to(dtype=dtype, copy=True), requires_grad=False)

    def finish(self) -> list[str]:
        """Load (and so validate) every incomplete layer; returns the unexpected keys."""
        for mod_name in list(self.stash):
            module = self.modules[mod_name]
            if isinstance(module, LinearAffine):
                self._flush_affine(mod_name, module)
                continue
            need = (
                {"weight", "SCB"}
                if isinstance(module, _EIGHT_BIT)
                else _required_4bit(self.stash[mod_name])
            )
            missing = sorted(need - set(self.stash[mod_name]))
            if missing:
                raise ValueError(
                    f"{mod_name}: incomplete quantized weight, missing "
                    + ", ".join(f"{mod_name}.{k}" for k in missing)
                )
            self._flush(mod_name, module)
        return self.unexpected


def is_conv1d_source(module: nn.Module) -> bool:
    src = getattr(module, "source_cls", None)
    return src is not None and src.__name__ == "Conv1D"


def _float_shape_ok(module, t) -> bool:
    shape = (
        (module.in_features, module.out_features)
        if is_conv1d_source(module)
        else (
            module.out_features,
            module.in_features,
        )
    )
    return tuple(t.shape) == shape


def load_tensor(model: nn.Module, key: str, tensor: torch.Tensor, dtype=None, device="cpu") -> None:
    """Place one checkpoint tensor (float weight: quantized on arrival). For pre-quantized
    checkpoints, whose layers need several keys, keep one TensorLoader for the whole load."""
    loader = TensorLoader(model, dtype=dtype, device_for=lambda name: device)
    loader.add(key, tensor)
    loader.finish()
