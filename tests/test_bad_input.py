"""Bad input gets a clear Python exception naming the argument: never a crash, never a silent
wrong answer (issue: reliability). One test per class of mistake, on every op it applies to."""

import math

import pytest
import torch

import lowbit.functional as F

ops = torch.ops.lowbit
CODE8 = F.create_dynamic_map()
CODE4 = F.get_4bit_type("nf4")
BAD_FLOAT_DTYPES = [torch.int32, torch.float64, torch.bool, torch.complex64, torch.uint8]


def _packed(n=4096, blocksize=64):
    return ops.quantize_4bit(torch.randn(n), blocksize, "nf4", torch.uint8)


@pytest.mark.parametrize("bad", BAD_FLOAT_DTYPES, ids=str)
def test_float_inputs_reject_other_dtypes(bad):
    A = torch.ones(64, 64).to(bad)
    with pytest.raises(
        TypeError, match="quantize_blockwise: A must be float32, float16 or bfloat16"
    ):
        ops.quantize_blockwise(A, CODE8, 64)
    with pytest.raises(TypeError, match="quantize_4bit: A must be"):
        ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    with pytest.raises(TypeError, match="int8_vectorwise_quant: A must be"):
        ops.int8_vectorwise_quant(A, 0.0)
    packed, absmax = _packed()
    with pytest.raises(TypeError, match="gemv_4bit: A must be"):
        ops.gemv_4bit(A, packed, [64, 64], absmax, CODE4, 64)
    W = torch.ones(8, 64, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8_linear: A must be"):
        ops.int8_linear(A, W, torch.ones(8), None, 0.0)


@pytest.mark.parametrize("bad", [torch.float16, torch.float64, torch.int32], ids=str)
def test_absmax_and_stats_must_be_float32(bad):
    q, absmax = ops.quantize_blockwise(torch.randn(256), CODE8, 64)
    with pytest.raises(TypeError, match="dequantize_blockwise: absmax must be torch.float32"):
        ops.dequantize_blockwise(q, absmax.to(bad), CODE8, 64, torch.float32)
    packed, absmax4 = _packed()
    with pytest.raises(TypeError, match="dequantize_4bit: absmax must be torch.float32"):
        ops.dequantize_4bit(packed, absmax4.to(bad), 64, "nf4", [4096], torch.float32)
    C = torch.ones(2, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="row_stats must be torch.float32"):
        ops.int8_mm_dequant(C, torch.ones(2, dtype=bad), torch.ones(3))
    with pytest.raises(TypeError, match="col_stats must be torch.float32"):
        ops.int8_mm_dequant(C, torch.ones(2), torch.ones(3, dtype=bad))


def test_code_and_codes_dtypes():
    with pytest.raises(TypeError, match="code must be torch.float32"):
        ops.quantize_blockwise(torch.randn(64), CODE8.to(torch.int8), 64)
    with pytest.raises(TypeError, match="dequantize_blockwise: A must be torch.uint8"):
        ops.dequantize_blockwise(
            torch.zeros(64, dtype=torch.int8), torch.ones(1), CODE8, 64, torch.float32
        )
    with pytest.raises(TypeError, match="int8_linear_matmul: A must be torch.int8"):
        ops.int8_linear_matmul(
            torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.int8)
        )
    with pytest.raises(TypeError, match="int8_linear: W must be torch.int8"):
        ops.int8_linear(torch.randn(2, 4), torch.zeros(3, 4), torch.ones(3), None, 0.0)
    with pytest.raises(ValueError, match="code must hold 256 values"):
        ops.quantize_blockwise(torch.randn(64), CODE4, 64)
    with pytest.raises(ValueError, match="code must be sorted"):
        ops.quantize_blockwise(torch.randn(64), CODE8.flip(0), 64)


@pytest.mark.parametrize("bad", [torch.float64, torch.bool, torch.int64], ids=str)
def test_quant_storage_whitelist(bad):
    with pytest.raises(TypeError, match="quant_storage must be one of"):
        ops.quantize_4bit(torch.randn(64), 64, "nf4", bad)


@pytest.mark.parametrize("blocksize", [0, -64, 63, 16, 8192, 2**40])
def test_blocksizes(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[64, 4096\]"):
        ops.quantize_blockwise(torch.randn(64), CODE8, blocksize)
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\]"):
        ops.quantize_4bit(torch.randn(64), blocksize, "nf4", torch.uint8)
    packed, absmax = _packed()
    with pytest.raises(ValueError, match="blocksize must be"):
        ops.dequantize_4bit(packed, absmax, blocksize, "nf4", [4096], torch.float32)


@pytest.mark.parametrize("quant_type", ["nf5", "", "NF4", "int4"])
def test_quant_types(quant_type):
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        ops.quantize_4bit(torch.randn(64), 64, quant_type, torch.uint8)
    packed, absmax = _packed()
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        ops.dequantize_4bit(packed, absmax, 64, quant_type, [4096], torch.float32)


