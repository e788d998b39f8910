"""save_pretrained: safetensors shards in bitsandbytes' key layout plus our quantization config."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lowbit.config import LowbitConfig
from lowbit.loading.files import METADATA, SAFE_INDEX, SAFE_SINGLE
from lowbit.nn.modules import Linear4bit
from lowbit.nn.replace import (
    QUANTIZED_LINEAR_TYPES,
)

logger = logging.getLogger("lowbit")


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _model_quant_config(model) -> LowbitConfig | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(qc, LowbitConfig):
        return qc
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEAR_TYPES)]
    if not layers:
        return None
    first = layers[0]
    if isinstance(first, Linear4bit):
        return LowbitConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=first.weight.quant_type,
            bnb_4bit_use_double_quant=bool(first.weight.compress_statistics),
            bnb_4bit_compute_dtype=first.compute_dtype,
        )
    return LowbitConfig(load_in_8bit=True, llm_int8_threshold=first.threshold)


def _dedupe_shared(
    state: dict[str, torch.Tensor], tied_first: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Drop all but one name of tensors sharing memory (tied weights), as Transformers does;
    the loader ties them again. Names in `tied_first` (the tied copies) are dropped first."""
    tied = set(tied_first)
    seen: dict[tuple, str] = {}
    order = sorted(state, key=lambda k: k in tied)
    out = {}
    for k in order:
        t = state[k]
        sig = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.dtype,
        )
        if t.numel() and sig in seen:
            continue
        seen[sig] = k
        out[k] = t
    return {k: out[k] for k in state if k in out}


FORMATS = ("lowbit", "bitsandbytes")


def save_pretrained(model: nn.Module, path, max_shard_size="5GB", format: str = "lowbit") -> None:
    """Write model.safetensors (sharded with an index past max_shard_size) in bitsandbytes' key
    layout, and config.json.

    format="lowbit" (default): config.json carries {"quant_method": "lowbit", ...} (no load_in_*
    keys), so the checkpoint loads through lowbit (lowbit.from_pretrained, or Transformers with
    lowbit imported). format="bitsandbytes": config.json carries bitsandbytes' own
    quantization_config (quant_method "bitsandbytes", load_in_4bit/load_in_8bit, the layers left
    in float named in llm_int8_skip_modules), so Transformers + bitsandbytes load it without
    lowbit; lowbit reads it too. The tensors are the same in both formats.
    """
    from safetensors.torch import save_file

    refuse_affine(model)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    bnb_config = _bnb_quant_config(model) if format == "bitsandbytes" else None
    metadata = {"format": "pt"} if format == "bitsandbytes" else METADATA
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    state = _dedupe_shared(model.state_dict(), list(tied))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / SAFE_INDEX]:
        if old.exists():
            old.unlink()  # stale shards from an earlier save would shadow the new index
    if len(shards) == 1:
        save_file(shards[0], str(path / SAFE_SINGLE), metadata=metadata)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_config(model, path, bnb_config)


def refuse_affine(model: nn.Module) -> None:
    """ValueError when the model holds LinearAffine layers (loaded from a GPTQ, AWQ,
    compressed-tensors or HQQ checkpoint): neither lowbit's format nor Transformers' own
    save_pretrained writes them in a form any loader reads back."""
    from lowbit.nn.affine import LinearAffine

    affine = [n for n, m in model.named_modules() if isinstance(m, LinearAffine)]
    if affine:
        raise ValueError(
            f"save_pretrained writes lowbit/bitsandbytes layers only; {affine[0]} (and "
            f"{len(affine) - 1} more) are LinearAffine layers loaded from a "
            f"{getattr(model, 'quantization_method', 'GPTQ/AWQ/compressed-tensors/HQQ')} "
            "checkpoint, and lowbit cannot write that format back. Keep the original checkpoint "
            "(and, after LoRA fine-tuning, save the adapter with PEFT), or merge into dense "
            "layers with lowbit.integrations.peft.merge_and_unload(model, requantize=False) and "
            "save a float model"
        )


def _write_config(model, path: Path, quant_config: dict | None = None) -> None:
    hf_config = getattr(model, "config", None)
    d = {}
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures") and hasattr(model, "config"):
        d["architectures"] = [type(model).__name__]
    if quant_config is not None:
        d["quantization_config"] = quant_config
    else:
        qc = _model_quant_config(model)
        if qc is not None:
            d["quantization_config"] = qc.to_dict()
    d = {
        k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
        for k, v in d.items()
    }
    (path / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")


# ---- format="bitsandbytes" -----------------------------------------------------------------------


def _float_dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _bnb_skip_entry(name: str, quantized: list[str]) -> str:
    """A llm_int8_skip_modules entry for `name` that Transformers' matching rule (regex match at
    the start, with or without a following dot, or a plain suffix) applies to no quantized layer:
    the plain name where that holds, else the name as an anchored literal regex."""
    if not any(
        re.match(f"{name}\\.", q) or re.match(name, q) or q.endswith(name) for q in quantized
    ):
        return name
    return re.escape(name) + "$"


def _bnb_quant_config(model: nn.Module) -> dict:
    """bitsandbytes' quantization_config (BitsAndBytesConfig.to_dict()) for this model, or a
    ValueError naming what bitsandbytes' loader could not read back."""
    from lowbit.nn.replace import QUANTIZED_EMBEDDING_TYPES, is_quantizable_linear, name_matches

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEAR_TYPES)}
    if not layers:
        raise ValueError(
            "format='bitsandbytes': the model has no lowbit quantized linear layers; quantize it "
            "first (lowbit.quantize_model) or save it with Transformers"
        )
    embeddings = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_EMBEDDING_TYPES)]
    if embeddings:
        raise ValueError(
            f"format='bitsandbytes': bitsandbytes' loader keeps embeddings in float and cannot "
            f"read the quantized embeddings {embeddings}; quantize the model without "
            "quantize_embeddings=True, or save it in lowbit's format"
        )
    kinds = {isinstance(m, Linear4bit) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(
            "format='bitsandbytes': the model mixes 4-bit and 8-bit layers; a bitsandbytes "
            "quantization_config holds one of them"
        )
    unquantized = [n for n, m in model.named_modules() if n and is_quantizable_linear(m)]
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    clash = [n for n in layers if keep_fp32 and name_matches(n, keep_fp32)]
    if clash:
        raise ValueError(
            f"format='bitsandbytes': {clash} are quantized but the model keeps {keep_fp32} in "
            "float32, so bitsandbytes' loader would not quantize them; skip them when quantizing"
        )
    first = next(iter(layers.values()))
    four = isinstance(first, Linear4bit)
    quantized = list(layers)
    skip = [_bnb_skip_entry(n, quantized) for n in unquantized]
    config = {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_quant_storage": "uint8",
    }
    if four:
        w = first.weight
        # lowbit's compute_dtype None means "the input's dtype"; bitsandbytes' None means float32,
        # so write the model's own float dtype.
        compute = first.compute_dtype or _float_dtype_of(model)
        config.update(
            bnb_4bit_compute_dtype=str(compute).removeprefix("torch."),
            bnb_4bit_quant_type=w.quant_type,
            bnb_4bit_use_double_quant=bool(w.compress_statistics),
            bnb_4bit_quant_storage=str(w.quant_storage).removeprefix("torch."),
        )
    else:
        config["llm_int8_threshold"] = float(first.threshold)
    return config
