"""LLM.int8(): row quantization with outliers, int8 GEMM, dequantization and the fused layer."""

import ctypes

import pytest
import torch

import lowbit
import lowbit.functional as F
from conftest import non_contiguous
from lowbit import reference
from lowbit._native import cpu_isa

ops = torch.ops.lowbit


def with_outliers(M, K, cols, device, dtype, magnitude=20.0):
    A = torch.randn(M, K, device=device)
    A[:, cols] *= magnitude
    return A.to(dtype)


@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (7, 33), (128, 512), (2, 3, 65)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_vectorwise_quant_matches_reference(device, dtype, shape, threshold):
    A = torch.randn(shape, device=device) * 3
    A = A.to(dtype)
    q, stats, cols = ops.int8_vectorwise_quant(A, threshold)
    rq, rstats, rcols = reference.int8_vectorwise_quant(A, threshold)
    assert q.dtype == torch.int8 and q.shape == A.shape
    assert torch.equal(stats, rstats)
    assert torch.equal(q, rq)
    if threshold == 0.0:
        assert cols is None and rcols is None
    else:
        assert torch.equal(cols, rcols)


def test_vectorwise_quant_outlier_columns(device, dtype):
    A = with_outliers(16, 64, [3, 40], device, dtype)
    A[:, 3] = A[:, 3].sign() * 20  # every element of the column is an outlier
    A[5, 40] = 0.5  # a column is an outlier column when any of its elements is
    q, stats, cols = ops.int8_vectorwise_quant(A, 6.0)
    assert cols.tolist() == [3, 40]
    assert torch.all(q[:, [3, 40]] == 0)
    # row scale ignores outliers: every row's absmax is that of its other elements
    kept = A.float().clone()
    kept[kept.abs() >= 6.0] = 0
    torch.testing.assert_close(stats, kept.abs().amax(1), rtol=0, atol=0)


def test_vectorwise_quant_rounds_half_to_even():
    # absmax 127 makes the scale exactly 1, so the codes are round-half-even of the values.
    A = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -126.5]])
    q, stats, _ = ops.int8_vectorwise_quant(A, 0.0)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 3, -126]]


def test_vectorwise_dequant(device):
    A = torch.randn(9, 70, device=device)
    q, stats, _ = ops.int8_vectorwise_quant(A)
    out = ops.int8_vectorwise_dequant(q, stats)
    assert torch.equal(out, reference.int8_vectorwise_dequant(q, stats))
    assert (out - A).abs().max() <= stats.max() / 127


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 64, 64), (5, 17, 33), (128, 96, 256), (3, 4, 0)])
def test_int8_matmul_exact(device, M, N, K):
    A = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    B = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    C = ops.int8_linear_matmul(A, B)
    assert C.dtype == torch.int32 and C.shape == (M, N)
    assert torch.equal(C, reference.int8_linear_matmul(A, B))


def test_int8_matmul_leading_dims_out_and_strides(device):
    A = torch.randint(-127, 128, (2, 3, 40), dtype=torch.int8, device=device)
    B = torch.randint(-127, 128, (24, 40), dtype=torch.int8, device=device)
    C = ops.int8_linear_matmul(A, B)
    assert C.shape == (2, 3, 24)
    out = torch.empty(2, 3, 24, dtype=torch.int32, device=device)
    ops.int8_linear_matmul.out(A, B, out=out)
    assert torch.equal(out, C)
    assert torch.equal(ops.int8_linear_matmul(non_contiguous(A), B), C)


