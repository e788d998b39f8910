"""LinearAffine: forward against the op's reference, the input permutation, dequantize, state
dict round trip, dtype moves, gradients, torch.compile."""

import pytest
import torch

from lowbit import reference as R
from lowbit.nn import LinearAffine


def _layer(N=48, K=128, bits=4, g=32, perm=False, bias=True, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(N, K)
    packed, scales, zeros = R.quantize_affine(W, bits, g, False)
    layer = LinearAffine(K, N, bias=bias, bits=bits, group_size=g)
    p = torch.randperm(K) if perm else None
    layer.set_weight(packed, scales, zeros, bits, g, p)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("M", [1, 5, 40])
def test_forward_is_the_op_on_permuted_inputs(bits, perm, M):
    layer = _layer(bits=bits, perm=perm)
    x = torch.randn(M, layer.in_features)
    xs = x[:, layer.perm] if perm else x
    want = R.gemm_affine_expected(
        xs, layer.packed, [48, 128], layer.scales, layer.zeros, bits, 32, layer.bias
    )
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and it is the dense product with the weight in the original column order
    dense = x @ layer.dequantize().t() + layer.bias
    assert ((got - dense).norm() / dense.norm()).item() < 2e-2


def test_dequantize_undoes_the_permutation():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    perm = torch.randperm(64)
    packed, s, z = R.quantize_affine(W[:, perm].contiguous(), 8, 64, False)
    layer = LinearAffine(64, 16, bias=False, bits=8, group_size=64)
    layer.set_weight(packed, s, z, 8, 64, perm)
    stored = R.dequantize_affine(packed, s, z, 8, 64, [16, 64], torch.float32)
    expect = torch.empty_like(stored)
    expect[:, perm] = stored
    assert torch.equal(layer.dequantize(), expect)
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert (layer.dequantize() - W).abs().max() < 0.05


def test_state_dict_round_trip_with_and_without_perm():
    for perm in (True, False):
        a = _layer(perm=perm)
        b = LinearAffine(128, 48, bits=4, group_size=32)
        b.load_state_dict(a.state_dict())
        assert (b.perm is not None) == perm
        x = torch.randn(3, 128)
        assert torch.equal(a(x), b(x))
        assert set(a.state_dict()) == {"packed", "scales", "zeros", "bias"} | (
            {"perm"} if perm else set()
        )


def test_bad_perm_in_state_dict_is_an_error():
    a = _layer(perm=True)
    sd = a.state_dict()
    sd["perm"] = torch.zeros(128, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="perm must be a permutation"):
        LinearAffine(128, 48, group_size=32).load_state_dict(sd)


def test_half_keeps_scales_fp32():
    layer = _layer().to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and layer.zeros.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_gradient_flows_to_input_only():
    layer = _layer(perm=True).requires_grad_(False)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    # d(sum(x W^T))/dx = column sums of W, in the original column order
    torch.testing.assert_close(
        x.grad, layer.dequantize().sum(0).expand(4, -1), rtol=1e-4, atol=1e-4
    )


def test_compile_fullgraph():
    layer = _layer(perm=True)
    x = torch.randn(3, 128)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 3}, "bits must be 4 or 8"),
        ({"group_size": 48}, "group_size must be a positive divisor"),
        ({"group_size": 0}, "group_size must be a positive divisor"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearAffine(128, 16, **kwargs)


def test_set_weight_checks_sizes():
    layer = LinearAffine(128, 16, group_size=32)
    good = (torch.zeros(1024, dtype=torch.uint8), torch.ones(64), torch.zeros(64))
    with pytest.raises(ValueError, match="scales must be"):
        layer.set_weight(good[0], torch.ones(63), good[2], 4, 32)
    with pytest.raises(ValueError, match="packed must be"):
        layer.set_weight(good[0].to(torch.int8), *good[1:], 4, 32)
    with pytest.raises(ValueError, match="perm must be int64"):
        layer.set_weight(*good, 4, 32, torch.arange(128, dtype=torch.int32))