@pytest.mark.parametrize("threshold", [-1.0, math.nan, math.inf])
def test_thresholds(threshold):
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        ops.int8_vectorwise_quant(torch.randn(4, 4), threshold)
    W = torch.ones(8, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        ops.int8_linear(torch.randn(2, 4), W, torch.ones(8), None, threshold)


def test_inconsistent_sizes():
    packed, absmax = _packed(4096)
    with pytest.raises(ValueError, match=r"absmax must hold ceil\(4096 / 64\) = 64 values, got 63"):
        ops.dequantize_4bit(packed, absmax[:63], 64, "nf4", [4096], torch.float32)
    with pytest.raises(ValueError, match="packed data must hold ceil"):
        ops.dequantize_4bit(packed, absmax, 64, "nf4", [4097], torch.float32)
    with pytest.raises(ValueError, match="shape entries must be >= 0"):
        ops.dequantize_4bit(packed, absmax, 64, "nf4", [-1, 4096], torch.float32)
    with pytest.raises(ValueError, match="overflows int64"):
        ops.dequantize_4bit(packed, absmax, 64, "nf4", [2**40, 2**40], torch.float32)
    q, am8 = ops.quantize_blockwise(torch.randn(1000), CODE8, 64)
    with pytest.raises(ValueError, match=r"absmax must hold ceil\(1000 / 64\) = 16 values"):
        ops.dequantize_blockwise(q, am8[:-1], CODE8, 64, torch.float32)
    with pytest.raises(ValueError, match=r"A's last dimension must equal the weight's K = 64"):
        ops.gemv_4bit(torch.randn(1, 65), packed, [64, 64], absmax, CODE4, 64)
    with pytest.raises(ValueError, match="code must hold 16 values"):
        ops.gemv_4bit(torch.randn(1, 64), packed, [64, 64], absmax, CODE8, 64)
    W = torch.ones(8, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"A's last dimension \(5\) must equal W's K \(4\)"):
        ops.int8_linear(torch.randn(2, 5), W, torch.ones(8), None, 0.0)
    with pytest.raises(ValueError, match="W_scale must hold one value per row of W"):
        ops.int8_linear(torch.randn(2, 4), W, torch.ones(7), None, 0.0)
    with pytest.raises(ValueError, match="bias must hold 8 values"):
        ops.int8_linear(torch.randn(2, 4), W, torch.ones(8), torch.ones(9), 0.0)
    with pytest.raises(ValueError, match="B must be 2-D"):
        ops.int8_linear_matmul(torch.ones(2, 4, dtype=torch.int8), torch.ones(4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"row_stats must hold one value per row of A \(2\)"):
        ops.int8_mm_dequant(torch.ones(2, 3, dtype=torch.int32), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"stats must hold one value per row \(2\)"):
        ops.int8_vectorwise_dequant(torch.ones(2, 3, dtype=torch.int8), torch.ones(3))


def test_out_tensors_of_the_wrong_kind():
    q, absmax = ops.quantize_blockwise(torch.randn(10, 10), CODE8, 64)
    with pytest.raises(TypeError, match="out must be torch.float32, got torch.float16"):
        ops.dequantize_blockwise.out(
            q, absmax, CODE8, 64, torch.float32, out=torch.empty(10, 10, dtype=torch.float16)
        )
    with pytest.raises(ValueError, match="out must have shape"):
        ops.dequantize_blockwise.out(q, absmax, CODE8, 64, torch.float32, out=torch.empty(100))
    packed, absmax4 = _packed()
    with pytest.raises(ValueError, match="out must have shape"):
        ops.dequantize_4bit.out(
            packed, absmax4, 64, "nf4", [4096], torch.float32, out=torch.empty(4095)
        )
    A = torch.ones(2, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="out must be torch.int32"):
        ops.int8_linear_matmul.out(A, A, out=torch.empty(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="out must have shape"):
        ops.int8_linear_matmul.out(A, A, out=torch.empty(2, 3, dtype=torch.int32))


def test_inputs_are_never_mutated():
    A = torch.randn(64, 64) * 10
    A[0, 0] = float("nan")
    before = A.clone()
    ops.quantize_blockwise(A, CODE8, 64)
    ops.quantize_4bit(A, 64, "fp4", torch.uint8)
    ops.int8_vectorwise_quant(A, 6.0)  # bitsandbytes zeroes outliers in place and restores them
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(8, 64))
    ops.int8_linear(A, W, SCB, None, 6.0)
    assert torch.equal(A.isnan(), before.isnan()) and torch.equal(
        A.nan_to_num(), before.nan_to_num()
    )


def test_functional_requires_enough_to_dequantize():
    packed, _ = _packed()
    with pytest.raises(ValueError, match="pass quant_state"):
        F.dequantize_4bit(packed)
    with pytest.raises(ValueError, match="pass quant_state or absmax"):
        F.dequantize_blockwise(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="state"):
        F.gemv_4bit(torch.randn(1, 64), packed)


def test_mixed_devices_are_refused_naming_both():
    # Without a GPU here, a meta tensor stands in for "another device": the call must fail with
    # the devices named, in the real kernel's wrapper or in the fake kernel, never run silently.
    # (tests/test_cuda.py covers cpu/cuda mixes on the GPU machine.)
    packed, absmax = _packed()
    meta = absmax.to("meta")
    with pytest.raises(ValueError, match="absmax is on meta but A is on cpu"):
        ops.dequantize_4bit(packed, meta, 64, "nf4", [4096], torch.float32)
    W = torch.ones(8, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="W_scale is on meta but A is on cpu"):
        ops.int8_linear(torch.randn(2, 4), W, torch.ones(8, device="meta"), None, 0.0)
    with pytest.raises(ValueError, match="B is on meta but A is on cpu"):
        ops.int8_linear_matmul(torch.ones(2, 4, dtype=torch.int8), W.to("meta"))
    with pytest.raises(ValueError, match="code is on meta but A is on cpu"):
        ops.quantize_blockwise(torch.randn(64), CODE8.to("meta"), 64)
