"""The functional API, with the names and defaults of bitsandbytes.functional.

Porting code from bitsandbytes is an import change: `import lowbit.functional as F`.
"""

from __future__ import annotations

import torch

from lowbit._codes import (
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    get_4bit_type,
)
from lowbit.quant_state import (
    QuantState,
    pack_dict_to_tensor,
    unpack_tensor_to_dict,
)

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
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
    "nested_absmax_args",
    "quantize_affine",
    "dequantize_affine",
    "gemm_affine",
]

_ops = torch.ops.lowbit

NESTED_BLOCKSIZE = 256  # double quantization: absmax is re-quantized in blocks of 256 (QLoRA)


def _dynamic_map(device) -> torch.Tensor:
    return create_dynamic_map().to(device)


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


def nested_absmax_args(state: QuantState) -> tuple:
    """gemv_4bit's trailing double-quantization arguments for a 4-bit state: (nested_absmax,
    nested_code, nested_offset, nested_blocksize), or () when the absmax is plain fp32. The op
    then decodes each block's scale inside the kernel, the same fp32 values as decode_absmax."""
    if not state.nested:
        return ()
    s2 = state.state2
    return (s2.absmax, s2.code, state.offset_value, s2.blocksize)


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
    """A [..., K] @ W^T for a 4-bit weight W [N, K] (packed B with its QuantState). A double
    quantized absmax is decoded inside the kernel, block by block."""
    if state is None:
        raise ValueError("gemv_4bit: state (the weight's QuantState) is required")
    result = _ops.gemv_4bit(
        A,
        B,
        list(state.shape),
        state.absmax,
        state.code.to(A.device),
        state.blocksize,
        *nested_absmax_args(state),
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


# ---- affine 4/8-bit (GPTQ / AWQ / HQQ / compressed-tensors weights) -------------------------------


def quantize_affine(A: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False):
    """Round-to-nearest min/max quantization of a weight A [N, K] to `bits`-bit unsigned codes with
    an fp32 scale and zero per group of `group_size` elements along K (group_size = K: per
    channel). Returns (packed uint8, scales fp32 [N * K // group_size], zeros fp32 [same]); the
    rule is spelled out in lowbit.reference.quantize_affine."""
    return _ops.quantize_affine(A, bits, group_size, symmetric)


def dequantize_affine(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    shape,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight [N, K]: (float(q) - zeros[g]) * scales[g] in fp32, rounded once to dtype."""
    return _ops.dequantize_affine(packed, scales, zeros, bits, group_size, list(shape), dtype)


def gemm_affine(
    A: torch.Tensor,
    packed: torch.Tensor,
    shapeB,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A [..., K] @ dequant(W)^T (+ bias) for an affine weight W [N, K], fp32 accumulation, the
    result in A's dtype. Differentiable in A and bias."""
    return _ops.gemm_affine(A, packed, list(shapeB), scales, zeros, bits, group_size, bias)
