"""bitsandbytes.functional's optimizer updates, one tensor at a time, on lowbit's fused ops.

Same names and positional arguments as bitsandbytes, so code calling them ports with an import
change. AdEMAMix (beta3, alpha) and LAMB/LARS (unorm_vec, max_unorm) are not supported. Both return
True when the update was applied and False when the gradient held NaN/Inf (nothing was updated).
"""

from __future__ import annotations

import torch


def _no_ademamix(beta3: float, alpha: float) -> None:
    if beta3 != 0.0 or alpha != 0.0:
        raise ValueError(
            f"AdEMAMix (beta3={beta3}, alpha={alpha}) is not supported by lowbit.optim"
        )


def optimizer_update_8bit_blockwise(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor | None,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor | None,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
    sr_seed: int = -1,
) -> bool:
    """In-place update of p and its blockwise 8-bit states (blocks of 256)."""
    _no_ademamix(beta3, alpha)
    two = state2 is not None
    applied = torch.ops.lowbit.optimizer_update_8bit_blockwise(
        optimizer_name,
        [g],
        [p],
        [state1],
        [state2] if two else [],
        [absmax1],
        [absmax2] if two else [],
        qmap1,
        qmap2 if two else None,
        beta1,
        beta2,
        eps,
        step,
        lr,
        weight_decay,
        gnorm_scale,
        skip_zeros,
        sr_seed,
    )
    return bool(applied[0])


def optimizer_update_32bit(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    beta1: float,
    eps: float,
    step: int,
    lr: float,
    state2: torch.Tensor | None = None,
    beta2: float = 0.0,
    beta3: float = 0.0,
    alpha: float = 0.0,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    unorm_vec: torch.Tensor | None = None,
    max_unorm: float = 0.0,
    skip_zeros: bool = False,
    sr_seed: int = -1,
) -> bool:
    """In-place update of p and its fp32 states."""
    _no_ademamix(beta3, alpha)
    if unorm_vec is not None or max_unorm != 0.0:
        raise ValueError("max_unorm / unorm_vec (LAMB, LARS) are not supported by lowbit.optim")
    two = state2 is not None
    applied = torch.ops.lowbit.optimizer_update_32bit(
        optimizer_name,
        [g],
        [p],
        [state1],
        [state2] if two else [],
        beta1,
        beta2,
        eps,
        step,
        lr,
        weight_decay,
        gnorm_scale,
        skip_zeros,
        sr_seed,
    )
    return bool(applied[0])
