"""The affine 4/8-bit ops (GPTQ / AWQ / HQQ / compressed-tensors weights, issue #13) against their
pure-torch references: quantize_affine codes, scales and zeros bit for bit; dequantize_affine bit
for bit in every output dtype; gemm_affine within fp32 reassociation of what the CPU computes
(reference.gemm_affine_expected: the exact product, or the int8-activation model where the CPU
takes that kernel), on every CPU ISA this machine supports."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import non_contiguous
from lowbit import functional as F
from lowbit import reference as R
from lowbit._native import best_cpu_isa, cpu_gemv_mode

ops = torch.ops.lowbit
ISA_ORDER = ["generic", "avx2", "avx512"]
SUPPORTED = ISA_ORDER[: ISA_ORDER.index(best_cpu_isa()) + 1]

# ---- helpers -------------------------------------------------------------------------------------


def _weight(N, K, bits, group_size, *, fractional_zeros=False, device="cpu"):
    """Random codes, positive scales and zeros (integer, or fractional as HQQ writes them)."""
    n = N * K
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    if bits == 4:
        padded = torch.cat([codes, codes.new_zeros(n % 2)])
        packed = ((padded[0::2] << 4) | padded[1::2]).to(torch.uint8)
    else:
        packed = codes
    groups = n // group_size if n else 0
    scales = torch.rand(groups) * 0.1 + 1e-3
    if fractional_zeros:
        zeros = torch.rand(groups) * (2**bits - 1)
    else:
        zeros = torch.randint(0, 2**bits, (groups,)).float()
    return packed.to(device), scales.to(device), zeros.to(device)


def _bound(A, W, expected, dtype, rel=5e-5, atol=1e-6):
    """fp32 reassociation of the sums (`rel` of the sum of |terms|: 5e-5 unless a test says
    otherwise) plus, for 16-bit outputs, one ulp of the final rounding on either side."""
    terms = A.float().reshape(-1, A.shape[-1]).abs() @ W.float().abs().t()
    b = rel * terms.reshape(expected.shape) + atol
    if dtype != torch.float32:
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        b = b + ulp * expected.float().abs()
    return b


def _assert_product(y, A, packed, shapeB, scales, zeros, bits, g, bias=None, **bound_kw):
    expected = R.gemm_affine_expected(A, packed, shapeB, scales, zeros, bits, g, bias)
    W = R.decode_affine(packed, scales, zeros, bits, g, shapeB)
    assert y.dtype == A.dtype and y.shape == expected.shape
    err = (y.float() - expected.float()).abs()
    bound = _bound(A, W, expected, A.dtype, **bound_kw)
    assert torch.equal(y.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert bool((err[finite] <= bound[finite]).all()), float((err - bound)[finite].max())


# ---- quantize_affine ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "N,K,g",
    [(64, 256, 32), (33, 128, 64), (7, 384, 128), (5, 512, 256), (9, 70, 70), (3, 9, 3), (1, 1, 1)],
)
def test_quantize_matches_reference(bits, symmetric, N, K, g, dtype):
    A = (torch.randn(N, K) * 3).to(dtype)
    got = ops.quantize_affine(A, bits, g, symmetric)
    want = R.quantize_affine(A, bits, g, symmetric)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    # the round trip is within half a step of each group's scale
    W = F.dequantize_affine(*got, bits, g, (N, K))
    step = got[1].repeat_interleave(g).reshape(N, K)
    assert bool(((W - A.float()).abs() <= 0.5 * step * (1 + 1e-5) + 1e-6 * A.float().abs()).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_special_groups(bits, symmetric):
    """Zero groups decode to zeros, NaN/Inf groups to NaN (and stay inside their group), tiny
    groups whose scale underflows to zeros, and a range that overflows fp32 still quantizes."""
    A = torch.randn(8, 64)
    A[0] = 0.0
    A[1, 5] = float("nan")
    A[2, 7] = float("inf")
    A[3] = 1e-45
    A[4, :32] = 3e38
    A[4, 32:] = -3e38
    A[5, :32] = torch.linspace(-2, 5, 32)  # asymmetric range
    got = ops.quantize_affine(A, bits, 32, symmetric)
    want = R.quantize_affine(A, bits, 32, symmetric)
    assert torch.equal(got[0], want[0])
    assert torch.equal(_bits(got[1]), _bits(want[1]))
    assert torch.equal(got[2], want[2])
    W = F.dequantize_affine(*got, bits, 32, (8, 64))
    assert torch.equal(W[0], torch.zeros(64))
    assert bool(W[1, :32].isnan().all()) and not bool(W[1, 32:].isnan().any())
    assert bool(W[2, :32].isnan().all()) and not bool(W[2, 32:].isnan().any())
    assert torch.equal(W[3], torch.zeros(64))
    assert bool(torch.isfinite(W[4]).all())
    assert float(W[4].abs().max()) > 1e38


def _bits(t):
    return t.view(torch.int32)


def test_quantize_empty():
    for shape in [(0, 64), (4, 0)]:
        p, s, z = ops.quantize_affine(torch.empty(shape), 4, 32, False)
        assert p.numel() == 0 and s.numel() == 0 and z.numel() == 0


# ---- dequantize_affine -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "N,K,g", [(64, 4096, 128), (33, 256, 32), (17, 192, 64), (5, 70, 70), (7, 9, 3), (3, 10, 2)]
)
@pytest.mark.parametrize("fractional", [False, True])
def test_dequantize_bit_exact(bits, N, K, g, fractional, dtype):
    packed, scales, zeros = _weight(N, K, bits, g, fractional_zeros=fractional)
    got = ops.dequantize_affine(packed, scales, zeros, bits, g, [N, K], dtype)
    want = R.dequantize_affine(packed, scales, zeros, bits, g, (N, K), dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got, want)


def test_dequantize_empty():
    p, s, z = _weight(0, 64, 4, 32)
    assert ops.dequantize_affine(p, s, z, 4, 32, [0, 64], torch.bfloat16).shape == (0, 64)


# ---- gemm_affine -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "N,K,g",
    [
        (96, 4096, 128),  # model-like: the int8-activation path at small M (4-bit)
        (40, 1024, 32),  # two groups per 64-element chunk
        (24, 576, 96),  # group_size % 64 == 32, not a power of two
        (33, 512, 256),
        (17, 320, 320),  # per channel
        (6, 192, 64),  # K % 128 == 64: a half block at the end of each row (AVX-512)
        (9, 64, 32),  # one chunk per row
        (11, 100, 50),  # K not a multiple of 64: the exact kernels
        (5, 9, 3),  # odd K: rows start inside a byte
    ],
)
@pytest.mark.parametrize("M", [1, 3, 16, 33, 128])
def test_gemm_matches_reference(bits, N, K, g, M):
    packed, scales, zeros = _weight(N, K, bits, g, fractional_zeros=(g == 96))
    A = torch.randn(M, K)
    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g)
    _assert_product(y, A, packed, (N, K), scales, zeros, bits, g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_gemm_dtypes_bias_noncontiguous(bits, M, dtype):
    N, K, g = 48, 1024, 64
    packed, scales, zeros = _weight(N, K, bits, g)
    A = torch.randn(2, M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g, bias)
    assert y.shape == (2, M, N)
    _assert_product(y, A, packed, (N, K), scales, zeros, bits, g, bias)
    y2 = ops.gemm_affine(non_contiguous(A), packed, [N, K], scales, zeros, bits, g, bias)
    assert torch.equal(y, y2)
    # an fp32 bias on 16-bit activations is added in fp32 before the one rounding
    y3 = ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g, bias.float())
    assert torch.equal(y, y3)


def test_gemm_int8_path_error():
    """The int8-activation kernel's extra error over the exact product (documented in
    cpu_kernels.h: the activations' int8 rounding only): well under int4's own error."""
    N, K, g = 256, 4096, 128
    w = torch.randn(N, K)
    packed, scales, zeros = ops.quantize_affine(w, 4, g, False)
    for shift in [0.0, 1.0]:
        A = torch.randn(4, K) + shift
        y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 4, g)
        exact = R.gemm_affine(A, packed, (N, K), scales, zeros, 4, g)
        dense = A @ w.t()
        rel = lambda a, b: float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())  # noqa: E731
        assert rel(y, exact) < 0.02
        assert rel(y, exact) < 0.25 * rel(exact, dense)


def test_gemm_nonfinite():
    """A NaN weight group gives NaN exactly where the reference does (the int8 path hands such a
    call to the exact kernels), NaN/Inf activations too."""
    N, K, g = 16, 256, 64
    packed, scales, zeros = _weight(N, K, 4, g)
    scales[5] = float("nan")  # row 1, second group
    A = torch.randn(3, K)
    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 4, g)
    _assert_product(y, A, packed, (N, K), scales, zeros, 4, g)
    assert bool(y[:, 1].isnan().all()) and int(y.isnan().sum()) == 3
    A[1, 7] = float("inf")
    scales[5] = 0.01
    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 4, g)
    expected = R.gemm_affine(A, packed, (N, K), scales, zeros, 4, g)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())


def test_gemm_empty():
    packed, scales, zeros = _weight(8, 64, 4, 32)
    y = ops.gemm_affine(torch.empty(0, 64), packed, [8, 64], scales, zeros, 4, 32)
    assert y.shape == (0, 8)
    p0, s0, z0 = _weight(0, 64, 4, 32)
    assert ops.gemm_affine(torch.randn(3, 64), p0, [0, 64], s0, z0, 4, 32).shape == (3, 0)
    # K = 0: the empty sum, plus the bias
    y = ops.gemm_affine(
        torch.empty(2, 0), torch.empty(0, dtype=torch.uint8), [5, 0], torch.empty(0),
        torch.empty(0), 4, 1, torch.ones(5),
    )  # fmt: skip
    assert torch.equal(y, torch.ones(2, 5))


def test_gemm_autograd():
    N, K, g = 24, 256, 64
    packed, scales, zeros = _weight(N, K, 4, g)
    A = torch.randn(2, 3, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    y = F.gemm_affine(A, packed, (N, K), scales, zeros, 4, g, bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    W = R.decode_affine(packed, scales, zeros, 4, g, (N, K))
    assert torch.allclose(A.grad, grad @ W, atol=1e-5, rtol=1e-5)
    assert torch.allclose(bias.grad, grad.sum((0, 1)), atol=1e-5)


def test_compile_fullgraph():
    N, K, g = 32, 256, 64
    packed, scales, zeros = _weight(N, K, 4, g)
    bias = torch.randn(N)

    def f(x):
        return torch.relu(F.gemm_affine(x, packed, (N, K), scales, zeros, 4, g, bias))

    x = torch.randn(3, K)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_opcheck():
    N, K, g = 16, 128, 32
    packed, scales, zeros = _weight(N, K, 4, g)
    p8, s8, z8 = _weight(N, K, 8, g, fractional_zeros=True)
    A = torch.randn(3, K)
    Ag = torch.randn(3, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    cases = [
        (ops.quantize_affine.default, (torch.randn(N, K), 4, g, False)),
        (ops.quantize_affine.default, (torch.randn(N, K).bfloat16(), 8, K, True)),
        (ops.dequantize_affine.default, (packed, scales, zeros, 4, g, [N, K], torch.bfloat16)),
        (ops.dequantize_affine.default, (p8, s8, z8, 8, g, [N, K], torch.float32)),
        (ops.gemm_affine.default, (A, packed, [N, K], scales, zeros, 4, g)),
        (ops.gemm_affine.default, (Ag, packed, [N, K], scales, zeros, 4, g, bias)),
        (ops.gemm_affine.default, (Ag.detach().half(), p8, [N, K], s8, z8, 8, g)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- 8-bit codes through the int8-activation kernel ---------------------------------------------
# Up to 32 activation rows, K % 64 == 0 and group_size % 32 == 0, 8-bit codes take the int8-
# activation kernel (cpu_kernels.h, affine section). Its zero point is applied per lane of 8-16
# elements in one fp32 rounding (exact for integer zeros), so its distance to the fp64 model
# (reference.gemm_affine_q8) stays within a few fp32 ulps of sum |x| * |w|, even where sum x * q
# and zero * sum x nearly cancel: these tests hold it to 2e-6 of that sum (the 4-bit kernel, which
# subtracts the zero term once per output, keeps the general 5e-5). The int8 rounding of the
# activations is ~1e-3 of the product, so a result of the exact kernel fails this bound: passing
# it shows the call took the int8 path.
Q8_TIGHT = dict(rel=2e-6, atol=1e-7)
INT8 = cpu_gemv_mode() == "int8"


def _weight8(N, K, g, *, symmetric=False, fractional_zeros=False, codes=None, zero=None):
    packed, scales, zeros = _weight(N, K, 8, g, fractional_zeros=fractional_zeros)
    if symmetric:
        zeros = torch.full_like(zeros, 128.0)
    if codes is not None:
        packed = torch.full_like(packed, codes)
    if zero is not None:
        zeros = torch.full_like(zeros, float(zero))
    return packed, scales, zeros


@pytest.mark.parametrize(
    "N,K,g",
    [
        (37, 1024, 128),  # 4 blocks of 256 codes per row, two groups per block
        (19, 4096, 4096),  # per channel
        (23, 1024, 256),  # one group per block (group accumulators)
        (21, 768, 64),  # four groups per block
        (13, 640, 32),  # 32-element groups: the halves of a chunk in different groups
        (11, 576, 96),  # group_size % 64 == 32, not a power of two
        (9, 320, 320),  # per channel, K % 256 == 64: a one-chunk last block
        (7, 384, 128),  # K % 256 == 128
        (5, 448, 64),  # K % 256 == 192
        (3, 64, 32),  # one chunk per row
        (1, 512, 512),  # one output feature
    ],
)
@pytest.mark.parametrize("M", [1, 3, 8, 17, 32])
def test_gemm8_int8_path(N, K, g, M):
    for symmetric, fractional in [(False, False), (True, False), (False, True)]:
        packed, scales, zeros = _weight8(N, K, g, symmetric=symmetric, fractional_zeros=fractional)
        A = torch.randn(M, K)
        y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 8, g)
        assert R.cpu_gemm_affine_takes_int8(M, K, 8, g, A) == INT8
        _assert_product(y, A, packed, (N, K), scales, zeros, 8, g, **Q8_TIGHT)


@pytest.mark.parametrize("M", [1, 8, 17, 32])
def test_gemm8_dtypes_bias_noncontiguous_unaligned(M, dtype):
    """fp32/fp16/bf16 activations, a bias, strided activations and a weight whose rows do not
    start on a 64-byte boundary (a view one byte into its storage)."""
    N, K, g = 45, 1280, 128
    packed, scales, zeros = _weight8(N, K, g, fractional_zeros=True)
    A = (torch.randn(2, M, K) + 0.5).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 8, g, bias)
    assert y.shape == (2, M, N)
    _assert_product(y, A, packed, (N, K), scales, zeros, 8, g, bias, **Q8_TIGHT)
    y2 = ops.gemm_affine(non_contiguous(A), packed, [N, K], scales, zeros, 8, g, bias)
    assert torch.equal(y, y2)
    storage = torch.empty(N * K + 1, dtype=torch.uint8)
    shifted = storage[1:]
    shifted.copy_(packed)
    assert shifted.data_ptr() % 64 != 0
    y3 = ops.gemm_affine(A, shifted, [N, K], scales, zeros, 8, g, bias)
    assert torch.equal(y, y3)


@pytest.mark.parametrize("g", [32, 128, 256, 1024])
def test_gemm8_extreme_codes_and_zeros(g):
    """Codes and zeros at 0 and 255. Codes equal to their zero (w = 0) give exactly 0 however
    large sum x * q and zero * sum x are; near-equal fractional zeros stay within fp32 ulps of
    the small true result; codes 255 against zero 0 (and 0 against 255) are the largest weights."""
    N, K = 6, 1024
    A = torch.rand(5, K) + 1.0  # one sign: nothing in the true sum hides a cancellation error
    for codes, zero in [(255, 255), (0, 0), (255, 0), (0, 255), (255, 254.75), (128, 127.5)]:
        packed, scales, zeros = _weight8(N, K, g, codes=codes, zero=zero)
        y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 8, g)
        _assert_product(y, A, packed, (N, K), scales, zeros, 8, g, **Q8_TIGHT)
        if codes == zero:
            assert torch.equal(y, torch.zeros_like(y))
    # random codes with zeros 255 and 0 in alternate groups
    packed, scales, zeros = _weight8(N, K, g)
    zeros = torch.where(torch.arange(zeros.numel()) % 2 == 0, 255.0, 0.0)
    packed[: K // 2] = 255
    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 8, g)
    _assert_product(y, A, packed, (N, K), scales, zeros, 8, g, **Q8_TIGHT)


def test_gemm8_quantized_weights_and_error():
    """Weights from quantize_affine (asymmetric and symmetric): the int8 path's extra error over
    the exact product is the activations' int8 rounding only, far below int8's own error... which
    is itself small, so the bound is relative to the product: < 1%, mean-shifted activations
    included."""
    N, K, g = 256, 4096, 128
    w = torch.randn(N, K)
    rel = lambda a, b: float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())  # noqa: E731
    for symmetric in (False, True):
        packed, scales, zeros = ops.quantize_affine(w, 8, g, symmetric)
        for shift in (0.0, 1.0):
            A = torch.randn(4, K) + shift
            y = ops.gemm_affine(A, packed, [N, K], scales, zeros, 8, g)
            _assert_product(y, A, packed, (N, K), scales, zeros, 8, g, **Q8_TIGHT)
            exact = R.gemm_affine(A, packed, (N, K), scales, zeros, 8, g)
            assert rel(y, exact) < (0.01 if INT8 else 1e-6)


def test_gemm8_act_order_permutation():
    """GPTQ act-order: LinearAffine permutes the activations once (x[..., perm]) and multiplies
    by the stored weight; with 8-bit codes that product is the int8-activation kernel's."""
    from lowbit.nn import LinearAffine

    N, K, g = 40, 1024, 128
    W = torch.randn(N, K)
    perm = torch.randperm(K)
    packed, scales, zeros = ops.quantize_affine(W[:, perm].contiguous(), 8, g, False)
    layer = LinearAffine(K, N, bias=False, bits=8, group_size=g)
    layer.set_weight(packed, scales, zeros, 8, g, perm)
    for M in (1, 17):
        x = torch.randn(M, K)
        y = layer(x)
        _assert_product(y, x[:, perm], packed, (N, K), scales, zeros, 8, g, **Q8_TIGHT)
        dense = x @ layer.dequantize().t()
        assert float((y - dense).norm() / dense.norm()) < 1e-2


