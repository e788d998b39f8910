"""Quantize models in place, and load / save Transformers-format checkpoints quantized.

from_pretrained builds the model on the meta device, swaps its linear layers for empty quantized
ones and streams the checkpoint one tensor at a time: each float weight is quantized as it
arrives, so peak memory stays near the quantized model plus one tensor. Checkpoints written by
lowbit or by Transformers + bitsandbytes (same key layout) load without re-quantization.
"""

from lowbit.loading.model import quantize_model, replace_linear_layers
from lowbit.loading.pretrained import from_pretrained
from lowbit.loading.save import save_pretrained
from lowbit.loading.tensors import TensorLoader, load_tensor

__all__ = [
    "quantize_model",
    "replace_linear_layers",
    "TensorLoader",
    "load_tensor",
    "from_pretrained",
    "save_pretrained",
]
