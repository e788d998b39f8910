"""Quantized weight parameters: Params4bit (NF4/FP4) and Int8Params (LLM.int8()).

Both mirror bitsandbytes' classes (same names, constructor arguments and attributes) so code and
libraries written against bitsandbytes keep working. A parameter holds its packed integer data as
the tensor itself and the scales as attributes (`quant_state`, `SCB`); the owning module keeps
those attributes on the parameter's device (see modules.py, `_apply`).

Quantization happens once: on the first move to a real device (`.to`, `.cpu`, `.cuda`), or when a
module calls `quantize_()`. A quantized parameter never re-quantizes; moves only change devices.
"""

from __future__ import annotations

import copy

import torch

from lowbit import functional as F


def _parse_device(*args, **kwargs):
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, non_blocking


def _check_materialized(t: torch.Tensor, what: str) -> None:
    if t.is_meta:
        raise RuntimeError(
            f"{what}: the weight is on the meta device (it holds no data); load a state dict or "
            "copy a float weight into it before quantizing"
        )


def _move_quant_state(qs: F.QuantState, device) -> F.QuantState:
    """A copy of `qs` on `device` (QuantState.to moves in place; the source must stay intact)."""
    moved = copy.copy(qs)
    if qs.state2 is not None:
        moved.state2 = copy.copy(qs.state2)
    return moved.to(device)


def _grad_ok(data: torch.Tensor, requires_grad: bool) -> bool:
    # Integer codes cannot require grad; callers (Accelerate, PEFT) may still pass True.
    return requires_grad and (data.is_floating_point() or data.is_complex())


