"""Pure-torch reference of lowbit's fused optimizer updates: the executable spec of
csrc/include/lowbit/optim.h and csrc/kernels/{cpu,cuda}/optim*.

Written in the kernels' order of operations: every step below is one fp32 operation rounded once
(torch's elementwise ops on fp32 tensors with fp32-exact scalars), so the 8-bit state codes match the
kernels bit for bit, and so do the parameters (the tests still state a tolerance for them: a few ulps
of the parameter dtype). Slow and memory-hungry on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit import reference

BLOCKSIZE = 256  # bitsandbytes' optimizer blocksize
KINDS = ("adam", "momentum", "rmsprop", "lion")
TWO_STATES = ("adam",)
_GOLDEN = 0x9E3779B9
_M32 = 0xFFFFFFFF


def _f32(x: float) -> float:
    """x rounded to fp32, as a Python float (exact in fp32, so tensor ops use it unchanged)."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


@dataclass
class Scalars:
    """optim.h's OptimScalars: host scalars in double, rounded to fp32 once."""

    kind: str
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    correction2: float
    step_size: float
    decay: float
    weight_decay: float
    gnorm_scale: float
    first_step: bool
    skip_zeros: bool


def make_scalars(
    kind, beta1, beta2, eps, step, lr, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False
):
    if kind not in KINDS:
        raise ValueError(f"optimizer_name must be one of {KINDS}, got {kind!r}")
    correction2, step_size = 1.0, -lr
    if kind == "adam":
        correction2 = math.sqrt(1.0 - math.pow(beta2, float(step)))
        step_size = -lr / (1.0 - math.pow(beta1, float(step)))
    return Scalars(
        kind,
        _f32(beta1),
        _f32(1.0 - beta1),
        _f32(beta2),
        _f32(1.0 - beta2),
        _f32(eps),
        _f32(correction2),
        _f32(step_size),
        _f32(1.0 - lr * weight_decay),
        _f32(weight_decay),
        _f32(gnorm_scale),
        step == 1,
        skip_zeros,
    )


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root (IEEE sqrt, what the kernels compute). torch's
    vectorised fp32 sqrt is off by one ulp on ~20% of inputs; the float64 root rounded to fp32 is
    exact (53 >= 2 * 24 + 2 bits, so the double rounding is harmless)."""
    return torch.sqrt(x.double()).float()


def update_fp32(s: Scalars, g_in: torch.Tensor, p: torch.Tensor, m: torch.Tensor, v):
    """optim_update_element on whole fp32 tensors; returns new (p, m, v)."""
    g = g_in * s.gnorm_scale
    p0, m0, v0 = p, m, v
    if s.kind == "adam":
        m = m * s.beta1 + g * s.one_minus_beta1
        v = v * s.beta2 + (s.one_minus_beta2 * g) * g
        denom = _sqrt(v) / s.correction2 + s.eps
        if s.weight_decay > 0:
            p = p * s.decay
        p = p + s.step_size * (m / denom)
    elif s.kind == "momentum":
        if s.weight_decay > 0:
            g = g + p * s.weight_decay
        m = g if s.first_step else m * s.beta1 + g
        p = p + s.step_size * m
    elif s.kind == "rmsprop":
        if s.weight_decay > 0:
            g = g + p * s.weight_decay
        m = m * s.beta1 + (s.one_minus_beta1 * g) * g
        p = p + s.step_size * (g / (_sqrt(m) + s.eps))
    else:  # lion
        if s.weight_decay > 0:
            p = p * s.decay
        u = m * s.beta1 + g * s.one_minus_beta1
        p = p + s.step_size * torch.sign(u)
        m = m * s.beta2 + g * s.one_minus_beta2
    if s.skip_zeros:
        z = g_in == 0
        p, m = torch.where(z, p0, p), torch.where(z, m0, m)
        if v is not None:
            v = torch.where(z, v0, v)
    return p, m, v


# ---- stochastic rounding of bf16 parameters (optim.h: lowbias32, sr_bits) ----------------------


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on int64 tensors holding uint32 values (products wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sr_bits(seed: int, n: int, device=None) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.int64, device=device)
    key = _lowbias32((seed + (i >> 32) * _GOLDEN) & _M32)
    return _lowbias32((i & _M32) ^ key)


def to_bfloat16_stochastic(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16 adding 16 random bits below the kept ones; non-finite values round to nearest."""
    flat = x.reshape(-1).contiguous()
    u = flat.view(torch.int32).to(torch.int64) & _M32
    r = sr_bits(seed, flat.numel(), flat.device) & 0xFFFF
    bits = ((u + r) >> 16) & 0xFFFF
    sr = bits.to(torch.int32).to(torch.int16).view(torch.bfloat16)
    nonfinite = (u & 0x7F800000) == 0x7F800000
    out = torch.where(nonfinite, flat.to(torch.bfloat16), sr)
    return out.view(x.shape)


