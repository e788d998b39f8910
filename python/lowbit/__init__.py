"""lowbit: low-bit (int8, NF4, FP4) weight quantization for PyTorch."""

import torch  # noqa: F401  (the ops library links against torch's shared libraries)

from lowbit import (
    _C,  # noqa: F401  (registers torch.ops.lowbit.*)
    _native,  # noqa: F401  (lowbit._native.cpu_isa() / cpu_gemv_mode(), named in the README)
    _ops,  # noqa: F401  (fake kernels and autograd)
)

__version__ = "0.1.0"

from lowbit.integrations import _register_if_available  # noqa: E402  (Transformers plug-in, lazy)

_register_if_available()

from lowbit import nn, optim  # noqa: E402, F401
from lowbit.config import LowbitConfig  # noqa: E402, F401
from lowbit.loading import from_pretrained, quantize_model, save_pretrained  # noqa: E402, F401
from lowbit.matmul import MatmulLtState, matmul, matmul_4bit  # noqa: E402, F401
