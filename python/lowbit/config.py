"""LowbitConfig: the quantization settings, with every BitsAndBytesConfig field and default.

Serialised form (config.json's "quantization_config"):

    {"quant_method": "lowbit", "format_version": 1, "bits": 4, "bnb_4bit_quant_type": "nf4", ...}

It never carries `load_in_4bit` / `load_in_8bit`: Transformers sends any quantization config with
those keys to bitsandbytes. `from_dict` reads both our form and bitsandbytes' (load_in_* keys).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch


class _Base:
    """What Transformers needs of a quantization config beyond our own methods. Deliberately not
    transformers' QuantizationConfigMixin: importing Transformers would double `import lowbit`'s
    time, and the plug-in (lowbit.integrations.transformers) works with this class as it is."""

    def to_json_file(self, json_file_path):
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())


FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
QUANT_METHOD = "lowbit"

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_FIELDS = (
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)
# Keys from_dict tolerates besides the fields: our own, and what BitsAndBytesConfig.to_dict adds.
_DICT_ONLY_KEYS = ("quant_method", "format_version", "bits", "_load_in_4bit", "_load_in_8bit")


def _dtype(name: str, value, table: dict[str, torch.dtype], allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, torch.dtype):
        if value not in table.values():
            raise ValueError(f"{name} must be one of {sorted(table)}, got {value}")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key not in table:
            raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
        return table[key]
    raise TypeError(f"{name} must be a torch.dtype or a dtype name, got {type(value).__name__}")


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _dtype_name(d: torch.dtype | None) -> str | None:
    return None if d is None else str(d).removeprefix("torch.")


class LowbitConfig(_Base):
    """Quantization settings: 8-bit LLM.int8() (`load_in_8bit`) or 4-bit NF4/FP4 (`load_in_4bit`).

    Field names and defaults are those of transformers.BitsAndBytesConfig. Additionally
    `bnb_4bit_compute_dtype=None` means "the input's dtype" (bitsandbytes forces float32).
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: torch.dtype | str | None = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: torch.dtype | str | None = None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(
                f"LowbitConfig got unknown argument(s) {sorted(kwargs)}; accepted: "
                f"load_in_8bit, load_in_4bit, {', '.join(_FIELDS)}"
            )
        _bool("load_in_8bit", load_in_8bit)
        _bool("load_in_4bit", load_in_4bit)
        if load_in_8bit and load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are both True; choose one")
        self.quant_method = QUANT_METHOD
        self._bits = 8 if load_in_8bit else 4 if load_in_4bit else None

        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise TypeError(f"llm_int8_threshold must be a number, got {llm_int8_threshold!r}")
        if not math.isfinite(llm_int8_threshold) or llm_int8_threshold < 0:
            raise ValueError(
                f"llm_int8_threshold must be a finite number >= 0, got {llm_int8_threshold}"
            )
        self.llm_int8_threshold = float(llm_int8_threshold)

        skip = llm_int8_skip_modules
        if skip is not None and (
            not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip)
        ):
            raise TypeError(f"llm_int8_skip_modules must be a list of str or None, got {skip!r}")
        self.llm_int8_skip_modules = None if skip is None else list(skip)
        self.llm_int8_enable_fp32_cpu_offload = _bool(
            "llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload
        )
        self.llm_int8_has_fp16_weight = _bool("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight)
        self.bnb_4bit_compute_dtype = _dtype(
            "bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, _FLOAT_DTYPES
        )
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(
                f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {bnb_4bit_quant_type!r}"
            )
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = _bool(
            "bnb_4bit_use_double_quant", bnb_4bit_use_double_quant
        )
        storage = _dtype("bnb_4bit_quant_storage", bnb_4bit_quant_storage, _STORAGE_DTYPES)
        self.bnb_4bit_quant_storage = torch.uint8 if storage is None else storage

    # ---- views ------------------------------------------------------------------------------

    @property
    def load_in_4bit(self) -> bool:
        return self._bits == 4

    @property
    def load_in_8bit(self) -> bool:
        return self._bits == 8

    @property
    def bits(self) -> int | None:
        """4, 8, or None when neither load_in_* is set."""
        return self._bits

    @property
    def quant_type(self) -> str | None:
        """'nf4' / 'fp4' for 4-bit, 'int8' for 8-bit, None otherwise."""
        return {4: self.bnb_4bit_quant_type, 8: "int8"}.get(self._bits)

    @property
    def is_quantizable(self) -> bool:
        return self._bits is not None

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self.bnb_4bit_compute_dtype

    @property
    def skip_modules(self) -> list[str]:
        return list(self.llm_int8_skip_modules or [])

    def quantization_method(self) -> str:
        """bitsandbytes' names for what this config does: 'llm_int8', 'nf4', 'fp4' or None."""
        return {4: self.bnb_4bit_quant_type, 8: "llm_int8"}.get(self._bits)

    # ---- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "bits": self._bits,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.copy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_compute_dtype": _dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": _dtype_name(self.bnb_4bit_quant_storage),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        # Transformers calls dict(config); the mixin would yield __dict__ (with private names).
        yield from self.to_dict().items()

    def __eq__(self, other):
        return isinstance(other, LowbitConfig) and self.to_dict() == other.to_dict()

    __hash__ = None

    def __repr__(self):
        return f"LowbitConfig({self.to_json_string().strip()})"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs=False, **kwargs):
        """Read our serialised form or bitsandbytes' (load_in_4bit / load_in_8bit keys).

        Keyword arguments override fields (Transformers' from_dict convention); unknown ones are
        returned when return_unused_kwargs=True and rejected otherwise.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        d = dict(config_dict)
        method = d.pop("quant_method", QUANT_METHOD)
        method = getattr(method, "value", method)  # Transformers' QuantizationMethod enum
        if method not in (QUANT_METHOD, "bitsandbytes"):
            raise ValueError(f"quant_method must be 'lowbit' or 'bitsandbytes', got {method!r}")
        version = d.pop("format_version", FORMAT_VERSION)
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"unsupported lowbit format_version {version!r}; this version of lowbit reads "
                f"format_version {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}"
            )
        bits = d.pop("bits", None)
        if bits not in (None, 4, 8):
            raise ValueError(f"bits must be 4, 8 or null, got {bits!r}")
        load4 = bool(d.pop("load_in_4bit", d.pop("_load_in_4bit", False)) or bits == 4)
        load8 = bool(d.pop("load_in_8bit", d.pop("_load_in_8bit", False)) or bits == 8)
        d.pop("_load_in_4bit", None)
        d.pop("_load_in_8bit", None)
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the quantization config; known: "
                f"{list(_DICT_ONLY_KEYS) + ['load_in_4bit', 'load_in_8bit'] + list(_FIELDS)}"
            )
        overrides = {k: v for k, v in kwargs.items() if k in _FIELDS}
        unused = {k: v for k, v in kwargs.items() if k not in _FIELDS}
        if unused and not return_unused_kwargs:
            raise TypeError(f"LowbitConfig.from_dict got unknown argument(s) {sorted(unused)}")
        config = cls(load_in_4bit=load4, load_in_8bit=load8, **{**d, **overrides})
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_string(cls, text: str) -> LowbitConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the quantization config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LowbitConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_json_string(f.read())

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a user may override at load time on top of a checkpoint's saved config."""
        return {
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.copy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
        }

    def post_init(self):
        """Transformers calls this after updating fields: validate them again."""
        type(self).from_dict(self.to_dict())
