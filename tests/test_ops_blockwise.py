"""8-bit blockwise quantization: kernels against reference.py, formats, round-trip error."""

import pytest
import torch

import lowbit.functional as F
from conftest import non_contiguous
from lowbit import reference

ops = torch.ops.lowbit
BLOCKSIZES = [64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(1,), (63,), (64,), (1000, 37), (3, 5, 129), (1, 4096), (4096, 1)]


def test_dynamic_map_layout():
    code = F.create_dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] >= code[:-1])
    assert code[127] == 0.0 and code[-1] == 1.0
    assert code[0].item() == pytest.approx(-0.99296875)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_matches_reference(device, dtype, shape, blocksize):
    A = torch.randn(shape, device=device).to(dtype)
    code = F.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    rq, rabsmax = reference.quantize_blockwise(A, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    assert absmax.shape == (-(-A.numel() // blocksize),)
    torch.testing.assert_close(absmax, rabsmax, rtol=0, atol=0)
    assert torch.equal(q, rq)


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_dequantize_matches_reference(device, dtype, blocksize):
    A = torch.randn(777, 33, device=device)
    code = F.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    out = ops.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    ref = reference.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    assert out.dtype == dtype and out.shape == A.shape
    # one fp32 product rounded once to dtype: bit-identical
    assert torch.equal(out, ref)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_round_trip_error(blocksize):
    # The bar bitsandbytes holds itself to: mean absolute error < 0.011 on randn(1024, 1024).
    A = torch.randn(1024, 1024)
    q, state = F.quantize_blockwise(A, blocksize=blocksize)
    err = (F.dequantize_blockwise(q, state) - A).abs().mean().item()
    assert err < 0.011


def test_nested_absmax_round_trip():
    A = torch.randn(512, 512)
    q, state = F.quantize_blockwise(A, blocksize=256, nested=True)
    assert state.nested and state.absmax.dtype == torch.uint8
    plain_q, plain_state = F.quantize_blockwise(A, blocksize=256)
    assert torch.equal(q, plain_q)
    err = (F.dequantize_blockwise(q, state) - A).abs().mean().item()
    assert err < 0.011


def test_non_contiguous_input_gives_contiguous_answer(device, dtype):
    A = torch.randn(300, 70, device=device).to(dtype)
    code = F.create_dynamic_map().to(device)
    nc = non_contiguous(A)
    for got, want in zip(ops.quantize_blockwise(nc, code, 64), ops.quantize_blockwise(A, code, 64)):
        assert torch.equal(got, want)


def test_empty_tensor(device):
    A = torch.empty(0, 16, device=device)
    code = F.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(A, code, 64)
    assert q.shape == (0, 16) and absmax.shape == (0,)
    assert ops.dequantize_blockwise(q, absmax, code, 64, torch.float16).shape == (0, 16)


def test_out_variant_writes_into_out(device, dtype):
    A = torch.randn(100, 50, device=device)
    code = F.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(A, code, 128)
    out = torch.full((100, 50), 7.0, dtype=dtype, device=device)
    ops.dequantize_blockwise.out(q, absmax, code, 128, dtype, out=out)
    assert torch.equal(out, ops.dequantize_blockwise(q, absmax, code, 128, dtype))
    # a strided out is filled too
    wide = torch.zeros(100, 100, dtype=dtype, device=device)
    ops.dequantize_blockwise.out(q, absmax, code, 128, dtype, out=wide[:, ::2])
    assert torch.equal(wide[:, ::2], out) and torch.all(wide[:, 1::2] == 0)
