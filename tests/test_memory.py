"""10,000 forward calls and device/dtype moves of a quantized layer keep memory flat: no per-call
leak in the kernels, the wrappers or the quant-state handling."""

import gc

import psutil
import pytest
import torch
from torch import nn

from lowbit.nn import Linear4bit, Linear8bitLt


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_repeated_forward_and_moves_keep_memory_flat(kind):
    torch.manual_seed(0)
    base = nn.Linear(512, 256)
    if kind == "nf4":
        layer = Linear4bit.from_linear(base, quant_type="nf4", compress_statistics=True)
    else:
        layer = Linear8bitLt.from_linear(base, has_fp16_weights=False, threshold=6.0)
    packed_before = layer.weight.data.clone()
    one, many = torch.randn(1, 512), torch.randn(8, 512)
    many[:, 5] = 30.0  # outliers: the int8 layer takes its float path too

    def run(n):
        for i in range(n):
            layer(one if i % 2 else many)
            if i % 100 == 0:
                layer.to("cpu")
                layer.to(torch.bfloat16)
                layer(one.bfloat16())
                layer.to(torch.float32)

    run(500)  # warm-up: allocator pools, lazily built state
    start = _rss()
    run(10_000)
    growth = _rss() - start
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10,000 calls"
    assert torch.equal(layer.weight.data, packed_before)  # moves never re-quantize
