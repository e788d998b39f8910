"""Fake (meta) kernels and autograd formulas of the lowbit ops, one block per op.

The schemas and the CPU/CUDA kernels live in C++ (csrc/registration.cpp). A fake kernel only
describes output shapes and dtypes, so torch.compile can trace the ops without running them.
"""

from __future__ import annotations

import math

import torch

from lowbit import reference

lib = "lowbit::"


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _rows(A: torch.Tensor) -> int:
    return math.prod(A.shape[:-1])


def _same_device(op: str, **tensors) -> None:
    """The device check of the C++ wrappers, for the fake kernels: a call mixing devices must fail
    here too (at trace time, or for a meta tensor mixed with real ones) instead of describing an
    output that the real kernel would refuse."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"lowbit.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )


# ---- 8-bit blockwise --------------------------------------------------------------------------


@torch.library.register_fake(lib + "quantize_blockwise")
def _(A, code, blocksize):
    _same_device("quantize_blockwise", A=A, code=code)
    torch._check(blocksize > 0, lambda: "blocksize must be positive")
    absmax = A.new_empty((_blocks(A.numel(), blocksize),), dtype=torch.float32)
    return torch.empty_like(A, dtype=torch.uint8), absmax


@torch.library.register_fake(lib + "dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    _same_device("dequantize_blockwise", A=A, absmax=absmax, code=code)
    return torch.empty_like(A, dtype=dtype)


@torch.library.register_fake(lib + "dequantize_blockwise.out")
def _(A, absmax, code, blocksize, dtype, out):
    _same_device("dequantize_blockwise", A=A, absmax=absmax, code=code, out=out)
    torch._check(out.shape == A.shape, lambda: f"out must have shape {A.shape}, got {out.shape}")
    torch._check(out.dtype == dtype, lambda: f"out must be {dtype}, got {out.dtype}")


# ---- 4-bit ------------------------------------------------------------------------------------


@torch.library.register_fake(lib + "quantize_4bit")
def _(A, blocksize, quant_type, quant_storage):
    torch._check(blocksize > 0, lambda: "blocksize must be positive")
    n = A.numel()
    nbytes = (n + 1) // 2
    item = torch.empty((), dtype=quant_storage).element_size()
    packed = A.new_empty((nbytes // item, 1), dtype=quant_storage)
    absmax = A.new_empty((_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(lib + "dequantize_4bit")
def _(A, absmax, blocksize, quant_type, shape, dtype):
    _same_device("dequantize_4bit", A=A, absmax=absmax)
    return A.new_empty(shape, dtype=dtype)


@torch.library.register_fake(lib + "dequantize_4bit.out")
def _(A, absmax, blocksize, quant_type, shape, dtype, out):
    _same_device("dequantize_4bit", A=A, absmax=absmax, out=out)
    torch._check(tuple(out.shape) == tuple(shape), lambda: f"out must have shape {shape}")
    torch._check(out.dtype == dtype, lambda: f"out must be {dtype}, got {out.dtype}")


@torch.library.register_fake(lib + "gemv_4bit")
def _(
    A,
    B,
    shapeB,
    absmax,
    code,
    blocksize,
    nested_absmax=None,
    nested_code=None,
    nested_offset=0.0,
    nested_blocksize=256,
):
    _same_device(
        "gemv_4bit",
        A=A,
        B=B,
        absmax=absmax,
        code=code,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
    )
    torch._check(A.shape[-1] == shapeB[1], lambda: "A's last dimension must equal the weight's K")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


def _gemv_4bit_setup(ctx, inputs, output):
    _, B, shapeB, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_bs = inputs
    ctx.save_for_backward(B, absmax, code, nested_absmax, nested_code)
    ctx.shapeB = tuple(shapeB)
    ctx.blocksize = blocksize
    ctx.nested_offset = offset
    ctx.nested_blocksize = nested_bs


def _gemv_4bit_backward(ctx, grad):
    # d(A @ W^T)/dA = grad @ W; the weight is frozen (integer codes), so only A gets a gradient.
    B, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
    if nested_absmax is not None:  # double quantization: the fp32 absmax the kernel decoded
        absmax = reference.decode_nested_absmax(
            absmax, nested_absmax, nested_code, ctx.nested_offset, ctx.nested_blocksize
        )
    W = reference.decode_4bit(B, absmax, code, ctx.blocksize, ctx.shapeB)
    return (grad @ W.to(grad.dtype),) + (None,) * 9


torch.library.register_autograd(
    lib + "gemv_4bit", _gemv_4bit_backward, setup_context=_gemv_4bit_setup
)


# ---- LLM.int8() -------------------------------------------------------------------------------


@torch.library.register_fake(lib + "int8_vectorwise_quant")
def _(A, threshold=0.0):
    out_row = torch.empty_like(A, dtype=torch.int8)
    row_stats = A.new_empty((_rows(A),), dtype=torch.float32)
    outlier_cols = None
    if threshold > 0.0:
        ctx = torch.library.get_ctx()
        outlier_cols = A.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64)
    return out_row, row_stats, outlier_cols


@torch.library.register_fake(lib + "int8_vectorwise_dequant")
def _(A, stats):
    _same_device("int8_vectorwise_dequant", A=A, stats=stats)
    return torch.empty_like(A, dtype=torch.float32)


@torch.library.register_fake(lib + "int8_linear_matmul")
def _(A, B):
    _same_device("int8_linear_matmul", A=A, B=B)
    torch._check(A.shape[-1] == B.shape[-1], lambda: "A's last dimension must equal B's K")
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


@torch.library.register_fake(lib + "int8_linear_matmul.out")
def _(A, B, out):
    _same_device("int8_linear_matmul", A=A, B=B, out=out)
    torch._check(out.dtype == torch.int32, lambda: f"out must be int32, got {out.dtype}")


@torch.library.register_fake(lib + "int8_mm_dequant")
def _(A, row_stats, col_stats, dtype=None, bias=None):
    _same_device("int8_mm_dequant", A=A, row_stats=row_stats, col_stats=col_stats, bias=bias)
    return torch.empty_like(A, dtype=dtype or torch.float16)


@torch.library.register_fake(lib + "int8_linear")
def _(A, W, W_scale, bias=None, threshold=0.0):
    _same_device("int8_linear", A=A, W=W, W_scale=W_scale, bias=bias)
    torch._check(A.shape[-1] == W.shape[-1], lambda: "A's last dimension must equal W's K")
    return A.new_empty((*A.shape[:-1], W.shape[0]))


def _int8_linear_setup(ctx, inputs, output):
    _, W, W_scale, bias, _ = inputs
    ctx.save_for_backward(W, W_scale)
    ctx.bias_shape = None if bias is None else bias.shape


def _int8_linear_backward(ctx, grad):
    # The weight is frozen: dA = grad @ dequant(W); a bias gets the sum of grad over all rows.
    W, W_scale = ctx.saved_tensors
    grad_A = grad @ reference.int8_weight_dequant(W, W_scale).to(grad.dtype)
    grad_bias = None
    if ctx.bias_shape is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).reshape(ctx.bias_shape)
    return grad_A, None, None, grad_bias, None


torch.library.register_autograd(
    lib + "int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup
)


# ---- affine 4/8-bit (GPTQ / AWQ / HQQ / compressed-tensors), issue #13 --------------------------


def _affine_packed_len(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits == 4 else n


@torch.library.register_fake(lib + "quantize_affine")
def _(A, bits, group_size, symmetric):
    torch._check(A.dim() == 2, lambda: "A must be 2-D [N, K]")
    torch._check(bits in (4, 8), lambda: f"bits must be 4 or 8, got {bits}")
    torch._check(group_size > 0, lambda: "group_size must be positive")
    n = A.shape[0] * A.shape[1]
    groups = n // group_size
    packed = A.new_empty((_affine_packed_len(n, bits),), dtype=torch.uint8)
    return (
        packed,
        A.new_empty((groups,), dtype=torch.float32),
        A.new_empty((groups,), dtype=torch.float32),
    )


@torch.library.register_fake(lib + "dequantize_affine")
def _(packed, scales, zeros, bits, group_size, shape, dtype):
    _same_device("dequantize_affine", packed=packed, scales=scales, zeros=zeros)
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake(lib + "gemm_affine")
def _(A, packed, shapeB, scales, zeros, bits, group_size, bias=None):
    _same_device("gemm_affine", A=A, packed=packed, scales=scales, zeros=zeros, bias=bias)
    torch._check(A.shape[-1] == shapeB[1], lambda: "A's last dimension must equal the weight's K")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


def _gemm_affine_setup(ctx, inputs, output):
    _, packed, shapeB, scales, zeros, bits, group_size, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.shapeB = tuple(shapeB)
    ctx.bits = bits
    ctx.group_size = group_size
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)


def _gemm_affine_backward(ctx, grad):
    # d(A @ W^T + b)/dA = grad @ W (W frozen: integer codes); a bias gets grad summed over rows.
    packed, scales, zeros = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = torch.ops.lowbit.dequantize_affine(
            packed, scales, zeros, ctx.bits, ctx.group_size, list(ctx.shapeB), grad.dtype
        )
        grad_A = grad @ W
    if ctx.bias_meta is not None and ctx.needs_input_grad[7]:
        shape, dtype = ctx.bias_meta
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).reshape(shape).to(dtype)
    return grad_A, None, None, None, None, None, None, grad_bias


torch.library.register_autograd(
    lib + "gemm_affine", _gemm_affine_backward, setup_context=_gemm_affine_setup
)


# ---- optimizers (lowbit.optim) ----------------------------------------------------------------
# In-place updates of lists of parameters and states; the output is one bool per parameter (false
# where the gradient held NaN/Inf and nothing was updated).


@torch.library.register_fake(lib + "optimizer_update_8bit_blockwise")
def _(
    optimizer_name,
    g,
    p,
    state1,
    state2,
    absmax1,
    absmax2,
    qmap1,
    qmap2,
    beta1,
    beta2,
    eps,
    step,
    lr,
    weight_decay=0.0,
    gnorm_scale=1.0,
    skip_zeros=False,
    sr_seed=-1,
):
    torch._check(len(g) == len(p), lambda: "g and p must hold one tensor per parameter")
    torch._check(len(state1) == len(p), lambda: "state1 must hold one tensor per parameter")
    for i, (gi, pi) in enumerate(zip(g, p)):
        _same_device(
            "optimizer_update_8bit_blockwise", **{"p[0]": p[0], f"g[{i}]": gi, f"p[{i}]": pi}
        )
    return qmap1.new_empty((len(p),), dtype=torch.bool)


@torch.library.register_fake(lib + "optimizer_update_32bit")
def _(
    optimizer_name,
    g,
    p,
    state1,
    state2,
    beta1,
    beta2,
    eps,
    step,
    lr,
    weight_decay=0.0,
    gnorm_scale=1.0,
    skip_zeros=False,
    sr_seed=-1,
):
    torch._check(len(g) == len(p), lambda: "g and p must hold one tensor per parameter")
    torch._check(len(state1) == len(p), lambda: "state1 must hold one tensor per parameter")
    for i, (gi, pi) in enumerate(zip(g, p)):
        _same_device("optimizer_update_32bit", **{"p[0]": p[0], f"g[{i}]": gi, f"p[{i}]": pi})
    device = p[0].device if len(p) else torch.device("cpu")
    return torch.empty((len(p),), dtype=torch.bool, device=device)
