"""Readers for other libraries' quantized checkpoints: GPTQ, AWQ, compressed-tensors, HQQ.

Each reader converts one linear layer's tensors, as its library writes them, once at load time to
lowbit's affine format (lowbit.formats._common: packed codes, fp32 scales and zeros per group
along K, optional input permutation), which LinearAffine runs on lowbit's kernels. None of these
libraries is imported: the layouts are read from their published sources (named in each module).

    reader = reader_for(config_json["quantization_config"])   # validates the config
    reader.is_quantized(local_keys)                            # does a layer hold this format?
    reader.missing(prefix, stash)                                    # required keys not yet seen
    weight = reader.convert(prefix, stash, in_features, out_features)   # -> AffineWeight
"""

from __future__ import annotations

import abc

import torch

from lowbit.formats._common import AffineWeight, FormatError

# quant_method (config.json) -> reader module name
METHODS = {
    "gptq": "gptq",
    "awq": "awq",
    "compressed-tensors": "compressed_tensors",
    "hqq": "hqq",
}

# quant_method -> what lowbit reads of it (for `lowbit env`, errors and the README)
SUPPORTED = {
    "gptq": "checkpoint_format gptq (v1) or gptq_v2; bits 4, 8; any group size; desc_act (g_idx)",
    "awq": "version gemm; 4-bit; zero_point=true; any group size",
    "compressed-tensors": "pack-quantized int4/int8, int-/naive-quantized int8 (W8A8 weights); "
    "group, channel, tensor, block strategies; symmetric or not",
    "hqq": "Transformers' HQQ layout; nbits 1, 2, 3, 4, 5, 6, 8; axis=1; any group size",
}


class Reader(abc.ABC):
    """Base of the per-format readers. Subclasses set `method`, `markers` (local keys of which one
    marks a quantized layer) and `known` (every local key the format may store per layer)."""

    method = ""
    markers: tuple[str, ...] = ()
    known: frozenset[str] = frozenset()

    def __init__(self, qconfig: dict):
        self.qconfig = qconfig

    def is_quantized(self, local_keys) -> bool:
        return any(m in local_keys for m in self.markers)

    def accepts(self, local: str) -> bool:
        return local in self.known

    @abc.abstractmethod
    def missing(self, prefix, stash: dict[str, torch.Tensor]) -> list[str]: ...

    @abc.abstractmethod
    def convert(self, prefix: str, stash, in_features: int, out_features: int) -> AffineWeight: ...

    @abc.abstractmethod
    def infer_shape(self, stash) -> tuple[int, int]:
        """(out_features, in_features) from a layer's tensors alone (for `lowbit inspect`)."""
        ...

    def summary(self) -> str:
        """One line for messages and `lowbit inspect`: the method and its main settings."""
        return self.method


def quant_method(qconfig) -> str | None:
    if qconfig is None:
        return None
    qd = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    method = qd.get("quant_method")
    method = getattr(method, "value", method)
    return str(method).lower() if method is not None else None


def is_affine_method(qconfig) -> bool:
    return quant_method(qconfig) in METHODS


def reader_for(qconfig) -> Reader:
    """The reader for a config.json quantization_config (dict or a Transformers config object).
    FormatError (a ValueError) names the field for an unsupported or malformed config."""
    import importlib

    qd = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    method = quant_method(qd)
    if method not in METHODS:
        raise FormatError(
            f"quantization_config.quant_method {method!r} is not an affine format lowbit reads; "
            f"supported: {sorted(METHODS)}"
        )
    module = importlib.import_module(f"lowbit.formats.{METHODS[method]}")
    return module.READER(qd)


__all__ = [
    "AffineWeight",
    "FormatError",
    "METHODS",
    "Reader",
    "is_affine_method",
    "quant_method",
    "reader_for",
]
