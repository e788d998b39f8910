"""bitsandbytes' top-level products: matmul_4bit, matmul (LLM.int8()) and MatmulLtState.

Same arguments, output shapes and dtypes as `bitsandbytes.matmul_4bit` / `bitsandbytes.matmul`,
built on lowbit's ops: the 4-bit product is Linear4bit's forward (`torch.ops.lowbit.gemv_4bit`,
which picks its kernel by shape on the CPU and CUDA), the int8 product is the fused
`torch.ops.lowbit.int8_linear`. Gradients reach A and bias through those ops' autograd formulas;
a float B that requires grad (has_fp16_weights=True) gets one too.

Differences from bitsandbytes, on purpose:
- activations are quantized from their own dtype, never through float16 (bf16 activations beyond
  fp16's range stay finite), and so is a float B;
- every device runs the same LLM.int8() product (bitsandbytes' CPU training mode multiplies by the
  dequantized weight instead), so results do not depend on `state.is_training`;
- `out` is honoured by both functions (bitsandbytes' matmul ignores it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as torch_F

from lowbit import functional as F
from lowbit._codes import QUANT_TYPES_4BIT
from lowbit.nn.modules import _linear_4bit
from lowbit.quant_state import QuantState

__all__ = ["MatmulLtState", "matmul", "matmul_4bit"]

_ops = torch.ops.lowbit


@dataclass
class MatmulLtState:
    """The LLM.int8() weight state of bitsandbytes.MatmulLtState (same fields and defaults).

    lowbit reads CB (int8 codes [N, K]), SCB (fp32 row absmax [N]), threshold, has_fp16_weights
    and is_training; the other fields exist so that code setting or reading them keeps working.
    """

    force_no_igemmlt: bool = False
    CB: torch.Tensor | None = None
    SB: torch.Tensor | None = None
    SCB: torch.Tensor | None = None
    SBt: torch.Tensor | None = None
    CBt: torch.Tensor | None = None
    subB: torch.Tensor | None = None
    outlier_pool: object | None = None
    has_accumulated_gradients: bool = False
    threshold: float = 0.0
    idx: torch.Tensor | None = None
    is_training: bool = True
    has_fp16_weights: bool = True
    use_pool: bool = False

    def reset_grads(self) -> None:
        """Forget the quantized weight (it is quantized again on the next call)."""
        self.CB = self.SB = self.SCB = self.SBt = self.CBt = None


# ---- argument checks ---------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, t, *, floating=False, optional=False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_out(fn: str, out, shape, dtype, device) -> None:
    if out is None:
        return
    _check_tensor(fn, "out", out)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{fn}: out must be a {dtype} tensor of shape {list(shape)} on {device}, got "
            f"{out.dtype} {list(out.shape)} on {out.device}"
        )


def _check_bias(fn: str, bias, n: int) -> None:
    _check_tensor(fn, "bias", bias, floating=True, optional=True)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{fn}: bias must have shape [{n}], got {list(bias.shape)}")


def _finish(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)  # differentiable: out joins the graph when result requires grad
    return out


# ---- 4-bit ---------------------------------------------------------------------------------------


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A [..., K] @ W^T (+ bias) for a 4-bit weight W [N, K]: output [..., N] in A's dtype.

    B is the packed weight in any view of its bytes (bitsandbytes' Linear4bit passes
    `weight.t()`); quant_state.shape [N, K] says what it holds. Gradients flow to A and bias.
    """
    fn = "matmul_4bit"
    if quant_state is None:
        raise ValueError(f"{fn}: quant_state is required (the weight's QuantState)")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"{fn}: quant_state must be a QuantState, got {type(quant_state).__name__}")
    _check_tensor(fn, "A", A, floating=True)
    _check_tensor(fn, "B", B)
    shape = tuple(int(s) for s in quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"{fn}: quant_state.shape must be 2-D [N, K], got {list(shape)}")
    if quant_state.quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(
            f"{fn}: quant_state.quant_type must be one of {QUANT_TYPES_4BIT}, got "
            f"{quant_state.quant_type!r}"
        )
    N, K = shape
    nbytes = (N * K + 1) // 2
    if B.is_floating_point() and B.numel() == N * K:  # a float [N, K] weight, not packed bytes
        raise TypeError(
            f"{fn}: B must be the packed 4-bit weight (uint8 or quant_storage bytes), got a "
            f"float tensor of {N * K} elements; quantize it with lowbit.functional.quantize_4bit"
        )
    if B.numel() * B.element_size() != nbytes:
        raise ValueError(
            f"{fn}: B must hold the {nbytes} packed bytes of a [{N}, {K}] 4-bit weight, got "
            f"{B.dtype} {list(B.shape)} ({B.numel() * B.element_size()} bytes)"
        )
    # Canonical [(N*K+1)//2, 1] packed layout; B.t() of that is a [1, n] view of the same bytes.
    B = B.reshape(-1, 1)
    Kx = A.shape[-1] if A.dim() else -1
    transposed = Kx == N and Kx != K
    if Kx != K and not transposed:
        raise ValueError(
            f"{fn}: A's last dimension ({Kx}) must equal the weight's in_features K = {K} "
            f"(quant_state.shape = {list(shape)})"
        )
    _check_bias(fn, bias, K if transposed else N)
    out_shape = (*A.shape[:-1], K if transposed else N)
    _check_out(fn, out, out_shape, A.dtype, A.device)

    if transposed:
        # bitsandbytes accepts (and deprecates) a weight quantized from its [K, N] transpose.
        warnings.warn(
            f"matmul_4bit: the weight was quantized from a [K, N] tensor (quant_state.shape = "
            f"{list(shape)}); quantize the [N, K] (out_features, in_features) weight instead",
            DeprecationWarning,
            stacklevel=2,
        )
        W = F.dequantize_4bit(B, quant_state).to(A.dtype)
        return _finish(torch_F.linear(A, W.t(), bias), out)

    # The same forward as Linear4bit (one gemv_4bit call on the CPU and CUDA at any batch size).
    result = _linear_4bit(A, B, quant_state, None if bias is None else bias.to(A.dtype))
    return _finish(result, out)