class Params4bit(torch.nn.Parameter):
    """A 4-bit weight: packed codes `[ceil(n/2) bytes, 1]` plus `quant_state` (absmax, code, ...)."""

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,  # quantized weights are frozen
        quant_state: F.QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module=None,  # accepted for bitsandbytes compatibility; the module is not referenced
        bnb_quantized: bool = False,
        **kwargs,  # Accelerate re-creates parameters with their __dict__ as keyword arguments
    ) -> Params4bit:
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, _grad_ok(data, requires_grad))
        self.blocksize = 64 if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        return self

    def _attrs(self) -> dict:
        return {
            "blocksize": self.blocksize,
            "compress_statistics": self.compress_statistics,
            "quant_type": self.quant_type,
            "quant_storage": self.quant_storage,
            "bnb_quantized": self.bnb_quantized,
        }

    @classmethod
    def from_prequantized(
        cls, data: torch.Tensor, quantized_stats: dict, requires_grad=False, device="cpu", **kw
    ) -> Params4bit:
        """A quantized parameter from packed data and the `weight.*` entries of a state dict."""
        qs = F.QuantState.from_dict(qs_dict=quantized_stats, device=device)
        return cls(
            data.to(device),
            requires_grad=requires_grad,
            quant_state=qs,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_type=qs.quant_type,
            quant_storage=data.dtype,
            bnb_quantized=True,
        )

    def _quantize(self, device) -> Params4bit:
        _check_materialized(self.data, "Params4bit")
        w = self.data.contiguous().to(device)
        packed, qs = F.quantize_4bit(
            w,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self.data = packed
        self.quant_state = qs
        self.bnb_quantized = True
        return self

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking = _parse_device(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self._quantize(device)
        if self.bnb_quantized:
            dtype = None  # packed codes are bytes, whatever quant_storage says; never cast them
        data = torch.Tensor.to(self.data, device=device, dtype=dtype, non_blocking=non_blocking)
        attrs = self._attrs()
        qs = self.quant_state
        if qs is not None and device is not None:
            qs = _move_quant_state(qs, device)
        return Params4bit(data, requires_grad=self.requires_grad, quant_state=qs, **attrs)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = Params4bit(
            self.data.clone(),
            requires_grad=self.requires_grad,
            quant_state=copy.deepcopy(self.quant_state, memo),
            **self._attrs(),
        )
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol):
        # nn.Parameter pickles as a plain Parameter; keep the class and the quant state.
        state = {"quant_state": self.quant_state, **self._attrs()}
        return (_rebuild_params4bit, (self.data, self.requires_grad, state))

    def __repr__(self):
        kind = f"{self.quant_type}, quantized" if self.bnb_quantized else "not quantized"
        return f"Params4bit({kind}, data={tuple(self.shape)} {self.dtype})"


def _rebuild_params4bit(data, requires_grad, state):
    return Params4bit(data, requires_grad=requires_grad, **state)


class Packed4bitWeight:
    """What a module holding a Params4bit `weight` exposes about it (Linear4bit, Embedding4bit)."""

    weight: Params4bit

    @property
    def quant_state(self) -> F.QuantState | None:
        return getattr(self.weight, "quant_state", None)

    @property
    def quant_type(self) -> str:
        return self.weight.quant_type

    @property
    def is_quantized(self) -> bool:
        return bool(getattr(self.weight, "bnb_quantized", False))

    def quantize_(self, device=None):
        """Quantize the float weight in place (on `device`, default its own); no-op once done."""
        if not self.is_quantized:
            self.weight._quantize(self.weight.device if device is None else device)
        return self


class Int8Params(torch.nn.Parameter):
    """An LLM.int8() weight: int8 codes `[out, in]` with per-row scales `SCB` (fp32 row absmax)."""

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: torch.Tensor | None = None,  # noqa: N803  (bitsandbytes' names)
        SCB: torch.Tensor | None = None,  # noqa: N803
        **kwargs,
    ) -> Int8Params:
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, _grad_ok(data, requires_grad))
        self.has_fp16_weights = has_fp16_weights
        self.SCB = SCB
        return self

    @property
    def CB(self):  # noqa: N802
        """The int8 codes (bitsandbytes keeps them under this name too); None until quantized."""
        return self.data if self.SCB is not None else None

    @property
    def has_codes(self) -> bool:
        """True once quantized: int8 codes with their scales. (Not `is_quantized`: that name is
        torch.Tensor's flag for qint8 tensors, and FakeTensor refuses tensors that set it.)"""
        return self.SCB is not None and self.dtype == torch.int8

    def _quantize(self, device) -> Int8Params:
        _check_materialized(self.data, "Int8Params")
        # Quantize from the weight's own dtype: casting to fp16 first (as bitsandbytes does) loses
        # precision and overflows for bf16 weights beyond 65504.
        w = self.data.contiguous().to(device)
        CB, SCB, _ = F.int8_vectorwise_quant(w)  # noqa: N806
        self.data = CB
        self.SCB = SCB
        self.requires_grad = False
        return self

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking = _parse_device(*args, **kwargs)
        quantized = self.has_codes
        if (
            not quantized
            and not self.has_fp16_weights
            and device is not None
            and device.type != "meta"
        ):
            return self._quantize(device)
        if quantized:
            dtype = None
        data = torch.Tensor.to(self.data, device=device, dtype=dtype, non_blocking=non_blocking)
        scb = self.SCB
        if scb is not None and device is not None:
            scb = scb.to(device, non_blocking=non_blocking)
        return Int8Params(
            data, requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights, SCB=scb
        )

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = Int8Params(
            self.data.clone(),
            requires_grad=self.requires_grad,
            has_fp16_weights=self.has_fp16_weights,
            SCB=None if self.SCB is None else self.SCB.clone(),
        )
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol):
        state = {"has_fp16_weights": self.has_fp16_weights, "SCB": self.SCB}
        return (_rebuild_int8params, (self.data, self.requires_grad, state))

    def __repr__(self):
        kind = "quantized" if self.has_codes else "not quantized"
        return f"Int8Params({kind}, data={tuple(self.shape)} {self.dtype})"


def _rebuild_int8params(data, requires_grad, state):
    return Int8Params(data, requires_grad=requires_grad, **state)
