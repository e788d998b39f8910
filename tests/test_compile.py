"""torch.compile(fullgraph=True) of the quantized layers: one graph, the same numbers as eager,
and gradients to the input (QLoRA) through the registered autograd formulas."""

import pytest
import torch
from torch import nn

from lowbit.nn import Linear4bit, Linear8bitLt


def _layers():
    torch.manual_seed(0)
    base = nn.Linear(256, 96, bias=True)
    return {
        "nf4-double": Linear4bit.from_linear(base, quant_type="nf4", compress_statistics=True),
        "fp4": Linear4bit.from_linear(base, quant_type="fp4", compress_statistics=False),
        "int8": Linear8bitLt.from_linear(base, has_fp16_weights=False, threshold=6.0),
    }


@pytest.mark.parametrize("name", ["nf4-double", "fp4", "int8"])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_matches_eager(name, rows, dtype):
    torch._dynamo.reset()
    layer = _layers()[name]
    x = torch.randn(rows, 256).to(dtype)
    x[:, 3] *= 20  # an outlier column for the int8 path
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    out = compiled(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    # inductor may fuse the bias add in fp32 where eager rounds to bf16 in between: 1 bf16 ulp
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["nf4-double", "int8"])
def test_compiled_backward_reaches_the_input(name):
    torch._dynamo.reset()
    layer = _layers()[name]
    x = torch.randn(4, 256, requires_grad=True)
    layer(x).sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None
    torch.compile(layer, fullgraph=True)(x).sum().backward()
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in layer.parameters() if not p.requires_grad)
