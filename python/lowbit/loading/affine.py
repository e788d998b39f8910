"""Loading GPTQ / AWQ / compressed-tensors / HQQ checkpoints into LinearAffine layers.

from_pretrained sends a checkpoint here when its config.json's quantization_config.quant_method is
one of lowbit.formats.METHODS. The model is built on the meta device; the safetensors headers are
scanned (no tensor data read) to find which linear layers hold quantized tensors, and exactly those
become empty LinearAffine layers; then the tensors are streamed one at a time, each layer converted
by the format's reader as soon as all of its keys have arrived. None of the formats' libraries is
imported, and only safetensors files are read (no pickle).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from lowbit.formats import Reader
from lowbit.loading.files import checkpoint_files
from lowbit.nn.affine import LinearAffine
from lowbit.nn.replace import is_conv1d, linear_features, set_submodule

logger = logging.getLogger("lowbit")


def checkpoint_keys(files: list[Path]) -> list[str]:
    """Every tensor name of the safetensors files (headers only)."""
    from safetensors import safe_open

    keys = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys += list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read {file}: {e}") from None
    return keys


def _module_for(prefix: str, modules: dict[str, nn.Module], base: str) -> str | None:
    candidates = [prefix]
    if base:
        p = base + "."
        candidates.append(prefix[len(p) :] if prefix.startswith(p) else p + prefix)
    for cand in candidates:
        if cand in modules:
            return cand
    return None


def quantized_layers(model: nn.Module, keys: list[str], reader: Reader) -> dict[str, tuple]:
    """{model module name: (checkpoint prefix, the local keys held for it)} for every layer the
    checkpoint stores in the reader's format. A quantized layer the model has no linear layer for
    is an error (a wrong architecture or a renamed module), not silently dropped."""
    by_prefix: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, local = key.rpartition(".")
        by_prefix.setdefault(prefix, set()).add(local)
    modules = dict(model.named_modules())
    base = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for prefix, locals_ in sorted(by_prefix.items()):
        if not reader.is_quantized(locals_):
            continue
        name = _module_for(prefix, modules, base)
        if name is None:
            raise ValueError(
                f"{prefix}: the checkpoint holds {reader.method} weights for it, but the model "
                f"({type(model).__name__}) has no module of that name"
            )
        mod = modules[name]
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            raise ValueError(
                f"{prefix}: {reader.method} weights for a {type(mod).__name__}; lowbit reads "
                "quantized linear layers only"
            )
        found[name] = (prefix, {k for k in locals_ if reader.accepts(k)})
    return found


def replace_with_affine(model: nn.Module, layers: dict[str, tuple]) -> None:
    """Swap each listed linear layer for an empty LinearAffine on the meta device."""
    for name in layers:
        old = model.get_submodule(name)
        in_f, out_f = linear_features(old)
        # A placeholder group size (any divisor of K): the converted weight sets the real one.
        new = LinearAffine(
            in_f, out_f, bias=old.bias is not None, group_size=math.gcd(128, in_f), device="meta"
        )
        new.requires_grad_(False)
        new.train(old.training)
        set_submodule(model, name, new)


def check_safetensors_only(path: Path, method: str) -> list[Path]:
    """The safetensors files of the checkpoint (pickle-only directories raise, naming the file)."""
    files = checkpoint_files(path, allow_pickle=False)
    if any(f.suffix != ".safetensors" for f in files):
        raise ValueError(f"{method} checkpoints are read from safetensors files only")
    return files


def mark_affine(model: nn.Module, reader: Reader) -> None:
    model.quantization_method = reader.method
    model.lowbit_format = reader.summary()
    # PEFT's prepare_model_for_kbit_training looks for these flags.
    bits = {m.bits for m in model.modules() if isinstance(m, LinearAffine)}
    model.is_loaded_in_4bit = bits == {4}
    model.is_loaded_in_8bit = bits == {8}
    from lowbit.loading.model import attach_save_pretrained

    attach_save_pretrained(model)  # model.save_pretrained refuses (see save.refuse_affine)


def affine_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the LinearAffine layers keep for their weights: codes, scales, zeros, perm;
    bytes the same weights take in bf16)."""
    kept = dense = 0
    for m in model.modules():
        if isinstance(m, LinearAffine):
            for t in (m.packed, m.scales, m.zeros, m.perm):
                if t is not None:
                    kept += t.numel() * t.element_size()
            dense += m.in_features * m.out_features * torch.finfo(torch.bfloat16).bits // 8
    return kept, dense