def test_int8_matmul_at_the_int32_limit():
    # 128 * 128 * 131071 = 2147467264 < 2**31: the largest K that cannot overflow for any codes,
    # -128 included (the kernels' sign trick and widening paths both hold it).
    K = 131071
    A = torch.full((1, K), -128, dtype=torch.int8)
    B = torch.full((3, K), -128, dtype=torch.int8)
    B[1] = 127
    B[2, ::2] = 127
    C = ops.int8_linear_matmul(A, B)
    assert C.tolist() == [[128 * 128 * K, -128 * 127 * K, -128 * 127 * 65536 + 128 * 128 * 65535]]
    A127 = torch.full((1, K), 127, dtype=torch.int8)
    assert ops.int8_linear_matmul(A127, B[1:2]).tolist() == [[127 * 127 * K]]
    # one more would let (-128)^2 products pass 2**31 - 1: refused before any work
    for k in (K + 1, 133144):
        with pytest.raises(ValueError, match=f"K = {k} exceeds 131071"):
            ops.int8_linear_matmul(
                torch.ones(1, k, dtype=torch.int8), torch.ones(2, k, dtype=torch.int8)
            )


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_dequant(device, out_dtype, with_bias):
    C = torch.randint(-(2**20), 2**20, (7, 33), dtype=torch.int32, device=device)
    row = torch.rand(7, device=device) * 4
    col = torch.rand(33, device=device) * 4
    bias = torch.randn(33, device=device).to(out_dtype) if with_bias else None
    out = ops.int8_mm_dequant(C, row, col, out_dtype, bias)
    ref = reference.int8_mm_dequant(C, row, col, out_dtype, bias)
    assert out.dtype == out_dtype
    assert torch.equal(out, ref)


def test_mm_dequant_defaults_to_float16_like_bitsandbytes():
    C = torch.ones(2, 3, dtype=torch.int32)
    assert ops.int8_mm_dequant(C, torch.ones(2), torch.ones(3)).dtype == torch.float16


@pytest.mark.parametrize("M", [1, 17, 64])
def test_int8_linear_accuracy_with_planted_outliers(device, dtype, M):
    # The bitsandbytes bar: at most 1.75% of elements outside atol 0.01 / rtol 0.1 of the fp32
    # product of the same int8-dequantized weight; outlier columns go through floating point.
    K, N = 512, 256
    A = with_outliers(M, K, [7, 100, 300], device, dtype)
    W_float = torch.randn(N, K, device=device)
    W, SCB, _ = ops.int8_vectorwise_quant(W_float)
    bias = torch.randn(N, device=device).to(dtype)
    out = ops.int8_linear(A, W, SCB, bias, 6.0)
    assert out.dtype == dtype and out.shape == (M, N)
    expected = A.float() @ reference.int8_weight_dequant(W, SCB).t() + bias.float()
    scale = expected.abs().mean()
    bad = ~torch.isclose(out.float() / scale, expected / scale, atol=0.01, rtol=0.1)
    assert bad.float().mean().item() <= 0.0175
    torch.testing.assert_close(
        out.float(),
        reference.int8_linear(A, W, SCB, bias, 6.0).float(),
        rtol=2e-2,
        atol=2e-2 * scale.item(),
    )


def test_int8_linear_outlier_columns_are_computed_in_floating_point():
    # With the outlier column's activations huge, an int8 path would lose the small ones; the
    # float path gets the exact product for that column.
    K, N = 64, 8
    A = torch.zeros(2, K)
    A[:, 5] = torch.tensor([1000.0, 7.0])
    W_float = torch.randn(N, K)
    W, SCB, _ = ops.int8_vectorwise_quant(W_float)
    out = ops.int8_linear(A, W, SCB, None, 6.0)
    expected = A @ reference.int8_weight_dequant(W, SCB).t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    # without the split the 7.0 row quantizes against itself: still close, but int8-rounded
    no_split = ops.int8_linear(A, W, SCB, None, 0.0)
    torch.testing.assert_close(no_split, expected, rtol=0.02, atol=0.5)


def test_int8_linear_bf16_large_activations_do_not_overflow():
    # bf16 activations far beyond float16's range: never routed through float16.
    A = torch.randn(4, 128, dtype=torch.bfloat16) * 1e6
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(16, 128))
    out = ops.int8_linear(A, W, SCB, None, 0.0)
    assert torch.isfinite(out).all() and out.abs().max() > 1e6


