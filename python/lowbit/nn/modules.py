"""Quantized linear layers: Linear4bit (+ LinearNF4, LinearFP4) and Linear8bitLt.

Constructor arguments, defaults and state-dict keys are those of bitsandbytes.nn. A layer is built
with a float weight (random, copied in, or loaded from a float state dict) and quantizes it once: on
the first move (`.to(device)`, `.cpu()`, `.cuda()`), on `quantize_()`, or on the first forward.
Loading a quantized state dict makes it quantized directly.

Both layers subclass nn.Linear, so PEFT's LoRA wraps them as ordinary linear layers; their weights
are frozen integer tensors and gradients flow to the inputs through the ops' autograd formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import nn

from lowbit import functional as F
from lowbit._codes import QUANT_TYPES_4BIT
from lowbit.nn._state_dict import load_4bit, load_8bit
from lowbit.nn.parameters import Int8Params, Packed4bitWeight, Params4bit

_ops = torch.ops.lowbit


def _target_float_dtype(fn) -> torch.dtype | None:
    """The floating dtype `Module._apply(fn)` converts to, or None for a device-only move.

    Probed on two empty tensors: `.half()`, `.to(torch.bfloat16)` etc. change at least one of them.
    """
    try:
        a = fn(torch.empty(0, dtype=torch.float16))
        b = fn(torch.empty(0, dtype=torch.bfloat16))
    except Exception:  # an fn that cannot take a probe (e.g. needs a real device): assume no cast
        return None
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dtype != torch.float16:
        return a.dtype
    if b.dtype != torch.bfloat16:
        return b.dtype
    return None


def _run_pre_hooks(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errs):
    # nn.Module._load_from_state_dict runs these; we replace that method, so run them ourselves.
    for hook in module._load_state_dict_pre_hooks.values():
        hook(state_dict, prefix, local_metadata, strict, missing, unexpected, errs)


def _linear_4bit(
    x: torch.Tensor, packed: torch.Tensor, qs: F.QuantState, bias=None
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) for the 4-bit weight W [N, K] (`packed` bytes, `qs`), in x's
    dtype: the forward of Linear4bit and of matmul_4bit (bias already in x's dtype).

    On the CPU and CUDA one gemv_4bit call at any batch size: the op picks the kernel by shape in
    C++ (CPU: the int8-activation kernel, the fused fp32 one or BLAS on fp32 weight tiles; CUDA:
    the SIMT GEMV, the tensor-core kernel or dequantize + cuBLAS into a transient workspace), and
    decodes a double quantized absmax in the kernels. Other devices run the fused GEMV for one row
    and dequantize + F.linear otherwise."""
    if x.device.type in ("cpu", "cuda") or x.numel() == x.shape[-1]:
        out = _ops.gemv_4bit(
            x,
            packed,
            list(qs.shape),
            qs.absmax,
            qs.code.to(x.device),
            qs.blocksize,
            *F.nested_absmax_args(qs),
        )
        return out if bias is None else out + bias
    W = _ops.dequantize_4bit(
        packed, F.decode_absmax(qs), qs.blocksize, qs.quant_type, list(qs.shape), x.dtype
    )
    return torch_F.linear(x, W, bias)