def test_gemm8_fallbacks():
    """Calls the int8 path hands to the exact kernel, which then decides the whole result (the
    exact kernel's values, not the int8 model's: held to the same tight bound, which the int8
    rounding of the activations would break): NaN, Inf, huge and tiny activations; a NaN weight
    group (NaN exactly where the exact product has it); a scale so large that an fp32 partial sum
    overflows."""
    N, K, g = 24, 512, 64
    packed, scales, zeros = _weight8(N, K, g, fractional_zeros=True)
    W = R.decode_affine(packed, scales, zeros, 8, g, (N, K))

    def check_exact(A, s=scales):
        y = ops.gemm_affine(A, packed, [N, K], s, zeros, 8, g)
        exact = R.gemm_affine(A, packed, (N, K), s, zeros, 8, g)
        assert torch.equal(y.isnan(), exact.isnan()) and torch.equal(y.isinf(), exact.isinf())
        ok = torch.isfinite(exact)
        bound = _bound(A.nan_to_num(0.0, 0.0, 0.0), W.nan_to_num(0.0), exact, A.dtype, **Q8_TIGHT)
        assert bool(((y - exact).abs()[ok] <= bound[ok]).all())
        return y

    for M in (1, 8, 32):
        A = torch.randn(M, K)
        A[0, 3] = float("nan")
        y = check_exact(A)
        assert bool(y[0].isnan().all()) and not bool(y[1:].isnan().any())
        A = torch.randn(M, K)
        A[M - 1, 100] = float("inf")
        check_exact(A)
        A = torch.randn(M, K)
        A[0, :64] = 2.0**70  # a chunk past 2^64: the scales could overflow
        check_exact(A)
        A = torch.randn(M, K)
        A[M // 2, 64:128] = 1e-40  # a chunk below 2^-100: 127 / absmax would overflow
        check_exact(A)
    A = torch.randn(3, K)
    s = scales.clone()
    s[9] = float("nan")  # row 1, second group
    y = check_exact(A, s)
    assert bool(y[:, 1].isnan().all()) and int(y.isnan().sum()) == 3
    s = scales.clone()
    s[::8] = 3e36  # first group of every row: fp32 partial sums overflow (Inf, or NaN: Inf - Inf)
    y = check_exact(torch.randn(2, K) * 100, s)
    assert not bool(torch.isfinite(y).any())


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input():
    N, K, g = 8, 64, 32
    packed, scales, zeros = _weight(N, K, 4, g)
    A = torch.randn(2, K)
    G = ops.gemm_affine

    def raises(exc, match, fn, *args):
        with pytest.raises(exc, match=match):
            fn(*args)

    raises(ValueError, "bits must be 4 or 8", G, A, packed, [N, K], scales, zeros, 3, g)
    raises(ValueError, "group_size", G, A, packed, [N, K], scales, zeros, 4, 48)
    raises(ValueError, "group_size", G, A, packed, [N, K], scales, zeros, 4, 0)
    raises(TypeError, "packed must be torch.uint8", G, A, packed.view(torch.int8), [N, K],
           scales, zeros, 4, g)  # fmt: skip
    raises(ValueError, "packed must hold 256 bytes", G, A, packed[:-1], [N, K], scales, zeros, 4, g)
    raises(ValueError, "packed must hold 512 bytes", G, A, packed, [N, K], scales, zeros, 8, g)
    raises(TypeError, "scales must be torch.float32", G, A, packed, [N, K], scales.half(), zeros,
           4, g)  # fmt: skip
    raises(TypeError, "zeros must be torch.float32", G, A, packed, [N, K], scales, zeros.long(),
           4, g)  # fmt: skip
    raises(ValueError, "scales must hold", G, A, packed, [N, K], scales[:-1], zeros, 4, g)
    raises(ValueError, "zeros must hold", G, A, packed, [N, K], scales, zeros[:3], 4, g)
    raises(TypeError, "A must be float32", G, A.long(), packed, [N, K], scales, zeros, 4, g)
    raises(ValueError, "last dimension", G, A[:, :32], packed, [N, K], scales, zeros, 4, g)
    raises(ValueError, "shapeB must be", G, A, packed, [N, K, 1], scales, zeros, 4, g)
    raises(ValueError, "bias must hold", G, A, packed, [N, K], scales, zeros, 4, g, torch.ones(3))
    raises(TypeError, "bias must be float32", G, A, packed, [N, K], scales, zeros, 4, g,
           torch.ones(N, dtype=torch.long))  # fmt: skip
    D = ops.dequantize_affine
    raises(TypeError, "dtype must be", D, packed, scales, zeros, 4, g, [N, K], torch.int32)
    raises(ValueError, "shape must be", D, packed, scales, zeros, 4, g, [N * K], torch.float32)
    raises(ValueError, "shape entries", D, packed, scales, zeros, 4, g, [-1, K], torch.float32)
    Q = ops.quantize_affine
    raises(TypeError, "A must be float32", Q, torch.ones(N, K, dtype=torch.int32), 4, g, False)
    raises(ValueError, "A must be a 2-D", Q, torch.randn(K), 4, g, False)
    raises(ValueError, "bits must be 4 or 8", Q, torch.randn(N, K), 2, g, False)
    raises(ValueError, "group_size", Q, torch.randn(N, K), 4, 100, False)


# ---- every CPU ISA ------------------------------------------------------------------------------

ISA_SCRIPT = textwrap.dedent(
    r"""
    import sys, torch
    from lowbit import reference as R
    from lowbit._native import cpu_isa, cpu_gemv_mode
    ops = torch.ops.lowbit
    assert cpu_isa() == sys.argv[1], (cpu_isa(), sys.argv[1])
    torch.manual_seed(0)
    bad = []
    for bits in (4, 8):
        for (N, K, g) in [(64, 4096, 128), (40, 1024, 32), (24, 576, 96), (33, 512, 256),
                          (17, 320, 320), (6, 192, 64), (9, 64, 32), (11, 100, 50), (5, 9, 3),
                          (7, 130, 2)]:
            n = N * K
            codes = torch.randint(0, 2**bits, (n + n % 2,), dtype=torch.uint8)
            packed = ((codes[0::2] << 4) | codes[1::2]) if bits == 4 else codes[:n]
            scales = torch.rand(n // g) * 0.1 + 1e-3
            zeros = torch.rand(n // g) * (2**bits - 1)
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                got = ops.dequantize_affine(packed, scales, zeros, bits, g, [N, K], dt)
                if not torch.equal(got, R.dequantize_affine(packed, scales, zeros, bits, g, (N, K), dt)):
                    bad.append(f"dequantize {bits} {N}x{K} g{g} {dt}")
                A = torch.randn(N, K).to(dt)
                for sym in (False, True):
                    q = ops.quantize_affine(A, bits, g, sym)
                    if not all(torch.equal(a, b) for a, b in zip(q, R.quantize_affine(A, bits, g, sym))):
                        bad.append(f"quantize {bits} {N}x{K} g{g} {dt} sym={sym}")
            W = R.decode_affine(packed, scales, zeros, bits, g, (N, K))
            for M in (1, 3, 16, 33):
                for dt in (torch.float32, torch.bfloat16):
                    A = torch.randn(M, K).to(dt)
                    bias = torch.randn(N)
                    y = ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g, bias)
                    e = R.gemm_affine_expected(A, packed, (N, K), scales, zeros, bits, g, bias)
                    bound = 5e-5 * (A.float().abs() @ W.abs().t()) + 1e-6
                    if dt != torch.float32:
                        bound = bound + 2.0**-7 * e.float().abs()
                    if dt == torch.bfloat16 and M > 32:
                        # Past the int8 tier, CPUs with native bf16 multiply bf16 activations by
                        # bf16 weight tiles (cpu_gemm4.cpp): weights and products rounded to bf16.
                        bound = bound + 2.0**-8 * (A.float().abs() @ W.abs().t())
                    if not bool(((y.float() - e.float()).abs() <= bound).all()):
                        bad.append(f"gemm {bits} {N}x{K} g{g} M={M} {dt} {cpu_gemv_mode()}")
    # 8-bit codes at the int8 tier's row counts: held to Q8_TIGHT (see the test module) where the
    # int8 path runs, which the exact kernel's result would fail (so it shows the path taken).
    tight = cpu_gemv_mode() == "int8"
    for (N, K, g) in [(37, 1024, 128), (19, 4096, 4096), (23, 1024, 256), (21, 768, 64),
                      (13, 640, 32), (11, 576, 96), (9, 320, 320), (5, 448, 64)]:
        codes = torch.randint(0, 256, (N * K,), dtype=torch.uint8)
        scales = torch.rand(N * K // g) * 0.1 + 1e-3
        for zeros in (torch.rand(N * K // g) * 255, torch.randint(0, 256, (N * K // g,)).float()):
            W = R.decode_affine(codes, scales, zeros, 8, g, (N, K))
            for M in (1, 3, 8, 17, 32):
                if R.cpu_gemm_affine_takes_int8(M, K, 8, g) != tight:
                    bad.append(f"gemm 8 {N}x{K} g{g} M={M}: dispatch rule")
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    A = (torch.randn(M, K) + 0.3).to(dt)
                    y = ops.gemm_affine(A, codes, [N, K], scales, zeros, 8, g)
                    e = R.gemm_affine_expected(A, codes, (N, K), scales, zeros, 8, g)
                    terms = A.float().abs() @ W.abs().t()
                    bound = (2e-6 if tight else 5e-5) * terms + 1e-7
                    if dt != torch.float32:
                        bound = bound + 2.0**-7 * e.float().abs()
                    if not bool(((y.float() - e.float()).abs() <= bound).all()):
                        bad.append(f"gemm 8 tight {N}x{K} g{g} M={M} {dt} {cpu_gemv_mode()}")
    print("\n".join(bad))
    sys.exit(1 if bad else 0)
    """
)


@pytest.mark.parametrize("gemv", ["fp32", "int8"])
@pytest.mark.parametrize("isa", SUPPORTED)
def test_every_isa(isa, gemv):
    """Each ISA (forced with LOWBIT_CPU_ISA, fixed per process) against the references: the
    int8-activation kernel runs where LOWBIT_CPU_GEMV=int8 and the ISA has SIMD."""
    env = dict(os.environ, LOWBIT_CPU_ISA=isa, LOWBIT_CPU_GEMV=gemv)
    r = subprocess.run(
        [sys.executable, "-c", ISA_SCRIPT, isa], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dispatch_rule_documented():
    """reference.cpu_gemm_affine_takes_int8 is the rule gemm_affine_expected relies on."""
    int8 = cpu_gemv_mode() == "int8"
    assert R.cpu_gemm_affine_takes_int8(1, 4096, 4, 128) == int8
    assert R.cpu_gemm_affine_takes_int8(32, 4096, 4, 32) == int8
    assert not R.cpu_gemm_affine_takes_int8(33, 4096, 4, 128)
    assert R.cpu_gemm_affine_takes_int8(1, 4096, 8, 128) == int8
    assert R.cpu_gemm_affine_takes_int8(32, 4160, 8, 4160) == int8  # per channel, K % 256 == 64
    assert not R.cpu_gemm_affine_takes_int8(33, 4096, 8, 128)
    assert not R.cpu_gemm_affine_takes_int8(1, 4096, 8, 16)
    assert R.cpu_gemm_affine_takes_int8(1, 4032, 4, 96) == int8  # 96 % 32 == 0
    assert not R.cpu_gemm_affine_takes_int8(1, 4032, 4, 48)  # half chunks straddle groups
    assert not R.cpu_gemm_affine_takes_int8(1, 100, 4, 50)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)
def test_cuda_matches_cpu():
    """The CUDA kernels (tests/test_cuda_affine.py tests every tier) agree with the CPU ops:
    dequantize bit for bit, the product within the CPU's own bound of the exact reference."""
    packed, scales, zeros = _weight(8, 64, 4, 32)
    A = torch.randn(2, 64)
    y = ops.gemm_affine(A.cuda(), packed.cuda(), [8, 64], scales.cuda(), zeros.cuda(), 4, 32)
    assert y.is_cuda
    exact = R.gemm_affine(A, packed, [8, 64], scales, zeros, 4, 32)  # CUDA takes no int8 path
    W = R.decode_affine(packed, scales, zeros, 4, 32, (8, 64))
    assert bool(((y.cpu() - exact).abs() <= _bound(A, W, exact, torch.float32)).all())
    W = ops.dequantize_affine(packed, scales, zeros, 4, 32, [8, 64], torch.float16)
    Wc = ops.dequantize_affine(
        packed.cuda(), scales.cuda(), zeros.cuda(), 4, 32, [8, 64], torch.float16
    )
    assert torch.equal(Wc.cpu().view(torch.int16), W.view(torch.int16))
