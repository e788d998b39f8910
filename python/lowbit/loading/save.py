"""save_pretrained: safetensors shards in bitsandbytes' key layout plus our quantization config."""

from __future__ import annotations

import json
import logging
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


def save_pretrained(model: nn.Module, path, max_shard_size="5GB") -> None:
    """Write model.safetensors (sharded with an index past max_shard_size) in bitsandbytes' key
    layout, and config.json carrying {"quant_method": "lowbit", ...} (no load_in_* keys)."""
    from safetensors.torch import save_file

    from lowbit.nn.affine import LinearAffine

    affine = [n for n, m in model.named_modules() if isinstance(m, LinearAffine)]
    if affine:
        raise ValueError(
            f"save_pretrained writes lowbit/bitsandbytes layers only; {affine[0]} (and "
            f"{len(affine) - 1} more) are LinearAffine layers loaded from a "
            f"{getattr(model, 'quantization_method', 'GPTQ/AWQ/compressed-tensors/HQQ')} "
            "checkpoint: keep that checkpoint as the saved form"
        )
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
        save_file(shards[0], str(path / SAFE_SINGLE), metadata=METADATA)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata=METADATA)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total, **METADATA}, "weight_map": weight_map}
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_config(model, path)


def _write_config(model, path: Path) -> None:
    hf_config = getattr(model, "config", None)
    d = {}
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        d = hf_config.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures") and hasattr(model, "config"):
        d["architectures"] = [type(model).__name__]
    qc = _model_quant_config(model)
    if qc is not None:
        d["quantization_config"] = qc.to_dict()
    d = {
        k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
        for k, v in d.items()
    }
    (path / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True, default=str) + "\n")