class Linear4bit(Packed4bitWeight, nn.Linear):
    """QLoRA 4-bit linear layer (NF4 or FP4 blockwise codes, optional double quantization).

    compute_dtype: the dtype of the matmul (None: the input's dtype); the output has the input's
    dtype. On the CPU and CUDA every forward is one gemv_4bit call, which picks its kernel by
    shape; other devices run the fused GEMV for one row and dequantize + F.linear otherwise.
    """

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_type="fp4",
        quant_storage=torch.uint8,
        device=None,
    ):
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise TypeError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize: bool = True, **kwargs) -> Linear4bit:
        """A 4-bit copy of `linear` (quantized now unless it lives on the meta device)."""
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            **kwargs,
        )
        m.load_state_dict(linear.state_dict(), assign=True)
        if quantize and not linear.weight.is_meta:
            m.quantize_()
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float [out, in] tensor (the quant state's dtype by default)."""
        if not self.is_quantized:
            return self.weight.data.to(dtype or self.weight.dtype)
        qs = self.weight.quant_state
        return _ops.dequantize_4bit(
            self.weight.data,
            F.decode_absmax(qs),
            qs.blocksize,
            qs.quant_type,
            list(qs.shape),
            dtype or qs.dtype,
        )

    def _apply(self, fn, recurse=True):
        w = self.weight
        # A float quant_storage (fp16/bf16 bytes) must not be cast by .half() & co.: view it as
        # uint8 for the duration so fn only moves it.
        storage = w.dtype if self.is_quantized and w.dtype != torch.uint8 else None
        if storage is not None:
            w.data = w.data.view(torch.uint8)
        new_dtype = _target_float_dtype(fn)
        super()._apply(fn, recurse)
        w = self.weight
        if storage is not None:
            w.data = w.data.view(storage)
        qs = getattr(w, "quant_state", None)
        if qs is not None and qs.absmax.device != w.device:
            qs.to(w.device)  # torch kept the parameter object and swapped its data only
        if new_dtype is not None and self.compute_dtype is not None:
            self.compute_dtype = new_dtype  # .to(dtype) changes the compute dtype, never the codes
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        qs = self.quant_state
        if self.is_quantized and qs is not None:
            for k, v in qs.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs
    ):
        _run_pre_hooks(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)
        load_4bit(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            self.quantize_()
        w = self.weight
        qs = w.quant_state
        inp_dtype = x.dtype
        cdtype = self.compute_dtype or inp_dtype
        x = x.to(cdtype)
        bias = None if self.bias is None else self.bias.to(cdtype)
        out = _linear_4bit(x, w.data, qs, bias)
        return out.to(inp_dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, quant_type={self.weight.quant_type}, "
            f"compute_dtype={self.compute_dtype}, quantized={self.is_quantized}"
        )


class LinearFP4(Linear4bit):
    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features,
            output_features,
            bias,
            compute_dtype,
            compress_statistics,
            "fp4",
            quant_storage,
            device,
        )


class LinearNF4(Linear4bit):
    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features,
            output_features,
            bias,
            compute_dtype,
            compress_statistics,
            "nf4",
            quant_storage,
            device,
        )


class _Int8Fp16Weights(torch.autograd.Function):
    """LLM.int8() forward with a trainable float weight, re-quantized on every call
    (has_fp16_weights=True): the forward runs int8, the backward uses the float weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, threshold):
        CB, SCB, _ = F.int8_vectorwise_quant(weight.detach())  # noqa: N806
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ops.int8_linear(x, CB, SCB, bias, threshold)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class Linear8bitLt(nn.Linear):
    """LLM.int8() linear layer: int8 weight with per-row scales, activation outliers (|a| >=
    threshold, when threshold > 0) computed in floating point. One fused op per forward."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias=True,
        has_fp16_weights=True,
        threshold=0.0,
        index=None,
        device=None,
    ):
        threshold = float(threshold)
        if not threshold >= 0.0 or threshold == float("inf"):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
        super().__init__(input_features, output_features, bias, device)
        self.threshold = threshold
        self.index = index
        self.weight = Int8Params(
            self.weight.data, has_fp16_weights=has_fp16_weights, requires_grad=has_fp16_weights
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize: bool = True, **kwargs) -> Linear8bitLt:
        """An int8 copy of `linear` (quantized now unless it lives on the meta device)."""
        kwargs.setdefault("has_fp16_weights", False)
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            **kwargs,
        )
        m.load_state_dict(linear.state_dict(), assign=True)
        if quantize and not linear.weight.is_meta and not m.weight.has_fp16_weights:
            m.quantize_()
        return m

    @property
    def has_fp16_weights(self) -> bool:
        return self.weight.has_fp16_weights

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, Int8Params) and self.weight.has_codes

    def quantize_(self, device=None) -> Linear8bitLt:
        """Quantize the float weight in place (on `device`, default its own); no-op once done."""
        if not self.is_quantized:
            self.weight._quantize(self.weight.device if device is None else device)
            self.weight.has_fp16_weights = False
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float [out, in] tensor (fp32 by default): W * SCB / 127."""
        if not self.is_quantized:
            return self.weight.data.to(dtype or self.weight.dtype)
        w = self.weight
        return (w.data.float() * (w.SCB[:, None] / 127.0)).to(dtype or torch.float32)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        w = self.weight
        scb = getattr(w, "SCB", None)
        if scb is not None and scb.device != w.device:
            w.SCB = scb.to(w.device)  # scales follow the codes; they stay fp32 on any .to(dtype)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            scb = self.weight.SCB
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs
    ):
        _run_pre_hooks(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)
        load_8bit(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.has_fp16_weights and not self.is_quantized:
            return _Int8Fp16Weights.apply(x, w, self.bias, self.threshold)
        if not self.is_quantized:
            self.quantize_()
            w = self.weight
        return _ops.int8_linear(x, w.data, w.SCB, self.bias, self.threshold)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, threshold={self.threshold}, "
            f"has_fp16_weights={self.has_fp16_weights}, quantized={self.is_quantized}"
        )
