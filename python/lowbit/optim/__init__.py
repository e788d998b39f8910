"""8-bit optimizers: bitsandbytes' Adam/AdamW/Lion/SGD/RMSprop with blockwise 8-bit states.

States use the signed dynamic map (first moment) and the unsigned one (second moment), blocks of
256 values with an fp32 absmax each, and bitsandbytes' state-dict keys, so optimizer checkpoints
move between the two libraries. Each step is one fused op call per batch of parameters
(torch.ops.lowbit.optimizer_update_8bit_blockwise / optimizer_update_32bit); lowbit.optim.reference
is its pure-torch spec. See optimizer.py for the state layout and the NaN/Inf policy.
"""

from lowbit.optim.functional import optimizer_update_8bit_blockwise, optimizer_update_32bit
from lowbit.optim.optimizer import GlobalOptimManager, Optimizer8bit
from lowbit.optim.optimizers import (
    SGD,
    Adam,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    Lion,
    Lion8bit,
    Lion32bit,
    RMSprop,
    RMSprop8bit,
    RMSprop32bit,
    SGD8bit,
    SGD32bit,
)

__all__ = [
    "GlobalOptimManager",
    "Optimizer8bit",
    "Adam",
    "Adam8bit",
    "Adam32bit",
    "AdamW",
    "AdamW8bit",
    "AdamW32bit",
    "Lion",
    "Lion8bit",
    "Lion32bit",
    "SGD",
    "SGD8bit",
    "SGD32bit",
    "RMSprop",
    "RMSprop8bit",
    "RMSprop32bit",
    "optimizer_update_8bit_blockwise",
    "optimizer_update_32bit",
]
