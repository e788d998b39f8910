"""QuantState: everything needed to dequantize a blockwise or 4-bit tensor, and its serialised
form (bitsandbytes' layout, so state dicts flow both ways). Deserialisation treats its input as
untrusted: every field is validated before use."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)

# dtype names a quant state may carry: a whitelist, never getattr(torch, <untrusted string>).
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MAX_STATE_JSON_BYTES = 64 * 1024


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class QuantState:
    """Everything needed to dequantize a blockwise or 4-bit quantized tensor.

    Attribute names and the serialised layout (`as_dict(packed=True)`) are those of bitsandbytes,
    so state dicts flow both ways.
    """

    valid_quant_types = ("fp4", "nf4")
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in valid_quant_types]
    valid_qs_keys = [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: Sequence[int] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    @property
    def offset(self) -> torch.Tensor | None:
        """Double quantization: the mean subtracted from the absmax before it was quantized."""
        return self._offset

    @offset.setter
    def offset(self, value) -> None:
        self._offset = value
        # The same value as a Python float, read once here (quantization / load time), so that
        # the fused ops take it without a device read per call and torch.compile sees a constant.
        self._offset_value = None
        if value is not None and not (isinstance(value, torch.Tensor) and value.is_meta):
            self._offset_value = float(value)

    @property
    def offset_value(self) -> float:
        """`offset` as a Python float (0.0 when not nested)."""
        if self._offset is None:
            return 0.0
        if self._offset_value is None:  # set while on the meta device
            self._offset_value = float(self._offset)
        return self._offset_value

    def __getitem__(self, idx):
        """The legacy list layout [absmax, shape, dtype, blocksize, compressed stats, quant_type]."""
        if self.nested:
            items = [
                self.absmax,
                self.shape,
                self.dtype,
                self.blocksize,
                [self.offset, self.state2],
                self.quant_type,
            ]
        else:
            items = [self.absmax, self.shape, self.dtype, self.blocksize, None, self.quant_type]
        return items[idx]

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict; with packed=True only tensors, the rest as UTF-8 JSON in a uint8
        tensor under 'quant_state.bitsandbytes__<quant_type>' (safetensors can store it)."""
        qs: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            qs.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors refuses tensors that share memory
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed:
            return qs
        tensors = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        tensors["quant_state.bitsandbytes__" + self.quant_type] = pack_dict_to_tensor(rest)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> QuantState:
        """Rebuild a 4-bit state from `as_dict` output (packed or not, keys with or without a
        'weight.' prefix). Every field is validated before use; bad input raises ValueError."""
        qs_keys = [
            k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)
        ]
        if not qs_keys and "quant_type" not in qs_dict:
            raise ValueError(
                "quant state: expected packed or unpacked quant_state items, found neither"
            )
        qs_dict = dict(qs_dict)
        if qs_keys:
            if len(qs_keys) != 1 or qs_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"quant state: expected one key ending in one of {cls.valid_qs_type_keys}, got {qs_keys}"
                )
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(qs_keys[0])))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"quant state: unknown keys {sorted(unknown)}")
        return _validated_state(qs_dict, device)

    def to(self, device):
        """Move the state's tensors to `device` (in place, like bitsandbytes)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self._offset = self._offset.to(device)  # same value: the float cache stays valid
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other):
        if not isinstance(other, QuantState):
            return False
        same = (
            torch.allclose(self.absmax, other.absmax, atol=1e-6)
            and self.shape == other.shape
            and torch.allclose(self.code, other.code, atol=1e-6)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and self.nested == other.nested
        )
        if same and self.nested:
            same = (
                torch.allclose(self.offset, other.offset, atol=1e-6) and self.state2 == other.state2
            )
        return same

    __hash__ = None

    def __repr__(self):
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested})"
        )


def pack_dict_to_tensor(d: dict[str, Any]) -> torch.Tensor:
    """A dict as UTF-8 JSON bytes in a 1-D uint8 tensor (bitsandbytes' packed quant-state)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t: torch.Tensor) -> dict[str, Any]:
    """The inverse of pack_dict_to_tensor, for untrusted input: type, size (<= 64 KiB), UTF-8 and
    JSON-object checks before anything is used; ValueError otherwise."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("quant state: the packed quant_state must be a 1-D uint8 tensor")
    if t.numel() > _MAX_STATE_JSON_BYTES:
        raise ValueError(
            f"quant state: packed JSON of {t.numel()} bytes exceeds {_MAX_STATE_JSON_BYTES}"
        )
    try:
        d = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"quant state: the packed quant_state is not valid UTF-8 JSON ({e})"
        ) from None
    if not isinstance(d, dict):
        raise ValueError("quant state: the packed quant_state must be a JSON object")
    return d


def _check_int(name: str, v, allowed=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"quant state: {name} must be an integer, got {v!r}")
    if allowed is not None and v not in allowed:
        raise ValueError(f"quant state: {name} must be one of {allowed}, got {v}")
    return v


def _check_dtype_name(name: str, v) -> torch.dtype:
    if v not in _DTYPES:
        raise ValueError(f"quant state: {name} must be one of {sorted(_DTYPES)}, got {v!r}")
    return _DTYPES[v]


def _check_tensor(name: str, v, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"quant state: {name} must be a tensor, got {type(v).__name__}")
    if v.dtype != dtype:
        raise ValueError(f"quant state: {name} must be {dtype}, got {v.dtype}")
    if v.numel() != numel:
        raise ValueError(f"quant state: {name} must hold {numel} values, got {v.numel()}")
    return v


def _validated_state(qs: dict[str, Any], device) -> QuantState:
    for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
        if key not in qs:
            raise ValueError(f"quant state: missing {key!r}")
    quant_type = qs["quant_type"]
    if quant_type not in QuantState.valid_quant_types:
        raise ValueError(f"quant state: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    blocksize = _check_int("blocksize", qs["blocksize"], BLOCKSIZES_4BIT)
    dtype = _check_dtype_name("dtype", qs["dtype"])
    shape = qs["shape"]
    if not isinstance(shape, (list, tuple)) or not shape:
        raise ValueError(f"quant state: shape must be a non-empty list of sizes, got {shape!r}")
    for s in shape:
        _check_int("shape entry", s)
        if s <= 0:
            raise ValueError(f"quant state: shape entries must be positive, got {list(shape)}")
    n = math.prod(shape)
    if n >= 2**62:
        raise ValueError(f"quant state: shape {list(shape)} has too many elements")
    blocks = -(-n // blocksize)
    code = _check_tensor("quant_map", qs["quant_map"], torch.float32, 16).to(device)
    nested = "nested_absmax" in qs
    if nested:
        for key in ("nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"):
            if key not in qs:
                raise ValueError(f"quant state: missing {key!r} next to nested_absmax")
        nbs = _check_int("nested_blocksize", qs["nested_blocksize"], BLOCKSIZES_8BIT)
        nested_dtype = _check_dtype_name("nested_dtype", qs["nested_dtype"])
        offset = qs["nested_offset"]
        if (
            isinstance(offset, bool)
            or not isinstance(offset, (int, float))
            or not math.isfinite(offset)
        ):
            raise ValueError(f"quant state: nested_offset must be a finite number, got {offset!r}")
        absmax = _check_tensor("absmax", qs["absmax"], torch.uint8, blocks).to(device)
        nested_absmax = _check_tensor(
            "nested_absmax", qs["nested_absmax"], torch.float32, -(-blocks // nbs)
        )
        nested_code = _check_tensor("nested_quant_map", qs["nested_quant_map"], torch.float32, 256)
        state2 = QuantState(
            absmax=nested_absmax.to(device),
            code=nested_code.to(device),
            blocksize=nbs,
            dtype=nested_dtype,
        )
        offset_t = torch.tensor(float(offset), dtype=torch.float32, device=device)
    else:
        absmax = _check_tensor("absmax", qs["absmax"], torch.float32, blocks).to(device)
        state2, offset_t = None, None
    return QuantState(
        absmax=absmax,
        shape=torch.Size(shape),
        code=code,
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
        offset=offset_t,
        state2=state2,
    )
