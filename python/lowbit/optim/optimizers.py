"""lowbit's optimizers, with bitsandbytes' class names, constructor arguments and defaults.

Each comes in three flavours: `X(..., optim_bits=32)` (8-bit states with optim_bits=8), `X8bit` and
`X32bit`. The update formulas are bitsandbytes' (see csrc/include/lowbit/optim.h); note that, as in
bitsandbytes, Adam's weight decay is decoupled (AdamW-style) too: Adam and AdamW differ only in the
default weight_decay (0 and 1e-2).

Extra arguments, all optional: `percentile_clipping` (bitsandbytes' < 0.45 gradient clipping at a
percentile of the last 100 gradient norms; 100 = off), `block_wise` (must stay True),
`stochastic_rounding` (bf16 parameters are rounded stochastically instead of to nearest: unbiased
updates when the step is below a bf16 ulp of the weight).
"""

from __future__ import annotations

from lowbit.optim.optimizer import Optimizer8bit


class _Adam(Optimizer8bit):
    _kind = "adam"
    _two_states = True
    _default_wd = 0.0

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=None,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        is_paged=False,
        stochastic_rounding=False,
    ):
        if amsgrad:
            raise ValueError(f"{type(self).__name__} does not support amsgrad=True")
        if weight_decay is None:
            weight_decay = self._default_wd
        bits = self._fixed_bits(optim_bits)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            alpha=0.0,
            t_alpha=None,
            t_beta3=None,
        )
        super().__init__(
            params,
            defaults,
            optim_bits=bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
            stochastic_rounding=stochastic_rounding,
        )


class Adam(_Adam):
    """Adam (bitsandbytes.optim.Adam): 32-bit states, or 8-bit with optim_bits=8."""


class Adam8bit(_Adam):
    """Adam with 8-bit blockwise states (bitsandbytes.optim.Adam8bit)."""

    _bits = 8


class Adam32bit(_Adam):
    """Adam with fp32 states (bitsandbytes.optim.Adam32bit)."""

    _bits = 32


class AdamW(_Adam):
    """AdamW (bitsandbytes.optim.AdamW): decoupled weight decay, default 1e-2."""

    _default_wd = 1e-2


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise states (bitsandbytes.optim.AdamW8bit)."""

    _bits = 8


class AdamW32bit(AdamW):
    """AdamW with fp32 states (bitsandbytes.optim.AdamW32bit)."""

    _bits = 32


class _Lion(Optimizer8bit):
    _kind = "lion"
    _two_states = False

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        is_paged=False,
        stochastic_rounding=False,
    ):
        bits = self._fixed_bits(optim_bits)
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay),
            optim_bits=bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
            stochastic_rounding=stochastic_rounding,
        )


class Lion(_Lion):
    """Lion (bitsandbytes.optim.Lion): 32-bit state, or 8-bit with optim_bits=8."""


class Lion8bit(_Lion):
    """Lion with an 8-bit blockwise state (bitsandbytes.optim.Lion8bit)."""

    _bits = 8


class Lion32bit(_Lion):
    """Lion with an fp32 state (bitsandbytes.optim.Lion32bit)."""

    _bits = 32


class _SGD(Optimizer8bit):
    _kind = "momentum"
    _two_states = False

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        stochastic_rounding=False,
    ):
        name = type(self).__name__
        if momentum == 0:
            raise ValueError(
                f"{name} needs momentum > 0 (plain SGD keeps no state: use torch.optim.SGD)"
            )
        if dampening != 0:
            raise ValueError(
                f"{name} does not support dampening (bitsandbytes ignores it), got {dampening}"
            )
        if nesterov:
            raise ValueError(f"{name} does not support nesterov=True")
        bits = self._fixed_bits(optim_bits)
        super().__init__(
            params,
            dict(lr=lr, betas=(momentum, dampening), eps=0.0, weight_decay=weight_decay),
            optim_bits=bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            stochastic_rounding=stochastic_rounding,
        )


class SGD(_SGD):
    """SGD with momentum (bitsandbytes.optim.SGD): m = momentum * m + g; p -= lr * m."""


class SGD8bit(_SGD):
    """SGD with an 8-bit blockwise momentum state (bitsandbytes.optim.SGD8bit)."""

    _bits = 8


class SGD32bit(_SGD):
    """SGD with an fp32 momentum state (bitsandbytes.optim.SGD32bit)."""

    _bits = 32


class _RMSprop(Optimizer8bit):
    _kind = "rmsprop"
    _two_states = False

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        stochastic_rounding=False,
    ):
        name = type(self).__name__
        if alpha == 0:
            raise ValueError(f"{name} needs alpha > 0")
        if centered:
            raise ValueError(f"{name} does not support centered=True")
        if momentum != 0:
            raise ValueError(
                f"{name} does not support momentum (bitsandbytes ignores it), got {momentum}"
            )
        bits = self._fixed_bits(optim_bits)
        super().__init__(
            params,
            dict(lr=lr, betas=(alpha, momentum), eps=eps, weight_decay=weight_decay),
            optim_bits=bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            stochastic_rounding=stochastic_rounding,
        )


class RMSprop(_RMSprop):
    """RMSprop (bitsandbytes.optim.RMSprop): v = alpha * v + (1 - alpha) * g^2; p -= lr * g / (sqrt(v) + eps)."""


class RMSprop8bit(_RMSprop):
    """RMSprop with an 8-bit blockwise state (bitsandbytes.optim.RMSprop8bit)."""

    _bits = 8


class RMSprop32bit(_RMSprop):
    """RMSprop with an fp32 state (bitsandbytes.optim.RMSprop32bit)."""

    _bits = 32