def test_int8_linear_k_zero_gives_bias(device):
    bias = torch.randn(5, device=device)
    out = ops.int8_linear(
        torch.empty(3, 0, device=device),
        torch.empty(5, 0, dtype=torch.int8, device=device),
        torch.ones(5, device=device),
        bias,
        6.0,
    )
    assert torch.equal(out, bias.expand(3, 5))


def test_int8_linear_gradient_reaches_the_input():
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(16, 32))
    A = torch.randn(3, 32, requires_grad=True)
    F.int8_linear(A, W, SCB, None, 6.0).sum().backward()
    torch.testing.assert_close(A.grad, reference.int8_weight_dequant(W, SCB).sum(0).expand(3, 32))


def test_int8_double_quant():
    A = torch.randn(20, 30)
    q_row, q_col, s_row, s_col, _ = F.int8_double_quant(A)
    assert torch.equal(q_row, ops.int8_vectorwise_quant(A)[0])
    assert torch.equal(q_col, ops.int8_vectorwise_quant(A.t().contiguous())[0].t())
    assert s_row.shape == (20,) and s_col.shape == (30,)


# ---- the CPU GEMM kernels by M: packed (outer-product) and dot-product -------------------------
#
# On AVX-512 VNNI the int8 GEMM packs B into the VNNI layout and runs an outer-product
# micro-kernel from some M on, and the dot-product kernel below it (avx512_int8_gemm.cpp). The
# test hook lowbit_cpu_int8_gemm_packed_min_m moves that threshold, so each kernel is checked on
# every shape whatever the default; the AVX2 and generic kernels are checked against these same
# products per ISA in tests/test_cpu_isa.py (LOWBIT_CPU_ISA).


def _packed_min_m_hook():
    try:
        fn = ctypes.CDLL(lowbit._C.__file__).lowbit_cpu_int8_gemm_packed_min_m
    except AttributeError:  # a build without x86 kernels
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64]
    return fn


@pytest.fixture(params=["packed", "dot"])
def int8_kernel(request):
    hook = _packed_min_m_hook()
    if hook is None or cpu_isa() != "avx512":
        pytest.skip(
            f"the packed / dot-product int8 GEMM kernels are AVX-512 VNNI ones; this process "
            f"runs the {cpu_isa()} kernels (covered per ISA in tests/test_cpu_isa.py)"
        )
    previous = hook(1 if request.param == "packed" else 1 << 62)
    try:
        yield request.param
    finally:
        hook(previous)


def exact_product(A, B):
    # float64 holds every partial sum exactly (|C| < 2**31 < 2**53) and multiplies through BLAS:
    # far faster than the int64 reference on the large cases, and just as exact.
    return (A.double() @ B.double().t()).to(torch.int32)


def test_packed_min_m_hook_round_trips():
    hook = _packed_min_m_hook()
    if hook is None:
        pytest.skip("a build without x86 kernels has no AVX-512 int8 GEMM")
    default = hook(-1)
    assert default >= 1
    assert hook(7) == default and hook(-1) == 7
    assert hook(default) == 7 and hook(-1) == default


@pytest.mark.parametrize("M", [5, 33, 128, 257])
@pytest.mark.parametrize("K", [1, 3, 4, 63, 64, 65, 384, 4099])
def test_int8_gemm_kernels_exact_on_edges(int8_kernel, M, K):
    # Every M edge of the 8-row micro-tile (and of the 4-row dot tiles), N edges of the 16-column
    # vectors and 32-column panels, K tails of the 4-byte k-steps and 64-byte loads.
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    for N in [1, 15, 16, 17, 33, 384]:
        B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        C = ops.int8_linear_matmul(A, B)
        assert C.dtype == torch.int32 and C.shape == (M, N)
        assert torch.equal(C, exact_product(A, B)), (int8_kernel, M, N, K)