def seed_for(sr_seed: int, i: int) -> int:
    """The seed of tensor i of one op call (optim.cpp: seed_for)."""
    return -1 if sr_seed < 0 else (sr_seed + i * _GOLDEN) & _M32


def _store(p: torch.Tensor, new: torch.Tensor, seed: int) -> None:
    if p.dtype == torch.bfloat16 and seed >= 0:
        p.copy_(to_bfloat16_stochastic(new, seed).view(p.shape))
    else:
        p.copy_(new.view(p.shape).to(p.dtype))


# ---- the ops -------------------------------------------------------------------------------------


def optimizer_update_8bit_blockwise(
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
) -> torch.Tensor:
    """Reference of torch.ops.lowbit.optimizer_update_8bit_blockwise (lists, updated in place)."""
    s = make_scalars(
        optimizer_name, beta1, beta2, eps, step, lr, weight_decay, gnorm_scale, skip_zeros
    )
    two = optimizer_name in TWO_STATES
    applied = []
    for i in range(len(p)):
        gi = g[i].reshape(-1).float()
        if not bool(torch.isfinite(gi).all()):
            applied.append(False)
            continue
        applied.append(True)
        m = reference.dequantize_blockwise(
            state1[i].reshape(-1), absmax1[i], qmap1, BLOCKSIZE, torch.float32
        )
        v = None
        if two:
            v = reference.dequantize_blockwise(
                state2[i].reshape(-1), absmax2[i], qmap2, BLOCKSIZE, torch.float32
            )
        new_p, m, v = update_fp32(s, gi, p[i].reshape(-1).float(), m, v)
        _store(p[i], new_p, seed_for(sr_seed, i))
        q, a = reference.quantize_blockwise(m, qmap1, BLOCKSIZE)
        state1[i].copy_(q.view(state1[i].shape))
        absmax1[i].copy_(a)
        if two:
            q, a = reference.quantize_blockwise(v, qmap2, BLOCKSIZE)
            state2[i].copy_(q.view(state2[i].shape))
            absmax2[i].copy_(a)
    return torch.tensor(applied, dtype=torch.bool)


def optimizer_update_32bit(
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
) -> torch.Tensor:
    """Reference of torch.ops.lowbit.optimizer_update_32bit (lists, updated in place)."""
    s = make_scalars(
        optimizer_name, beta1, beta2, eps, step, lr, weight_decay, gnorm_scale, skip_zeros
    )
    two = optimizer_name in TWO_STATES
    applied = []
    for i in range(len(p)):
        gi = g[i].reshape(-1).float()
        if not bool(torch.isfinite(gi).all()):
            applied.append(False)
            continue
        applied.append(True)
        v = state2[i].reshape(-1) if two else None
        new_p, m, v = update_fp32(s, gi, p[i].reshape(-1).float(), state1[i].reshape(-1), v)
        _store(p[i], new_p, seed_for(sr_seed, i))
        state1[i].copy_(m.view(state1[i].shape))
        if two:
            state2[i].copy_(v.view(state2[i].shape))
    return torch.tensor(applied, dtype=torch.bool)
