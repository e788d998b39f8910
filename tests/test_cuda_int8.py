"""LLM.int8() on CUDA: the three-launch forward (fused quantize + device-side outlier columns,
cuBLASLt int8 GEMM, fused epilogue) against the CPU op on the same inputs.

Tolerances: with threshold 0 there is no float sum whose order is free (integer GEMM, then the CPU's
dequant expression), so the outputs are bit-identical. With outlier columns, their fp32 products are
summed in ascending column order on the GPU and in BLAS order on the CPU, so the outputs may differ
by the fp32 rounding of that sum (|diff| <= TOL * max|out| + TOL * |out|), then by one rounding to
the output dtype.
"""

import pytest
import torch

import lowbit  # noqa: F401  (registers the ops)
from lowbit.nn import Linear8bitLt

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
# The relative size of the sum-order error after the final rounding (see the module docstring).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CAPACITY = 256  # kInt8OutlierCapacity (csrc/include/lowbit/cuda_kernels.h)
THRESHOLD = 6.0


def assert_matches_cpu(out_gpu, out_cpu, dtype, exact):
    out_gpu = out_gpu.cpu()
    assert out_gpu.dtype == out_cpu.dtype and out_gpu.shape == out_cpu.shape
    if exact:
        iv = torch.int32 if dtype == torch.float32 else torch.int16
        diff = (out_gpu.view(iv) != out_cpu.view(iv)).sum().item()
        assert diff == 0, f"{diff} of {out_cpu.numel()} outputs differ in their bits"
        return
    a, e = out_gpu.double(), out_cpu.double()
    assert torch.isnan(a).eq(torch.isnan(e)).all()
    fin = torch.isfinite(e)
    scale = e[fin].abs().max().item() if fin.any() else 1.0
    tol = TOL[dtype]
    err = (a[fin] - e[fin]).abs()
    bound = tol * scale + tol * e[fin].abs()
    assert (err <= bound).all(), f"max error {err.max().item()} (scale {scale})"


def inputs(M, K, N, dtype, outlier_cols=(), seed=0, bias=True):
    """Activations without outliers (|a| <= 5) except in `outlier_cols`, where one row each holds
    +-(6..10); W int8 in the full quantizer range, W_scale > 0."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(M, K, generator=g) * 1.5).clamp(-5.0, 5.0)
    for i, c in enumerate(outlier_cols):
        r = (i * 7 + 3) % M
        A[r, c] = (6.0 + 4.0 * torch.rand((), generator=g).item()) * (1 if i % 2 else -1)
    W = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    W_scale = torch.rand(N, generator=g) * 0.02 + 0.005
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return A.to(dtype), W, W_scale, b


def run_both(A, W, W_scale, bias, threshold):
    out = ops.int8_linear(A, W, W_scale, bias, threshold)
    outc = ops.int8_linear(
        A.cuda(), W.cuda(), W_scale.cuda(), None if bias is None else bias.cuda(), threshold
    )
    return outc, out


# ---- the int8 product --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M,K,N",
    [
        (1, 4096, 4096),  # decode: cuBLASLt below torch._int_mm's M > 16
        (16, 4096, 1024),
        (17, 1024, 512),
        (300, 2048, 768),
        (7, 131068, 8),  # the largest K % 4 == 0 under the int32 bound
        (5, 131071, 3),  # the int32 bound itself, odd K and N: the dp4a fallback
        (33, 63, 65),  # odd everything: the dp4a fallback
    ],
    ids=str,
)
def test_int8_matmul_int32_exact(M, K, N):
    """The int32 product against an exact int64 reference, including -128 * -128 runs."""
    g = torch.Generator().manual_seed(M * 7 + N)
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    A[0, :] = -128  # row 0 x column 0: 128 * 128 * K, the largest sum there is
    B[0, :] = -128
    expected = (A.long() @ B.long().t()).to(torch.int32)
    assert expected[0, 0].item() == 128 * 128 * K
    got = ops.int8_linear_matmul(A.cuda(), B.cuda()).cpu()
    assert torch.equal(got, expected)


def device_kernels(fn):
    """Names of the device events (kernels, memsets, copies) of one fn() call after a warm-up."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


