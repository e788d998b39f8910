"""The functional API, with the names and defaults of bitsandbytes.functional.

Porting code from bitsandbytes is an import change: `import lowbit.functional as F`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from lowbit._codes import create_dynamic_map, get_4bit_type

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "get_4bit_type",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_nf4",
    "dequantize_fp4",
    "gemv_4bit",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_double_quant",
    "int8_linear",
    "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
    "decode_absmax",
]

_ops = torch.ops.lowbit

NESTED_BLOCKSIZE = 256  # double quantization: absmax is re-quantized in blocks of 256 (QLoRA)
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


def _dynamic_map(device) -> torch.Tensor:
    return create_dynamic_map().to(device)


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
            self.offset = self.offset.to(device)
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


# ---- 8-bit blockwise --------------------------------------------------------------------------


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with the dynamic map (or `code`): (uint8 codes, QuantState)."""
    if code is None:
        code = _dynamic_map(A.device)
    q, _absmax = _ops.quantize_blockwise(A, code.to(A.device), blocksize)
    if nested:
        offset = _absmax.mean()
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=blocksize, nested=False)
        state = QuantState(
            absmax=qabsmax,
            code=code,
            blocksize=blocksize,
            dtype=A.dtype,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(absmax=_absmax, code=code, blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        out.copy_(q)
        q = out
    if absmax is not None:
        absmax.copy_(state.absmax)
        state.absmax = absmax
    return q, state


def decode_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block absmax of a state, decoding double quantization
    (absmax = dequantize_blockwise(q, state2) + offset)."""
    if not state.nested:
        return state.absmax
    return dequantize_blockwise(state.absmax, state.state2) + state.offset


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise: pass quant_state or absmax")
        quant_state = QuantState(
            absmax=absmax,
            code=code if code is not None else _dynamic_map(A.device),
            blocksize=blocksize,
            dtype=torch.float32,
        )
    am = decode_absmax(quant_state)
    dtype = out.dtype if out is not None else quant_state.dtype
    code = quant_state.code.to(A.device)
    if out is not None:
        _ops.dequantize_blockwise.out(A, am, code, quant_state.blocksize, dtype, out=out)
        return out
    return _ops.dequantize_blockwise(A, am, code, quant_state.blocksize, dtype)


# ---- 4-bit ------------------------------------------------------------------------------------


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """4-bit NF4/FP4 quantization: (packed [(n+1)//2 bytes as quant_storage, 1], QuantState).

    compress_statistics=True is double quantization: the fp32 absmax is stored as 8-bit blockwise
    codes (blocksize 256) of absmax - mean(absmax), as in QLoRA.
    """
    packed, _absmax = _ops.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        offset = _absmax.mean()
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state = QuantState(
            absmax=qabsmax,
            shape=A.shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(
            absmax=_absmax,
            shape=A.shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
        )
    if out is not None:
        out.copy_(packed)
        packed = out
    if absmax is not None:
        absmax.copy_(state.absmax)
        state.absmax = absmax
    return packed, state


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 64,
    quant_type: str = "fp4",
) -> torch.Tensor:
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit: pass quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax,
            shape=out.shape,
            dtype=out.dtype,
            blocksize=blocksize,
            quant_type=quant_type,
        )
    am = decode_absmax(quant_state)
    shape = list(quant_state.shape)
    if out is not None:
        _ops.dequantize_4bit.out(
            A, am, quant_state.blocksize, quant_state.quant_type, shape, out.dtype, out=out
        )
        result = out
    else:
        result = _ops.dequantize_4bit(
            A, am, quant_state.blocksize, quant_state.quant_type, shape, quant_state.dtype
        )
    return result


def quantize_nf4(
    A, absmax=None, out=None, blocksize=64, compress_statistics=False, quant_storage=torch.uint8
):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(
    A, absmax=None, out=None, blocksize=64, compress_statistics=False, quant_storage=torch.uint8
):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=64):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=64):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: QuantState | None = None,
) -> torch.Tensor:
    """A [..., K] @ W^T for a 4-bit weight W [N, K] (packed B with its QuantState)."""
    if state is None:
        raise ValueError("gemv_4bit: state (the weight's QuantState) is required")
    result = _ops.gemv_4bit(
        A, B, list(state.shape), decode_absmax(state), state.code.to(A.device), state.blocksize
    )
    if out is not None:
        out.copy_(result)
        return out
    return result


# ---- LLM.int8() -------------------------------------------------------------------------------


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise absmax int8 quantization: (int8 codes, fp32 row absmax, outlier columns or None)."""
    return _ops.int8_vectorwise_quant(A, threshold)


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return _ops.int8_vectorwise_dequant(A, stats)


def int8_linear_matmul(
    A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, dtype=torch.int32
):
    """int32 A @ B^T for int8 A [..., K] and B [N, K]."""
    if dtype != torch.int32:
        raise ValueError(f"int8_linear_matmul: dtype must be torch.int32, got {dtype}")
    if out is not None:
        _ops.int8_linear_matmul.out(A, B, out=out)
        return out
    return _ops.int8_linear_matmul(A, B)


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """C * row_stats * col_stats / 127**2 (+ bias); float16 like bitsandbytes, or out's dtype."""
    dtype = out.dtype if out is not None else torch.float16
    result = _ops.int8_mm_dequant(A, row_stats, col_stats, dtype, bias)
    if out is not None:
        out.copy_(result)
        return out
    return result


def int8_double_quant(
    A: torch.Tensor, col_stats=None, row_stats=None, out_col=None, out_row=None, threshold=0.0
):
    """Row-wise and column-wise int8 quantization of a 2-D A:
    (row codes, column codes, row stats, column stats, outlier columns)."""
    if A.dim() != 2:
        raise ValueError(f"int8_double_quant: A must be 2-D, got shape {tuple(A.shape)}")
    q_row, s_row, outliers = _ops.int8_vectorwise_quant(A, threshold)
    q_col_t, s_col, _ = _ops.int8_vectorwise_quant(A.t(), threshold)
    q_col = q_col_t.t()
    for dst, src in ((out_row, q_row), (out_col, q_col), (row_stats, s_row), (col_stats, s_col)):
        if dst is not None:
            dst.copy_(src)
    return q_row, q_col, s_row, s_col, outliers


def int8_linear(A, W, W_scale, bias=None, threshold: float = 0.0) -> torch.Tensor:
    """The whole LLM.int8() forward in one op: A [..., K] @ dequant(W [N, K])^T (+ bias), with
    activation columns holding |a| >= threshold computed in floating point."""
    return _ops.int8_linear(A, W, W_scale, bias, threshold)
