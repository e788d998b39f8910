"""State-dict loading for the quantized linear layers, in bitsandbytes' key layout.

4-bit: `weight` (packed), `weight.absmax`, `weight.quant_map`, optional `weight.nested_absmax` and
`weight.nested_quant_map`, and `weight.quant_state.bitsandbytes__{nf4,fp4}` (JSON). 8-bit: int8
`weight`, fp32 `SCB`, `weight_format`. A float `weight` (a plain nn.Linear state dict) is accepted
too and is quantized later, on the first move or forward.

Every inconsistency becomes an entry in `error_msgs` naming the full key, which torch's
load_state_dict raises as one RuntimeError whatever `strict` says.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit import functional as F
from lowbit.nn.parameters import Int8Params, Params4bit

QS_KEY_PREFIX = "weight.quant_state.bitsandbytes__"
AUX_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class _KeyProblem(ValueError):
    """A load problem tied to one state-dict key (the message starts with the key)."""


def _own_keys(state_dict, prefix):
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _target_device(current: torch.Tensor, incoming: torch.Tensor):
    # A module built on the meta device takes the incoming tensor's device (like assign=True);
    # a materialised module keeps its own device, as torch's load_state_dict does.
    return incoming.device if current.is_meta else current.device


def _load_bias(module, own, prefix, strict, missing_keys, error_msgs, assign):
    if module.bias is None:
        return
    b = own.get("bias")
    if b is None:
        if strict:
            missing_keys.append(prefix + "bias")
        return
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (module.out_features,):
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        error_msgs.append(f"{prefix}bias: expected shape ({module.out_features},), got {shape}")
        return
    if module.bias.is_meta or assign:
        module.bias = nn.Parameter(
            b.detach().to(_target_device(module.bias, b)), requires_grad=module.bias.requires_grad
        )
    else:
        with torch.no_grad():
            module.bias.copy_(b)


def _decode_qs_json(key: str, t) -> dict:
    try:
        return F.unpack_tensor_to_dict(t.reshape(-1) if isinstance(t, torch.Tensor) else t)
    except ValueError as e:
        raise _KeyProblem(f"{key}: {e}") from None


def _prequantized_4bit(module, w, aux, prefix) -> Params4bit:
    qs_keys = [k for k in aux if k.startswith("weight.quant_state.")]
    if not qs_keys:
        raise _KeyProblem(
            f"{prefix}{QS_KEY_PREFIX}nf4 (or __fp4): missing; {prefix}weight holds packed 4-bit "
            f"data ({w.dtype}, shape {tuple(w.shape)}) that cannot be decoded without it"
        )
    if len(qs_keys) > 1 or qs_keys[0][len(QS_KEY_PREFIX) :] not in ("nf4", "fp4"):
        raise _KeyProblem(
            f"{prefix}{qs_keys[0]}: expected exactly one of {prefix}{QS_KEY_PREFIX}nf4 / __fp4, "
            f"got {[prefix + k for k in qs_keys]}"
        )
    qs_key = prefix + qs_keys[0]
    meta = _decode_qs_json(qs_key, aux[qs_keys[0]])
    needed = ["absmax", "quant_map"]
    if "nested_offset" in meta or "nested_blocksize" in meta:
        needed += ["nested_absmax", "nested_quant_map"]
    for name in needed:
        if "weight." + name not in aux:
            raise _KeyProblem(f"{prefix}weight.{name}: missing (required by {qs_key})")
    device = _target_device(module.weight, w)
    try:
        qs = F.QuantState.from_dict({k[len("weight.") :]: v for k, v in aux.items()}, device)
    except ValueError as e:
        raise _KeyProblem(f"{qs_key}: {e}") from None
    expected = (module.out_features, module.in_features)
    if tuple(qs.shape) != expected:
        raise _KeyProblem(
            f"{qs_key}: the quant state's shape {list(qs.shape)} does not match this layer's "
            f"weight [out_features, in_features] = {list(expected)}"
        )
    nbytes = (module.out_features * module.in_features + 1) // 2
    if w.numel() * w.element_size() != nbytes:
        raise _KeyProblem(
            f"{prefix}weight: packed 4-bit data must hold {nbytes} bytes, got {tuple(w.shape)} "
            f"{w.dtype} ({w.numel() * w.element_size()} bytes)"
        )
    return Params4bit(
        w.detach().to(device).reshape(-1, 1),
        requires_grad=False,
        quant_state=qs,
        blocksize=qs.blocksize,
        compress_statistics=qs.nested,
        quant_type=qs.quant_type,
        quant_storage=w.dtype,
        bnb_quantized=True,
    )


def _float_weight(module, w, prefix) -> torch.Tensor:
    expected = (module.out_features, module.in_features)
    if tuple(w.shape) != expected:
        raise _KeyProblem(
            f"{prefix}weight: expected a float weight of shape {list(expected)}, got "
            f"{list(w.shape)} {w.dtype}"
        )
    return w.detach().to(_target_device(module.weight, w))


def load_4bit(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    own = _own_keys(state_dict, prefix)
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    for key in ("SCB", "weight_format"):
        if key in own:
            errors.append(
                f"{prefix}{key}: this is LLM.int8() (8-bit) data; load it into "
                f"lowbit.nn.Linear8bitLt, not {type(module).__name__}"
            )
            return
    aux = {k: v for k, v in own.items() if k.startswith("weight.")}
    w = own.get("weight")
    try:
        if w is None:
            if aux:
                raise _KeyProblem(
                    f"{prefix}weight: missing, but {prefix}{next(iter(aux))} is present"
                )
            if strict:
                missing.append(prefix + "weight")
        elif aux or not w.is_floating_point() or w.dim() != 2:
            module.weight = _prequantized_4bit(module, w, aux, prefix)
        else:
            old = module.weight
            module.weight = Params4bit(
                _float_weight(module, w, prefix),
                requires_grad=False,
                blocksize=old.blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
            )
    except _KeyProblem as e:
        errors.append(str(e))
        return
    _load_bias(module, own, prefix, strict, missing, errors, assign)
    if strict:
        known = {"weight", "bias"} | set(aux)
        unexpected.extend(prefix + k for k in own if k not in known)


def load_8bit(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    own = _own_keys(state_dict, prefix)
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    four = sorted(k for k in own if k.startswith("weight."))
    if four:
        errors.append(
            f"{prefix}{four[0]}: this is 4-bit (NF4/FP4) data; load it into lowbit.nn.Linear4bit, "
            f"not {type(module).__name__}"
        )
        return
    w, scb, fmt = own.get("weight"), own.get("SCB"), own.get("weight_format")
    try:
        if fmt is not None:
            value = fmt.item() if isinstance(fmt, torch.Tensor) and fmt.numel() == 1 else fmt
            if value not in (0, "row"):
                raise _KeyProblem(
                    f"{prefix}weight_format: only the row-major format (0) is supported, got {value!r}"
                )
        if w is None:
            if scb is not None:
                raise _KeyProblem(f"{prefix}weight: missing, but {prefix}SCB is present")
            if strict:
                missing.append(prefix + "weight")
        elif w.dtype == torch.int8:
            module.weight = _prequantized_8bit(module, w, scb, prefix)
        elif w.is_floating_point():
            if scb is not None:
                raise _KeyProblem(
                    f"{prefix}SCB: present next to a float {prefix}weight ({w.dtype}); SCB only "
                    "goes with int8 codes"
                )
            has_fp16 = module.weight.has_fp16_weights
            module.weight = Int8Params(
                _float_weight(module, w, prefix),
                requires_grad=has_fp16,
                has_fp16_weights=has_fp16,
            )
        else:
            hint = " (this looks like packed 4-bit data: use Linear4bit)" if w.dim() == 2 else ""
            raise _KeyProblem(
                f"{prefix}weight: expected int8 codes or a float weight of shape "
                f"[{module.out_features}, {module.in_features}], got {list(w.shape)} {w.dtype}{hint}"
            )
    except _KeyProblem as e:
        errors.append(str(e))
        return
    _load_bias(module, own, prefix, strict, missing, errors, assign)
    if strict:
        known = {"weight", "bias", "SCB", "weight_format"}
        unexpected.extend(prefix + k for k in own if k not in known)


def _prequantized_8bit(module, w, scb, prefix) -> Int8Params:
    expected = (module.out_features, module.in_features)
    if tuple(w.shape) != expected:
        raise _KeyProblem(
            f"{prefix}weight: int8 codes must have shape {list(expected)}, got {list(w.shape)}"
        )
    if scb is None:
        raise _KeyProblem(
            f"{prefix}SCB: missing; {prefix}weight holds int8 codes that need their per-row scales"
        )
    if not isinstance(scb, torch.Tensor) or not scb.is_floating_point():
        raise _KeyProblem(
            f"{prefix}SCB: must be a float tensor, got {getattr(scb, 'dtype', scb)!r}"
        )
    if scb.numel() != module.out_features:
        raise _KeyProblem(
            f"{prefix}SCB: must hold one scale per output row ({module.out_features}), got "
            f"{scb.numel()}"
        )
    device = _target_device(module.weight, w)
    return Int8Params(
        w.detach().to(device),
        requires_grad=False,
        has_fp16_weights=False,
        SCB=scb.detach().reshape(-1).to(device=device, dtype=torch.float32),
    )