# ---- LLM.int8() ----------------------------------------------------------------------------------


class _Int8MatmulFloatB(torch.autograd.Function):
    """LLM.int8() forward for a float B that requires grad (has_fp16_weights=True): the codes
    come from the state; A's gradient goes through the dequantized codes (as bitsandbytes), B's is
    the exact float product grad^T @ A."""

    @staticmethod
    def forward(ctx, A, B, bias, CB, SCB, threshold):  # noqa: N803  (bitsandbytes' names)
        ctx.save_for_backward(A, CB, SCB)
        ctx.b_dtype = B.dtype
        ctx.has_bias = bias is not None
        return _ops.int8_linear(A, CB, SCB, bias, threshold)

    @staticmethod
    def backward(ctx, grad):
        A, CB, SCB = ctx.saved_tensors  # noqa: N806
        grad_A = grad_B = grad_bias = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            W = F.int8_vectorwise_dequant(CB, SCB)  # noqa: N806
            grad_A = (grad @ W.to(grad.dtype)).to(A.dtype)
        if ctx.needs_input_grad[1]:
            grad_B = (g2.t() @ A.reshape(-1, A.shape[-1]).to(g2.dtype)).to(ctx.b_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        return grad_A, grad_B, grad_bias, None, None, None


def _check_threshold(fn: str, threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{fn}: threshold must be a number, got {type(threshold).__name__}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"{fn}: threshold must be a finite number >= 0, got {threshold}")
    return float(threshold)


def _weight_codes(fn: str, B: torch.Tensor, state: MatmulLtState):
    """(CB, SCB) for this call, quantizing a float B into the state as bitsandbytes does: again on
    every training call unless B holds an accumulated gradient, once otherwise."""
    if B.dtype == torch.int8:
        if state.SCB is None:
            raise ValueError(
                f"{fn}: B holds int8 codes but state.SCB (their per-row absmax) is None; set "
                "state.SCB, or pass the float weight"
            )
        return B, state.SCB
    if not B.is_floating_point():
        raise TypeError(f"{fn}: B must be a float weight or int8 codes, got {B.dtype}")
    if state.has_fp16_weights or state.CB is None:
        has_grad = getattr(B, "grad", None) is not None
        if (state.is_training and not has_grad) or state.CB is None or state.SCB is None:
            state.reset_grads()
            state.CB, state.SCB, _ = F.int8_vectorwise_quant(B.detach().contiguous())
    return state.CB, state.SCB


def matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    state: MatmulLtState | None = None,
    threshold: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLM.int8() A [..., K] @ B^T (+ bias): output [..., N] in A's dtype.

    B is the float weight [N, K] (quantized into `state` per row) or its int8 codes with
    `state.SCB`; with `state.CB` set and has_fp16_weights=False the state's codes are used.
    Activation columns holding |a| >= threshold (state.threshold) are multiplied in floating point.
    Gradients flow to A, bias, and to a float B that requires grad.
    """
    fn = "matmul"
    _check_tensor(fn, "A", A, floating=True)
    _check_tensor(fn, "B", B)
    if state is None:
        state = MatmulLtState()
    elif not isinstance(state, MatmulLtState):
        raise TypeError(f"{fn}: state must be a MatmulLtState or None, got {type(state).__name__}")
    threshold = _check_threshold(fn, threshold)
    if threshold > 0.0:
        state.threshold = threshold
    state_threshold = _check_threshold(f"{fn}: state.threshold", state.threshold)
    if B.dim() != 2:
        raise ValueError(f"{fn}: B must be a 2-D [N, K] weight, got shape {list(B.shape)}")
    if A.dim() == 0 or A.shape[-1] != B.shape[1]:
        raise ValueError(
            f"{fn}: A's last dimension must equal B's K = {B.shape[1]} (B is [N, K]), got A of "
            f"shape {list(A.shape)}"
        )
    CB, SCB = _weight_codes(fn, B, state)  # noqa: N806
    if tuple(CB.shape) != tuple(B.shape) or CB.dtype != torch.int8:
        raise ValueError(
            f"{fn}: state.CB must be int8 codes of B's shape {list(B.shape)}, got {CB.dtype} "
            f"{list(CB.shape)}"
        )
    if tuple(SCB.shape) != (CB.shape[0],):
        raise ValueError(
            f"{fn}: state.SCB must hold one scale per row of B ({CB.shape[0]}), got shape "
            f"{list(SCB.shape)}"
        )
    N = CB.shape[0]
    _check_bias(fn, bias, N)
    _check_out(fn, out, (*A.shape[:-1], N), A.dtype, A.device)
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    if B.is_floating_point() and B.requires_grad and torch.is_grad_enabled():
        result = _Int8MatmulFloatB.apply(A, B, bias, CB, SCB, state_threshold)
    else:
        result = _ops.int8_linear(A, CB, SCB, bias, state_threshold)
    return _finish(result, out)