@pytest.mark.parametrize("M", [1, 16, 17, 256])
def test_int8_matmul_runs_on_cublaslt(M):
    """K and N multiples of 4: one kernel, cuBLASLt's (not lowbit's dp4a fallback, which a build
    that did not find cuBLASLt would use: see csrc/kernels/cuda/CMakeLists.txt)."""
    A = torch.randint(-127, 128, (M, 512), dtype=torch.int8, device="cuda")
    B = torch.randint(-127, 128, (256, 512), dtype=torch.int8, device="cuda")
    names = device_kernels(lambda: ops.int8_linear_matmul(A, B))
    assert len(names) == 1, names
    assert "int8_gemm_tiled" not in names[0] and "int8_gemm_skinny" not in names[0], names


def test_int8_matmul_out_views():
    """.out into a strided view and misaligned operands (cuBLASLt needs 4-byte alignment)."""
    M, K, N = 20, 256, 64
    A = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    B = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    expected = (A.long() @ B.long().t()).int()
    out = torch.empty(M, 2 * N, dtype=torch.int32, device="cuda")[:, ::2]
    ops.int8_linear_matmul.out(A.cuda(), B.cuda(), out=out)
    assert torch.equal(out.cpu(), expected)
    flat = torch.empty(M * K + 1, dtype=torch.int8, device="cuda")
    flat[1:] = A.reshape(-1).cuda()
    assert torch.equal(ops.int8_linear_matmul(flat[1:].view(M, K), B.cuda()).cpu(), expected)


# ---- the fused forward -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize(
    "M,K,N",
    [
        (1, 4096, 1024),
        (3, 1000, 260),
        (16, 512, 128),
        (17, 384, 96),
        (129, 520, 200),
        (45, 33, 7),
        (4, 65536, 64),  # the largest one-block quantize: 4 rows x 2^16 = 2^18 elements
        (4, 65540, 64),  # four elements more: the cooperative grid, 4 rows
        (5, 1024, 64),  # one row more than one block takes: the cooperative grid, 5 rows
    ],
    ids=str,
)
def test_int8_linear_matches_cpu(dtype, threshold, M, K, N):
    A, W, S, b = inputs(M, K, N, dtype, outlier_cols=[3, K - 1] if K > 4 else [0])
    outc, out = run_both(A, W, S, b, threshold)
    assert_matches_cpu(outc, out, dtype, exact=threshold == 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "count", [0, 1, CAPACITY - 1, CAPACITY, CAPACITY + 1, 3 * CAPACITY + 5, "all"]
)
@pytest.mark.parametrize(
    "M,K,N",
    [(1, 2048, 512), (3, 1024, 300), (8, 65536, 64), (70, 1536, 260)],
    ids=["one-block", "one-block-3", "grid-few-rows", "grid"],
)
def test_outlier_counts(dtype, count, M, K, N):
    """Any number of outlier columns gives the CPU's answer: below, at and above the gather
    capacity (beyond it the epilogue reads A and W in place), and every column an outlier."""
    n = K if count == "all" else min(count, K)
    g = torch.Generator().manual_seed(n)
    cols = torch.randperm(K, generator=g)[:n].tolist()
    A, W, S, b = inputs(M, K, N, dtype, outlier_cols=cols, seed=n)
    if count == "all":
        A[0, :] = 7.5  # one row carries all of them
    outc, out = run_both(A, W, S, b, THRESHOLD)
    assert_matches_cpu(outc, out, dtype, exact=n == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [2, 40])