@pytest.mark.parametrize("a_value", [-128, 127])
@pytest.mark.parametrize("b_value", [-128, 127])
@pytest.mark.parametrize("K", [4099, 131071])
def test_int8_gemm_kernels_extreme_values(int8_kernel, a_value, b_value, K):
    # The biased sums (b + 128) * a reach 255 * 128 * K, far past int32 at K = 131071: they wrap,
    # and the correction brings C back exactly.
    M, N = 9, 35
    A = torch.full((M, K), a_value, dtype=torch.int8)
    B = torch.full((N, K), b_value, dtype=torch.int8)
    A[3, ::2] = -a_value - 1 if a_value == 127 else 127  # mixed rows too
    B[20, 1::3] = -128
    C = ops.int8_linear_matmul(A, B)
    assert torch.equal(C, exact_product(A, B))
    assert C[0, 0].item() == a_value * b_value * K


def test_int8_gemm_kernels_non_contiguous_and_leading_dims(int8_kernel):
    A = torch.randint(-128, 128, (3, 43, 200), dtype=torch.int8)
    B = torch.randint(-128, 128, (70, 200), dtype=torch.int8)
    want = exact_product(A.reshape(-1, 200), B).reshape(3, 43, 70)
    assert torch.equal(ops.int8_linear_matmul(non_contiguous(A), B), want)
    assert torch.equal(ops.int8_linear_matmul(A, non_contiguous(B)), want)
    B_t = B.t().contiguous().t()  # column-major view of the same values
    assert torch.equal(
        ops.int8_linear_matmul(A.transpose(0, 1).contiguous().transpose(0, 1), B_t), want
    )
    out = torch.empty(3, 70, 43, dtype=torch.int32).transpose(1, 2)  # non-contiguous out=
    ops.int8_linear_matmul.out(A, B, out=out)
    assert torch.equal(out, want)


@pytest.mark.parametrize("M", [128, 257, 512])
def test_int8_linear_same_result_from_either_kernel(M):
    # The whole op on prefill sizes (outlier columns, bias, bf16): the kernels give the same int32
    # product, so the layer output is bit-identical; and it stays close to the reference.
    hook = _packed_min_m_hook()
    if hook is None or cpu_isa() != "avx512":
        pytest.skip(f"needs the AVX-512 int8 GEMM kernels; this process runs {cpu_isa()}")
    K, N = 384, 1536
    A = with_outliers(M, K, [5, 200], "cpu", torch.bfloat16)
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(N, K))
    bias = torch.randn(N).to(torch.bfloat16)
    previous = hook(1)
    try:
        packed = ops.int8_linear(A, W, SCB, bias, 6.0)
        hook(1 << 62)
        dot = ops.int8_linear(A, W, SCB, bias, 6.0)
    finally:
        hook(previous)
    assert torch.equal(packed, dot)
    ref = reference.int8_linear(A, W, SCB, bias, 6.0).float()
    torch.testing.assert_close(packed.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_many_outlier_columns_across_row_blocks(dtype):
    # The CPU op adds the outlier columns' product per block of rows (65536 // N rows each) into
    # the dequantized fp32 rows: several blocks and threads, N not a multiple of 8 (the tail of
    # the vectorized update), 40 outlier columns, a bias of another dtype.
    M, N, K = 600, 250, 96
    cols = list(range(0, K, 96 // 40 + 1))[:40]
    A = with_outliers(M, K, cols, "cpu", dtype, magnitude=30.0)
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(N, K))
    bias = torch.randn(N)
    out = ops.int8_linear(A, W, SCB, bias, 6.0)
    ref = reference.int8_linear(A, W, SCB, bias, 6.0)
    assert out.dtype == dtype and out.shape == (M, N)
    # Only the order of the fp32 outlier sums differs from the reference (then one rounding).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)
    _, _, found = ops.int8_vectorwise_quant(A, 6.0)
    assert found.numel() >= 30  # the outlier path really ran
