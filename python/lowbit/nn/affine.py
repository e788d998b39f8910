"""LinearAffine: a linear layer whose weight is in lowbit's affine 4/8-bit format.

This is what GPTQ, AWQ, compressed-tensors and HQQ checkpoints load into (lowbit.formats converts
them once at load time). The weight W [out_features, in_features] is held as:
  * packed (uint8): unsigned codes q; bits=4: two a byte over the row-major flat index, element 2j
    in the HIGH nibble of byte j, [(N*K+1)//2]; bits=8: one a byte, [N*K];
  * scales, zeros (fp32, [N*K // group_size]): one per group of group_size elements along K
    (group_size divides K; == K is per channel), w = (float(q) - zero) * scale;
  * perm (int64 [K], optional, GPTQ act-order): stored column j is input column perm[j], so
    y = x[..., perm] @ W_stored^T.
The matmul runs in the activation's dtype (fp32 accumulation, one rounding) through
torch.ops.lowbit.gemm_affine; weights are frozen, gradients flow to the input.
"""

from __future__ import annotations

import torch
from torch import nn

_ops = torch.ops.lowbit
_FP32_BUFFERS = ("scales", "zeros")


def _packed_len(numel: int, bits: int) -> int:
    return (numel + 1) // 2 if bits == 4 else numel


class LinearAffine(nn.Module):
    """y = x @ W^T + bias with W in lowbit's affine format (see the module docstring).

    The layer is built empty (zero codes and scales) in the given shape; load_state_dict or
    lowbit.from_pretrained fill it. `dequantize(dtype)` returns W in the original column order.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if not isinstance(group_size, int) or group_size < 1 or in_features % group_size:
            raise ValueError(
                f"group_size must be a positive divisor of in_features={in_features}, got "
                f"{group_size!r}"
            )
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        numel = in_features * out_features
        groups = numel // group_size
        self.register_buffer(
            "packed", torch.zeros(_packed_len(numel, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(groups, dtype=torch.float32, device=device))
        self.perm: torch.Tensor | None
        self.register_buffer("perm", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_features, self.in_features]

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes, under the name PEFT looks for on a quantized base layer (AutoGPTQ's
        QuantLinear has it): PEFT puts LoRA adapters on its device, and its integer dtype keeps
        them in fp32 (lowbit.integrations.peft)."""
        return self.packed

    def set_weight(self, packed, scales, zeros, bits: int, group_size: int, perm=None) -> None:
        """Install a converted weight (shape checked); bits and group_size may change."""
        N, K = self.out_features, self.in_features
        if bits not in (4, 8) or group_size < 1 or K % group_size:
            raise ValueError(f"bits {bits} / group_size {group_size} invalid for in_features {K}")
        groups = N * K // group_size
        checks = (
            ("packed", packed, torch.uint8, _packed_len(N * K, bits)),
            ("scales", scales, torch.float32, groups),
            ("zeros", zeros, torch.float32, groups),
        )
        for name, t, dt, n in checks:
            if t.dtype != dt or t.dim() != 1 or t.numel() != n:
                raise ValueError(
                    f"{name} must be {dt} [{n}] for a {N}x{K} {bits}-bit weight in groups of "
                    f"{group_size}, got {t.dtype} {list(t.shape)}"
                )
        if perm is not None:
            perm = _check_perm(perm, K)
        self.bits, self.group_size = bits, group_size
        self.packed, self.scales, self.zeros, self.perm = packed, scales, zeros, perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _ops.gemm_affine(
            x,
            self.packed,
            self.weight_shape,
            self.scales,
            self.zeros,
            self.bits,
            self.group_size,
            bias,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] in the original column order (fp32 by
        default): (float(q) - zero) * scale, rounded once to `dtype`."""
        W = _ops.dequantize_affine(
            self.packed,
            self.scales,
            self.zeros,
            self.bits,
            self.group_size,
            self.weight_shape,
            dtype or torch.float32,
        )
        if self.perm is None:
            return W
        out = torch.empty_like(W)
        out[:, self.perm] = W  # stored column j is original column perm[j]
        return out

    def _apply(self, fn, recurse=True):
        # scales and zeros stay fp32 whatever .half()/.to(dtype) asks: only their device moves.
        keep = {n: self._buffers[n] for n in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new is not None and new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errs
    ):
        # perm is optional: make room for it when the state dict has one, drop it when the state
        # dict holds this layer's codes without one. A state dict without the codes either is a
        # partial one (PEFT loads adapters with strict=False) and leaves the weight alone.
        key = prefix + "perm"
        if key in state_dict:
            perm = state_dict[key]
            try:
                _check_perm(perm, self.in_features)
            except ValueError as e:
                errs.append(f"{key}: {e}")
                return
            if self.perm is None or self.perm.shape != perm.shape:
                self._buffers["perm"] = torch.empty_like(perm, device=self.packed.device)
        elif self.perm is not None and prefix + "packed" in state_dict:
            self._buffers["perm"] = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errs
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
            f"act_order={self.perm is not None}"
        )


def _check_perm(perm: torch.Tensor, K: int) -> torch.Tensor:
    if perm.dtype != torch.int64 or perm.dim() != 1 or perm.numel() != K:
        raise ValueError(f"perm must be int64 [{K}], got {perm.dtype} {list(perm.shape)}")
    if perm.device.type != "meta":
        seen = torch.zeros(K, dtype=torch.bool, device=perm.device)
        ok = bool(((perm >= 0) & (perm < K)).all())
        if ok:
            seen[perm] = True
            ok = bool(seen.all())
        if not ok:
            raise ValueError(f"perm must be a permutation of 0..{K - 1}")
    return perm