def test_value_exactly_at_threshold(dtype, M):
    """|a| == threshold is an outlier (>=); the largest value below it is not."""
    K, N = 256, 64
    A, W, S, b = inputs(M, K, N, dtype)
    A[1, 10] = THRESHOLD  # exactly representable in every dtype
    # The largest value below 6 in each dtype: 6 minus one unit in the last place of [4, 8).
    ulp = {torch.float32: 2.0**-21, torch.float16: 2.0**-8, torch.bfloat16: 2.0**-5}[dtype]
    A[0, 20] = -(THRESHOLD - ulp)
    assert A[0, 20].item() == -(THRESHOLD - ulp)
    q, _, cols = ops.int8_vectorwise_quant(A, THRESHOLD)
    assert cols.tolist() == [10]
    outc, out = run_both(A, W, S, b, THRESHOLD)
    assert_matches_cpu(outc, out, dtype, exact=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_special_rows(dtype):
    """Zero rows, NaN rows, tiny rows and +-Inf outliers: the CPU's row scales and NaN placement."""
    M, K, N = 24, 128, 32
    A, W, S, b = inputs(M, K, N, dtype)
    A[0] = 0.0
    A[1, 7] = float("nan")
    A[2, 9] = float("inf")  # an outlier with a threshold
    A[3] = 1e-38  # subnormal absmax: 127 / absmax overflows, the kernels divide first
    for threshold in (0.0, THRESHOLD):
        outc, out = run_both(A, W, S, b, threshold)
        assert_matches_cpu(outc, out, dtype, exact=threshold == 0.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_large_k(dtype):
    """K = 131,071 (the int32 bound; odd, so the dp4a GEMM) and K = 131,068 (cuBLASLt)."""
    for K in (131071, 131068):
        A, W, S, b = inputs(3, K, 12, dtype, outlier_cols=[0, K // 2, K - 1])
        for threshold in (0.0, THRESHOLD):
            outc, out = run_both(A, W, S, b, threshold)
            assert_matches_cpu(outc, out, dtype, exact=threshold == 0.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_more_rows_than_the_cooperative_grid(dtype):
    """More rows than the cooperative quantize grid holds (at most 4 blocks of 512 threads per SM),
    so each block quantizes, zeroes and gathers several rows, with outlier columns above the gather
    capacity. Unaligned K (1-element loads) first, then K % 8 == 0 (16-byte loads): the two kernels
    have different register counts and so different co-resident grid limits, which a shared cache
    of that limit once mixed up (a launch error at M > 3 * SMs for fp16)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    M, N = 4 * sms * 2 + 3, 96
    for K, n_cols in ((1001, 5), (1024, CAPACITY + 40)):
        g = torch.Generator().manual_seed(K)
        cols = torch.randperm(K, generator=g)[:n_cols].tolist()
        A, W, S, b = inputs(M, K, N, dtype, outlier_cols=cols, seed=K)
        outc, out = run_both(A, W, S, b, THRESHOLD)
        assert_matches_cpu(outc, out, dtype, exact=False)
        outc0, out0 = run_both(A.clamp(-5.0, 5.0), W, S, b, 0.0)
        assert_matches_cpu(outc0, out0, dtype, exact=True)


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize(
    "a_dtype,bias_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
    ids=["bf16-f32bias", "f32-bf16bias", "f16-bf16bias"],
)
def test_bias_of_another_dtype(a_dtype, bias_dtype, threshold):
    """The epilogue reads the bias in its own dtype (a second template parameter), as the CPU does."""
    A, W, S, _ = inputs(20, 256, 72, a_dtype, outlier_cols=[7, 200])
    b = torch.randn(72, generator=torch.Generator().manual_seed(1)).to(bias_dtype)
    outc, out = run_both(A, W, S, b, threshold)
    assert_matches_cpu(outc, out, a_dtype, exact=threshold == 0.0)


def test_leading_dims_and_noncontiguous():
    A, W, S, b = inputs(4 * 9, 256, 80, torch.bfloat16, outlier_cols=[5, 100])
    A3 = A.view(4, 9, 256)
    outc, out = run_both(A3, W, S, b, THRESHOLD)
    assert outc.shape == (4, 9, 80)
    assert_matches_cpu(outc, out, torch.bfloat16, exact=False)
    wide = torch.zeros(4, 9, 512, dtype=torch.bfloat16, device="cuda")
    wide[..., ::2] = A3.cuda()
    outs = ops.int8_linear(wide[..., ::2], W.cuda(), S.cuda(), b.cuda(), THRESHOLD)
    assert_matches_cpu(outs, out, torch.bfloat16, exact=False)


# ---- CUDA graphs, torch.compile, launches ------------------------------------------------------


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


@pytest.mark.parametrize("M", [1, 64], ids=["one-block", "grid"])
def test_graph_replay_with_new_outliers(M):
    """One capture, replayed on inputs whose outlier columns differ each time (none, a few, above
    the capacity): every replay gives the CPU's answer for its own input."""
    K, N, dtype = 1024, 256, torch.bfloat16
    A0, W, S, b = inputs(M, K, N, dtype, outlier_cols=[1, 2])
    static_a = A0.cuda()
    Wc, Sc, bc = W.cuda(), S.cuda(), b.cuda()
    g, out = capture(lambda: ops.int8_linear(static_a, Wc, Sc, bc, THRESHOLD))
    for seed, cols in enumerate([[], [900], [5, 77, 1023], list(range(0, K, 3))]):
        A, _, _, _ = inputs(M, K, N, dtype, outlier_cols=cols, seed=seed + 10)
        static_a.copy_(A.cuda())
        g.replay()
        torch.cuda.synchronize()
        expected = ops.int8_linear(A, W, S, b, THRESHOLD)
        assert_matches_cpu(out.clone(), expected, dtype, exact=not cols)


def make_layer(K, N, threshold, dtype=torch.bfloat16):
    lin = torch.nn.Linear(K, N, bias=True).to(dtype)
    layer = Linear8bitLt.from_linear(lin, threshold=threshold)
    return layer.cuda()


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("M", [1, 16, 17, 2048])
def test_at_most_three_launches(threshold, M):
    """A Linear8bitLt forward enqueues at most three kernels (memsets and copies counted too)."""
    K, N = 1024, 512
    layer = make_layer(K, N, threshold)
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda").clamp(-5, 5)
    x[0, 7] = 9.0  # one outlier column
    with torch.no_grad():
        names = device_kernels(lambda: layer(x))
    assert 1 <= len(names) <= 3, names


def test_linear8bitlt_compile_fullgraph_and_cuda_graph():
    """threshold 6.0: torch.compile(fullgraph=True) traces it, and an eager capture replays it."""
    K, N = 512, 256
    layer = make_layer(K, N, THRESHOLD)
    x = torch.randn(8, K, dtype=torch.bfloat16, device="cuda").clamp(-5, 5)
    x[3, 11] = -8.0
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
        static_x = x.clone()
        g, out = capture(lambda: layer(static_x))
        x2 = torch.randn_like(x).clamp(-5, 5)
        x2[5, 200] = 7.0
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, layer(x2), rtol=0, atol=0)


def test_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of an int8 MLP with threshold 6.0: no
    skipped graph (a host sync or CPU op in the forward would make inductor skip the CUDA graph and
    still give the eager numbers), and each replay on new activations with other outlier columns
    gives eager's bits."""
    pytest.importorskip("triton")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    K, N = 512, 256
    mlp = torch.nn.Sequential(make_layer(K, N, THRESHOLD), torch.nn.ReLU(), make_layer(N, K, 6.0))
    with torch.no_grad():
        compiled = torch.compile(mlp, mode="reduce-overhead", fullgraph=True)
        for i in range(5):  # warm-up, record, replays
            x = torch.randn(4, K, dtype=torch.bfloat16, device="cuda").clamp(-5, 5)
            x[i % 4, (37 * i + 3) % K] = 9.0  # another outlier column each call
            if i == 4:
                x[:, : CAPACITY + 8] = 7.0  # more outlier columns than the gather capacity
            got = compiled(x).clone()
            torch.testing.assert_close(got, mlp(x), rtol=0, atol=0)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
