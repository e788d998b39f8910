"""Property-based tests (hypothesis): for any shape, block size, dtype and values (including
zeros, huge and tiny magnitudes), the kernels agree with reference.py and round trips stay within
one code step of the input."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import lowbit.functional as F
from lowbit import reference

ops = torch.ops.lowbit
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensors(draw, max_numel=3000):
    n = draw(st.integers(min_value=0, max_value=max_numel))
    data = draw(
        arrays("float32", n, elements=values | st.sampled_from([0.0, 1e-30, -1e-38, 5e-45]))
    )
    return torch.from_numpy(data.copy()).to(draw(DTYPES))


@SETTINGS
@given(
    A=tensors(),
    blocksize=st.sampled_from([32, 64, 128, 256, 1024, 4096]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
)
def test_4bit_matches_reference_and_round_trips(A, blocksize, quant_type):
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    rpacked, rabsmax = reference.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    assert torch.equal(packed, rpacked) and torch.equal(absmax, rabsmax)
    back = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(A.shape), torch.float32)
    assert torch.equal(
        back,
        reference.dequantize_4bit(packed, absmax, blocksize, quant_type, A.shape, torch.float32),
    )
    # every element is within half the code's largest gap (x absmax) of its input:
    # NF4 (-1 .. -0.696): 0.1520; FP4 (8/12 .. 12/12): 0.1667
    scale = absmax.repeat_interleave(blocksize)[: A.numel()]
    half_gap = 0.16667 if quant_type == "fp4" else 0.15201
    assert torch.all((back - A.float()).abs() <= half_gap * scale * (1 + 1e-6) + 1e-38)


@SETTINGS
@given(A=tensors(), blocksize=st.sampled_from([64, 256, 4096]))
def test_8bit_matches_reference_and_round_trips(A, blocksize):
    code = F.create_dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    rq, rabsmax = reference.quantize_blockwise(A, code, blocksize)
    assert torch.equal(q, rq) and torch.equal(absmax, rabsmax)
    back = ops.dequantize_blockwise(q, absmax, code, blocksize, torch.float32)
    scale = absmax.repeat_interleave(blocksize)[: A.numel()]
    assert torch.all(
        (back - A.float()).abs() <= 0.00704 * scale * (1 + 1e-6) + 1e-38
    )  # half the largest gap


@SETTINGS
@given(
    M=st.integers(1, 9),
    K=st.integers(1, 80),
    N=st.integers(1, 12),
    threshold=st.sampled_from([0.0, 1.5, 6.0]),
    dtype=DTYPES,
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_pipeline_matches_reference(M, K, N, threshold, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(M, K, generator=g) * 3).to(dtype)
    q, stats, cols = ops.int8_vectorwise_quant(A, threshold)
    rq, rstats, rcols = reference.int8_vectorwise_quant(A, threshold)
    assert torch.equal(q, rq) and torch.equal(stats, rstats)
    assert (cols is None) == (rcols is None) and (cols is None or torch.equal(cols, rcols))
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(N, K, generator=g))
    assert torch.equal(ops.int8_linear_matmul(q, W), reference.int8_linear_matmul(q, W))
    out = ops.int8_linear(A, W, SCB, None, threshold).float()
    ref = reference.int8_linear(A, W, SCB, None, threshold).float()
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2 * (1 + ref.abs().max().item()))
