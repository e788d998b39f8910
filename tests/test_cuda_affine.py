"""The affine 4/8-bit ops (issue #13) on CUDA against their references, and LinearAffine on CUDA.

quantize_affine: codes, scales and zeros bit for bit with lowbit.reference.quantize_affine (the
CPU op is the same, tests/test_ops_affine.py). dequantize_affine: bit for bit with the CPU op in
every output dtype, NaN groups included (the CUDA kernel writes the CPU's NaN bits).

gemm_affine picks a tier in C++ (cuda::plan_gemm_affine: plan_gemm_4bit's table for 4-bit codes in
groups of a multiple of 32; for 8-bit codes, other group sizes and wherever the 4-bit table says
"generic" (misaligned data), the affine GEMV at M <= 8 and dequantize + cuBLAS above);
LOWBIT_GEMM4_FORCE pins a tier as for NF4 ("generic" runs dequantize + cuBLAS here, "affgemv[:W]"
the affine GEMV). Reference: the weight decoded exactly (reference.decode_affine) times A in float64,
plus the bias. Tolerances on the relative Frobenius error ||out - ref|| / ||ref||, as in
tests/test_cuda_4bit.py: fp32 activations 1e-5 (fp32 sums in any order; the GEMV subtracts
zero * sum(x) per 32-element vector, cuBLAS fp32 with TF32 off, torch's default); fp16 2e-3 and
bf16 1.2e-2 (the output is rounded to the dtype, and the tensor-core and cuBLAS tiers also round
each decoded weight to the dtype, as dequantize_affine(dtype) + matmul does). Each element must
also lie within a loose bound (no single wrong element hides in the norm), and NaN never passes
where the reference has none.
"""

import pytest
import torch

from lowbit import reference as R

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ELEM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def weight(N, K, bits, g, *, fractional_zeros=False):
    """An affine weight on the CPU: (packed, scales, zeros). Integer zeros come from the quantizer
    on a random matrix (GPTQ/AWQ-like); fractional zeros (HQQ-like) with random codes."""
    if not fractional_zeros:
        return R.quantize_affine(torch.randn(N, K), bits, g, False)
    n = N * K
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    if bits == 4:
        padded = torch.cat([codes, codes.new_zeros(n % 2)])
        packed = ((padded[0::2] << 4) | padded[1::2]).to(torch.uint8)
    else:
        packed = codes
    groups = n // g
    scales = torch.rand(groups) * 0.1 + 1e-3
    zeros = torch.rand(groups) * (2**bits - 1)
    return packed, scales, zeros


def cuda(*ts):
    return [t.cuda() for t in ts]


def force(monkeypatch, tier):
    if tier is None:
        monkeypatch.delenv("LOWBIT_GEMM4_FORCE", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_GEMM4_FORCE", tier)


def check(out, A, W, bias=None):
    """out (CUDA) against A @ W^T (+ bias) in float64."""
    ref = A.cpu().double().reshape(-1, W.shape[1]) @ W.double().T
    if bias is not None:
        ref = ref + bias.cpu().double()
    ref = ref.reshape(*A.shape[:-1], W.shape[0])
    assert out.dtype == A.dtype and out.shape == ref.shape
    got = out.cpu().double()
    assert not got.isnan().any(), "NaN in the output"
    if ref.numel() == 0:
        return
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL[A.dtype], f"relative error {rel:.3g} >= {REL_TOL[A.dtype]}"
    terms = A.cpu().double().reshape(-1, W.shape[1]).abs() @ W.double().abs().T
    scale = terms.reshape(ref.shape) / max(W.shape[1], 1) ** 0.5
    bound = ELEM_TOL[A.dtype] * (ref.abs() + scale) + 1e-6
    bad = (got - ref).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} elements off, first at {bad.nonzero()[:4].tolist()}"


def gemm(A, packed, N, K, scales, zeros, bits, g, bias=None):
    dev = A.device
    b = None if bias is None else bias.to(dev)
    return ops.gemm_affine(A, packed.to(dev), [N, K], scales.to(dev), zeros.to(dev), bits, g, b)


# ---- quantize_affine ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "N,K,g",
    [(64, 4096, 128), (33, 128, 64), (7, 384, 32), (9, 70, 70), (3, 9, 3), (5, 7, 7), (1, 1, 1)],
)
def test_quantize_matches_reference(bits, symmetric, dtype, N, K, g):
    """Codes, scales and zeros bit for bit (odd group sizes share bytes between groups, odd N * K
    pads the last low nibble with 0)."""
    A = (torch.randn(N, K) * 3).to(dtype)
    got = ops.quantize_affine(A.cuda(), bits, g, symmetric)
    want = R.quantize_affine(A, bits, g, symmetric)
    for a, b in zip(got, want):
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_special_groups(bits, symmetric):
    """Zero groups, NaN/Inf groups, an underflowing range, a range that overflows fp32 and -0.0
    elements: the reference's scales (NaN bits too), zeros and codes."""
    A = torch.randn(8, 64)
    A[0] = 0.0
    A[1, 5] = float("nan")
    A[2, 7] = float("-inf")
    A[3] = 1e-45
    A[4, :32] = 3e38
    A[4, 32:] = -3e38
    A[5, :32] = torch.linspace(-2, 5, 32)
    A[6, :32] = -0.0
    A[7, 32:] = torch.linspace(0, 1, 32)  # lo = 0 exactly: zero must be +0.0
    got = ops.quantize_affine(A.cuda(), bits, 32, symmetric)
    want = R.quantize_affine(A, bits, 32, symmetric)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


def test_quantize_non_contiguous():
    A = torch.randn(64, 256)
    At = A.cuda().t().contiguous().t()  # same values, column-major
    for a, b in zip(ops.quantize_affine(At, 4, 64, False), R.quantize_affine(A, 4, 64, False)):
        assert torch.equal(a.cpu(), b)


# ---- dequantize_affine -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize(
    "N,K,g", [(64, 4096, 128), (33, 256, 32), (17, 192, 64), (5, 70, 70), (7, 9, 3), (3, 10, 2)]
)
def test_dequantize_bit_exact(bits, dtype, fractional, N, K, g):
    packed, scales, zeros = weight(N, K, bits, g, fractional_zeros=fractional)
    got = ops.dequantize_affine(*cuda(packed, scales, zeros), bits, g, [N, K], dtype)
    want = ops.dequantize_affine(packed, scales, zeros, bits, g, [N, K], dtype)
    assert got.is_cuda and got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got.cpu().view(INT_VIEW[dtype]), want.view(INT_VIEW[dtype]))
    if dtype == torch.float32:
        ref = R.dequantize_affine(packed, scales, zeros, bits, g, (N, K), dtype)
        assert torch.equal(got.cpu().view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_special_and_misaligned(bits):
    """NaN and zero scales decode as on the CPU (NaN bits included); a packed view that starts at
    an odd address."""
    N, K, g = 12, 96, 32
    packed, scales, zeros = weight(N, K, bits, g)
    scales[3] = float("nan")
    scales[5] = 0.0
    flat = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    flat[1:] = packed.cuda()
    for dtype in FLOAT_DTYPES:
        got = ops.dequantize_affine(flat[1:], *cuda(scales, zeros), bits, g, [N, K], dtype)
        want = ops.dequantize_affine(packed, scales, zeros, bits, g, [N, K], dtype)
        assert torch.equal(got.cpu().view(INT_VIEW[dtype]), want.view(INT_VIEW[dtype]))


# ---- gemm_affine -------------------------------------------------------------------------------

TIERS = [None, "gemv", "gemv:1:1", "gemv:8:4", "gemv:2:2", "mma", "mma:0", "mma:1", "mma:2"]
TIERS += ["mma:0:4", "mma:2:3", "dequant", "generic"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "M,N,K,g",
    [
        (1, 201, 512, 64),  # N not a multiple of any tile (8, 128) nor of the gemv's columns
        (3, 130, 96, 32),  # one partial k-tile
        (8, 64, 2048, 128),  # small N: the gemv splits K inside the block
        (16, 257, 1024, 1024),  # per channel (group = K)
        (37, 136, 384, 96),  # a group size that is not a power of two (FastDiv32), M tails
        (2048, 72, 256, 64),  # M = 2048
        (2, 72, 640, 128),  # M = 2: the gemv's two-row instantiation (MT = 2)
        (6, 40, 4096, 32),  # M = 6 (MT = 8, two rows idle), long K: split K in the gemv and mma
    ],
)
def test_tier(monkeypatch, tier, dtype, M, N, K, g):
    """Every tier on shapes that hit its tails, 4-bit codes with integer zeros, with a bias; a tier
    that cannot run a shape falls back to the table, which is checked the same way."""
    force(monkeypatch, tier)
    packed, scales, zeros = weight(N, K, 4, g)
    W = R.decode_affine(packed, scales, zeros, 4, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g), A, W)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g, bias.to(dtype)), A, W, bias.to(dtype))


@pytest.mark.parametrize("tier", [None, "gemv", "mma", "mma:2:4", "dequant"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 5, 16, 100, 2048])
def test_fractional_zeros_fp32_bias(monkeypatch, tier, dtype, M):
    """HQQ-like fractional zeros, and an fp32 bias with 16-bit activations (added in fp32 before
    the one rounding, in every tier including split-K's reduction)."""
    force(monkeypatch, tier)
    N, K, g = 150, 1024, 64
    packed, scales, zeros = weight(N, K, 4, g, fractional_zeros=True)
    W = R.decode_affine(packed, scales, zeros, 4, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    bias = torch.randn(N) * 10
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g, bias), A, W, bias)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 16, 2048])
@pytest.mark.parametrize(
    "bits,N,K,g",
    [(8, 96, 512, 128), (8, 33, 4096, 32), (8, 19, 70, 70), (4, 64, 512, 16), (4, 19, 100, 50)],
)
def test_other_formats(dtype, M, bits, N, K, g):
    """8-bit codes and group sizes the 4-bit tiers do not take (16, 50, odd K): the affine GEMV at
    M = 1, dequantize + cuBLAS above, with and without a bias."""
    for fractional in (False, True):
        packed, scales, zeros = weight(N, K, bits, g, fractional_zeros=fractional)
        W = R.decode_affine(packed, scales, zeros, bits, g, (N, K))
        A = torch.randn(M, K).to(dtype)
        bias = torch.randn(N)
        check(gemm(A.cuda(), packed, N, K, scales, zeros, bits, g), A, W)
        check(gemm(A.cuda(), packed, N, K, scales, zeros, bits, g, bias), A, W, bias)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", sorted({1, 8, 9, 16, 17, 48, 49, 512, 513, 2048}))
def test_table_thresholds(monkeypatch, dtype, M):
    """The default table on both sides of each of its M thresholds (kGemm4Table)."""
    force(monkeypatch, None)
    N, K, g = 264, 512, 128
    packed, scales, zeros = weight(N, K, 4, g)
    W = R.decode_affine(packed, scales, zeros, 4, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g), A, W)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_non_contiguous_and_misaligned(bits, dtype, M):
    """A strided A (the op makes it contiguous), a 3-D A, and a misaligned packed weight (the fast
    tiers need 16-byte aligned data: the affine GEMV's narrow-load path at M = 1, dequantize + cuBLAS
    above)."""
    N, K, g = 96, 256, 64
    packed, scales, zeros = weight(N, K, bits, g)
    W = R.decode_affine(packed, scales, zeros, bits, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    wide = torch.zeros(M, 2 * K, dtype=dtype, device="cuda")
    wide[:, ::2] = A.cuda()
    check(gemm(wide[:, ::2], packed, N, K, scales, zeros, bits, g), A, W)
    out3 = gemm(A.cuda().view(1, M, K), packed, N, K, scales, zeros, bits, g)
    assert out3.shape == (1, M, N)
    check(out3[0], A, W)
    flat = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    flat[1:] = packed.cuda()
    pm = flat[1:]
    assert pm.data_ptr() % 16 != 0
    check(gemm(A.cuda(), pm, N, K, scales, zeros, bits, g), A, W)


def test_special_groups(monkeypatch):
    """A zero-scale group and a NaN-scale group: the zero row's outputs are exact zeros (one
    group per row here), the NaN row's NaN, in every tier (as the CPU product does)."""
    N, K, g = 16, 128, 128
    packed, scales, zeros = weight(N, K, 4, g)
    scales[3] = 0.0
    scales[5] = float("nan")
    for tier in ("gemv", "mma", "dequant", "generic"):
        for M in (1, 16):
            force(monkeypatch, tier)
            A = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            out = gemm(A, packed, N, K, scales, zeros, 4, g).float().cpu()
            assert (out[:, 3] == 0).all(), tier
            assert out[:, 5].isnan().all(), tier
            others = torch.cat([out[:, :5], out[:, 6:]], 1)
            assert not others.isnan().any(), tier


def test_empty():
    packed, scales, zeros = cuda(*weight(8, 64, 4, 32))
    out = ops.gemm_affine(torch.empty(0, 64, device="cuda"), packed, [8, 64], scales, zeros, 4, 32)
    assert out.shape == (0, 8) and out.is_cuda
    # K = 0: every output is the bias (an empty sum), in every tier's fallback
    p0, s0, z0 = (t.cuda() for t in R.quantize_affine(torch.empty(8, 0), 4, 32, False))
    bias = torch.randn(8, device="cuda")
    out = ops.gemm_affine(torch.empty(3, 0, device="cuda"), p0, [8, 0], s0, z0, 4, 32, bias)
    assert torch.equal(out, bias.expand(3, 8))


@pytest.mark.parametrize("which", ["scales", "zeros"])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_scales_rejected(which, dt):
    """Scales and zeros are fp32 (the formats convert a checkpoint's fp16/bf16 ones exactly at
    load time): 16-bit ones raise TypeError on CUDA too, never get read as fp32."""
    N, K, g = 8, 64, 32
    packed, scales, zeros = cuda(*weight(N, K, 4, g))
    args = {"scales": scales, "zeros": zeros}
    args[which] = args[which].to(dt)
    with pytest.raises(TypeError, match=f"{which} must be torch.float32"):
        ops.dequantize_affine(packed, args["scales"], args["zeros"], 4, g, [N, K], torch.float16)
    A = torch.randn(2, K, device="cuda")
    with pytest.raises(TypeError, match=f"{which} must be torch.float32"):
        ops.gemm_affine(A, packed, [N, K], args["scales"], args["zeros"], 4, g)


def test_matches_cpu_op():
    """The CUDA product equals the CPU op within the same tolerance (both against the exact
    reference), and the dequantized weights are identical."""
    N, K, g = 128, 512, 128
    packed, scales, zeros = weight(N, K, 4, g)
    W = R.decode_affine(packed, scales, zeros, 4, g, (N, K))
    A = torch.randn(4, K)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g), A, W)
    Wc = ops.dequantize_affine(*cuda(packed, scales, zeros), 4, g, [N, K], torch.float32)
    assert torch.equal(Wc.cpu(), W)


@pytest.mark.parametrize("bits", [4, 8])
def test_non_contiguous_weight_args(bits):
    """packed, scales, zeros and bias as strided views (the op makes them contiguous): the same
    values as from contiguous tensors, in every tier of the product and in dequantize."""
    N, K, g = 72, 512, 64
    packed, scales, zeros = cuda(*weight(N, K, bits, g, fractional_zeros=True))
    bias = torch.randn(N, device="cuda")

    def strided(t):
        wide = torch.zeros(t.numel(), 2, dtype=t.dtype, device="cuda")
        wide[:, 0] = t
        view = wide[:, 0]
        assert not view.is_contiguous()
        return view

    args = (strided(packed), [N, K], strided(scales), strided(zeros), bits, g)
    want_w = ops.dequantize_affine(packed, scales, zeros, bits, g, [N, K], torch.float16)
    got_w = ops.dequantize_affine(args[0], args[2], args[3], bits, g, [N, K], torch.float16)
    assert torch.equal(got_w, want_w)
    for M, dtype in (
        (1, torch.float32),
        (3, torch.float16),
        (40, torch.bfloat16),
        (600, torch.float16),
    ):
        A = torch.randn(M, K, device="cuda").to(dtype)
        want = ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g, bias)
        got = ops.gemm_affine(A, *args, strided(bias))
        assert torch.equal(got, want), (M, dtype)


def test_quantize_grid_stride():
    """More groups than the stats kernel's grid holds at once (65536 blocks of 8 warps = 524288
    groups): every group is still written, bit for bit with the reference."""
    A = torch.randn(2048, 4096)
    g = 8  # 1048576 groups
    got = ops.quantize_affine(A.cuda(), 4, g, False)
    want = R.quantize_affine(A, 4, g, False)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))


def test_dequantize_grid_stride():
    """More elements than the dequantize kernel's grid covers in one pass (65536 blocks x 256
    threads x 8 elements = 2^27; below that every thread takes one run of 8), bit
    for bit. The reference runs on the GPU: tensor-by-tensor subtract and multiply, each rounded
    as the kernel rounds them. (The quantize kernels: test_quantize_grid_stride for the stats
    pass; the codes pass strides over every tensor of more than 1024 bytes.)"""
    N, K, g = 16403, 8192, 128  # N * K = 134373376 > 2^27, N odd
    packed = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, device="cuda")
    scales = torch.rand(N * K // g, device="cuda") * 0.1 + 1e-3
    zeros = torch.rand(N * K // g, device="cuda") * 15
    got = ops.dequantize_affine(packed, scales, zeros, 4, g, [N, K], torch.float16)
    want = R.dequantize_affine(packed, scales, zeros, 4, g, (N, K), torch.float16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_ops_capture_in_cuda_graph():
    """Every affine op records into a CUDA graph (the capture fails if a kernel is launched on
    another stream than the current one, or if anything synchronises): quantize, dequantize and
    the product at each tier, fp32 and 16-bit, 4- and 8-bit, with a bias; the replays equal the
    eager results on new inputs."""
    N, K, g = 136, 256, 64
    packed4, s4, z4 = cuda(*weight(N, K, 4, g))
    packed8, s8, z8 = cuda(*weight(N, K, 8, g))
    W4 = R.decode_affine(packed4.cpu(), s4.cpu(), z4.cpu(), 4, g, (N, K))
    W8 = R.decode_affine(packed8.cpu(), s8.cpu(), z8.cpu(), 8, g, (N, K))
    bias = torch.randn(N, device="cuda")
    cases = [(1, torch.float32, 4), (64, torch.float32, 4), (16, torch.bfloat16, 4)]
    cases += [(600, torch.float16, 4), (1, torch.float16, 8), (64, torch.float32, 8)]
    xs = [torch.randn(M, K, device="cuda").to(dt) for M, dt, _ in cases]
    W = torch.randn(N, K, device="cuda")

    def run():
        outs = [ops.quantize_affine(W, 4, g, False)[0], ops.quantize_affine(W, 8, g, True)[1]]
        outs.append(ops.dequantize_affine(packed4, s4, z4, 4, g, [N, K], torch.bfloat16))
        for x, (_, _, bits) in zip(xs, cases):
            p, s, z = (packed4, s4, z4) if bits == 4 else (packed8, s8, z8)
            outs.append(ops.gemm_affine(x, p, [N, K], s, z, bits, g, bias))
        return outs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture (cuBLAS handles, the mma kernels' smem attribute)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(2):
        W.copy_(torch.randn(N, K, device="cuda"))
        for x in xs:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        eager = run()
        for got, want in zip(captured[:3], eager[:3]):  # elementwise kernels: bit for bit
            assert torch.equal(got, want)
        # The products: the same kernels, but cuBLAS may pick another algorithm on the capture
        # stream than on this one (the dequantize + cuBLAS tier), so within a few units of the
        # last place of each other, and each within the reference tolerance.
        for got, want, x, (_, _, bits) in zip(captured[3:], eager[3:], xs, cases):
            tol = 1e-4 if x.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            check(got, x, W4 if bits == 4 else W8, bias)


def test_opcheck_cuda():
    """torch.library.opcheck of the three ops with CUDA tensors (schema, fake kernels against the
    real outputs' shapes, strides and devices, autograd registration, AOT dispatch) at the gemv,
    tensor-core and dequantize + cuBLAS tiers."""
    N, K, g = 16, 128, 32
    packed, scales, zeros = cuda(*weight(N, K, 4, g))
    p8, s8, z8 = cuda(*weight(N, K, 8, g, fractional_zeros=True))
    Ag = torch.randn(3, K, device="cuda", requires_grad=True)
    bias = torch.randn(N, device="cuda", requires_grad=True)
    W = torch.randn(N, K, device="cuda")
    cases = [
        (ops.quantize_affine.default, (W, 4, g, False)),
        (ops.quantize_affine.default, (W.bfloat16(), 8, K, True)),
        (ops.dequantize_affine.default, (packed, scales, zeros, 4, g, [N, K], torch.bfloat16)),
        (ops.dequantize_affine.default, (p8, s8, z8, 8, g, [N, K], torch.float32)),
        (ops.gemm_affine.default, (Ag, packed, [N, K], scales, zeros, 4, g, bias)),
        (ops.gemm_affine.default, (torch.randn(20, K, device="cuda").bfloat16(), packed, [N, K],
                                   scales, zeros, 4, g)),
        (ops.gemm_affine.default, (Ag.detach().half(), p8, [N, K], s8, z8, 8, g)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- gemm_affine: the affine GEMV (8-bit codes, other group sizes, misaligned data; M <= 8) ----
# gemv_affine_kernel (affine.cu) runs every product at M <= 8 that the 4-bit tiers do not take.
# Its fp32 sums take each 16-element chunk inside one group as scale * sum x * (q - zero) (the
# CPU's decode with the scale moved out of the sum), so fp32 activations are held to REL_TOL[fp32]
# = 1e-5 like every other tier, also where the 4-bit gemv's scale * (sum x q - zero * sum x) would
# cancel (test_affine_gemv_8bit_cancellation). A chunk that crosses a group boundary (group sizes
# that are not a multiple of 16) decodes each weight exactly as the CPU does.

AG_SHAPES = [
    (201, 512, 128),  # odd N (a partial column pair), GPTQ/AWQ group 128
    (33, 4096, 32),  # long K, small N: split K inside the block
    (257, 1024, 1024),  # per channel (group = K)
    (75, 1008, 48),  # GPTQ group 48: not a multiple of 32 (FastDiv32 by 48)
    (64, 480, 24),  # group 24: chunks that cross a group boundary (aligned vector path)
    (19, 70, 70),  # K % 16 != 0: the narrow-load path, a partial last chunk
    (13, 100, 20),  # K % 16 != 0 and chunks across groups
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("N,K,g", AG_SHAPES)
@pytest.mark.parametrize("M", range(1, 9))
def test_affine_gemv_8bit(M, N, K, g, dtype):
    """8-bit codes at M = 1..8 (each MT instantiation with idle rows), integer and fractional
    zeros, without a bias, with a bias of A's dtype and with an fp32 bias."""
    for fractional in (False, True):
        packed, scales, zeros = weight(N, K, 8, g, fractional_zeros=fractional)
        W = R.decode_affine(packed, scales, zeros, 8, g, (N, K))
        A = torch.randn(M, K).to(dtype)
        bias = torch.randn(N)
        check(gemm(A.cuda(), packed, N, K, scales, zeros, 8, g), A, W)
        check(
            gemm(A.cuda(), packed, N, K, scales, zeros, 8, g, bias.to(dtype)), A, W, bias.to(dtype)
        )
        if dtype != torch.float32:
            check(gemm(A.cuda(), packed, N, K, scales, zeros, 8, g, bias), A, W, bias)


@pytest.mark.parametrize("M", [1, 4])
def test_affine_gemv_8bit_cancellation(M):
    """8-bit codes 250..255 around fractional zeros 252.5 and positive fp32 activations: each
    weight (q - zero) * scale is small next to q * scale, so a sum formed as sum x q - zero * sum x
    cancels (relative error ~2e-5 in an fp32 model); the kernel's sum x * (q - zero) stays within
    the fp32 tolerance."""
    N, K, g = 64, 4096, 128
    packed = torch.randint(250, 256, (N * K,), dtype=torch.uint8)
    scales = torch.rand(N * K // g) * 0.1 + 1e-3
    zeros = torch.full((N * K // g,), 252.5)
    W = R.decode_affine(packed, scales, zeros, 8, g, (N, K))
    A = torch.rand(M, K)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 8, g), A, W)


@pytest.mark.parametrize("tier", ["gemv:1", "gemv:2", "affgemv:4", "affgemv:8", "dequant"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_affine_gemv_8bit_splits(monkeypatch, tier, dtype, M):
    """Each split of K inside the block (1, 2, 4, 8 warps per column pair), against the dequantize
    + cuBLAS tier on the same inputs and the reference."""
    N, K, g = 40, 4096, 128
    packed, scales, zeros = weight(N, K, 8, g, fractional_zeros=True)
    W = R.decode_affine(packed, scales, zeros, 8, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    force(monkeypatch, tier)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 8, g, bias), A, W, bias)


@pytest.mark.parametrize("tier", [None, "affgemv", "affgemv:8"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize(
    "N,K,g",
    [
        (96, 512, 16),  # 4-bit group 16: two groups per 16-byte vector
        (75, 960, 48),  # group 48: each vector's two 16-element chunks may lie in two groups
        (19, 100, 50),  # K % 32 != 0: the narrow-load path, chunks across groups
        (7, 99, 33),  # odd K: rows start in the middle of a byte
        (130, 1024, 128),  # the 4-bit tiers' shape, pinned to the affine GEMV ("affgemv")
    ],
)
def test_affine_gemv_4bit(monkeypatch, tier, dtype, M, N, K, g):
    """4-bit codes in groups the 4-bit tiers do not take run the affine GEMV at M <= 8 (and a
    multiple-of-32 group through it when pinned), with a bias, fractional zeros."""
    force(monkeypatch, tier)
    packed, scales, zeros = weight(N, K, 4, g, fractional_zeros=True)
    W = R.decode_affine(packed, scales, zeros, 4, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g), A, W)
    check(gemm(A.cuda(), packed, N, K, scales, zeros, 4, g, bias), A, W, bias)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 4, 7])
@pytest.mark.parametrize("offset", [1, 4, 8])
def test_affine_gemv_misaligned(bits, dtype, M, offset):
    """A packed weight that starts `offset` bytes past a 16-byte boundary, an A one element past it:
    the narrow-load path (never a misaligned vector load, which would raise a CUDA error), equal to
    the aligned call within fp32 rounding and to the reference."""
    N, K, g = 72, 512, 64
    packed, scales, zeros = weight(N, K, bits, g, fractional_zeros=True)
    W = R.decode_affine(packed, scales, zeros, bits, g, (N, K))
    A = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    flat = torch.zeros(packed.numel() + offset, dtype=torch.uint8, device="cuda")
    flat[offset:] = packed.cuda()
    pm = flat[offset:]
    assert pm.data_ptr() % 16 != 0 and pm.is_contiguous()
    fa = torch.zeros(M * K + 1, dtype=dtype, device="cuda")
    fa[1:] = A.reshape(-1).cuda()
    am = fa[1:].view(M, K)
    assert am.data_ptr() % 16 != 0 and am.is_contiguous()
    aligned = gemm(A.cuda(), packed, N, K, scales, zeros, bits, g, bias)
    for a_, p_ in ((am, packed.cuda()), (A.cuda(), pm), (am, pm)):
        got = gemm(a_, p_, N, K, scales, zeros, bits, g, bias)
        check(got, A, W, bias)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, aligned, rtol=tol, atol=tol)


def test_affine_gemv_special_groups():
    """8-bit, M = 1 and 5: a zero-scale row gives exact zeros, a NaN-scale row NaN, the rest
    finite (as the CPU product does); and a group of 24 (chunks across groups) the same."""
    for g in (128, 24):
        N, K = 16, 384
        packed, scales, zeros = weight(N, K, 8, g)
        per_row = K // g
        scales[3 * per_row : 4 * per_row] = 0.0
        scales[5 * per_row] = float("nan")
        for M in (1, 5):
            A = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            out = gemm(A, packed, N, K, scales, zeros, 8, g).float().cpu()
            assert (out[:, 3] == 0).all(), g
            assert out[:, 5].isnan().all(), g
            others = torch.cat([out[:, :5], out[:, 6:]], 1)
            assert not others.isnan().any(), g


@pytest.mark.parametrize("bits", [4, 8])
def test_affine_gemv_allocates_only_the_output(monkeypatch, bits):
    """At M <= 8 the 8-bit product (and 4-bit in group 48) no longer dequantizes the weight: the
    peak memory of the call stays far below the N x K workspace the dequantize tier allocates
    (which this test also sees, as a check that the measure works)."""
    N, K = 2048, 4096
    g = 128 if bits == 8 else 48
    packed, scales, zeros = cuda(*weight(N, K, bits, g))
    A = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
    workspace = N * K * 2

    def peak(tier):
        force(monkeypatch, tier)
        ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g)  # warm-up (cuBLAS handle)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ops.gemm_affine(A, packed, [N, K], scales, zeros, bits, g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak("dequant") >= workspace
    assert peak(None) < workspace // 16


def test_affine_gemv_cuda_graph():
    """The affine GEMV records into a CUDA graph (current stream, no sync, no allocation) at each
    M = 1..8 and for the narrow-load path; replays on new inputs equal eager calls bit for bit
    (one kernel, a fixed summation order)."""
    N, K, g = 136, 1024, 48
    packed, s, z = cuda(*weight(N, K, 8, g, fractional_zeros=True))
    W = R.decode_affine(packed.cpu(), s.cpu(), z.cpu(), 8, g, (N, K))
    flat = torch.zeros(packed.numel() + 3, dtype=torch.uint8, device="cuda")
    flat[3:] = packed
    pm = flat[3:]  # misaligned: the narrow-load path
    bias = torch.randn(N, device="cuda")
    xs = [torch.randn(M, K, device="cuda").to(dt) for M in range(1, 9) for dt in FLOAT_DTYPES]

    def run():
        outs = [ops.gemm_affine(x, packed, [N, K], s, z, 8, g, bias) for x in xs]
        outs.append(ops.gemm_affine(xs[0], pm, [N, K], s, z, 8, g, bias))
        return outs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(2):
        for x in xs:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        eager = run()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want)
        for got, x in zip(captured, xs + [xs[0]]):
            check(got, x, W, bias)


# ---- LinearAffine on CUDA ----------------------------------------------------------------------


def linear_affine(K, N, bits=4, g=128, perm=False):
    """A LinearAffine with a bias on CUDA, from a quantized random weight; its exact fp32 weight
    (original column order) and bias."""
    from lowbit.nn import LinearAffine

    m = LinearAffine(K, N, bias=True, bits=bits, group_size=g)
    Wf = torch.randn(N, K)
    p = torch.randperm(K) if perm else None
    stored = Wf[:, p] if perm else Wf
    packed, scales, zeros = R.quantize_affine(stored, bits, g, False)
    m.set_weight(packed, scales, zeros, bits, g, perm=p)
    with torch.no_grad():
        m.bias.copy_(torch.randn(N))
    W = m.dequantize(torch.float32)
    return m.to("cuda"), W, m.bias.detach().float().clone()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 9, 16, 2048])
def test_linear_affine(bits, perm, dtype, M):
    m, W, b = linear_affine(512, 264, bits, 128, perm)
    assert torch.equal(m.dequantize(torch.float32).cpu(), W)
    x = torch.randn(M, 512).to(dtype)
    y = m.to(dtype)(x.cuda())
    assert y.is_cuda and y.dtype == dtype and y.shape == (M, 264)
    check(y, x, W, b.to(dtype))


@pytest.mark.parametrize("M", [1, 16, 2048])
def test_linear_affine_cuda_graph(M):
    """The forward records into a CUDA graph at every tier (no host sync) and each replay computes
    on the new input."""
    m, W, b = linear_affine(256, 136, 4, 64)
    m = m.to(torch.bfloat16)
    x = torch.randn(M, 256, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = m(x)
    for _ in range(2):
        x.copy_(torch.randn(M, 256, dtype=torch.bfloat16, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, m(x), rtol=1e-2, atol=1e-2)
        check(y, x, W, b.to(torch.bfloat16))


def test_linear_affine_compile_fullgraph():
    """torch.compile(fullgraph=True) of LinearAffine on CUDA at several M (with act-order): no
    graph break, eager results."""
    pytest.importorskip("triton")
    m, W, b = linear_affine(256, 136, 4, 64, perm=True)
    m = m.to(torch.bfloat16)
    cm = torch.compile(m, fullgraph=True)
    for M in (1, 16, 300):
        x = torch.randn(M, 256, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(cm(x), m(x), rtol=1e-2, atol=1e-2)


def test_linear_affine_grad_input():
    """Gradients flow to the input on CUDA: grad_A = grad_out @ W."""
    m, W, b = linear_affine(256, 64, 4, 64)
    x = torch.randn(5, 256, device="cuda", requires_grad=True)
    m(x).sum().backward()
    want = torch.ones(5, 64, dtype=torch.float64) @ W.double()
    torch.testing.assert_close(x.grad.cpu().double(), want, rtol=1e-4, atol=1e-4)


# ---- checkpoints in other libraries' formats, on CUDA ------------------------------------------


SHAPES = [(1, 1), (2, 11), (4, 40)]  # token ids: M = 1, 22, 160 rows for the linears


@pytest.mark.parametrize(
    "fmt, bits, group_size, act_order",
    [
        ("gptq", 4, 32, False),
        ("gptq", 4, 64, True),  # desc_act: g_idx a permuted group map -> the layer's perm
        ("gptq", 4, -1, False),  # per channel
        ("gptq", 4, 48, False),  # groups that do not divide K: chunks of 16 (dequantize + cuBLAS)
        ("gptq", 8, 64, True),
        ("awq", 4, 32, False),
    ],
)
def test_checkpoint_on_cuda(tmp_path, fmt, bits, group_size, act_order):
    """A GPTQ / AWQ checkpoint loaded by lowbit and moved to CUDA: every layer's CUDA dequantize
    equals the format's own dequantization bit for bit, and the logits (fp32 and fp16, decode and
    prefill shapes, so every tier runs) match a float model holding those dense weights."""
    pytest.importorskip("transformers", reason="the checkpoints are Transformers models")
    import _helpers_formats as H
    import lowbit
    from lowbit.nn import LinearAffine

    model = H.tiny_llama()
    if fmt == "gptq":
        dense = H.write_gptq(model, tmp_path, bits, group_size, False, act_order)
    else:
        dense = H.write_awq(model, tmp_path, group_size)
    ref = H.dense_model(model, dense).to("cuda")
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, model.config.vocab_size, sh, generator=gen) for sh in SHAPES]
    # Loaded once per dtype: Transformers refuses .to(dtype) on a GPTQ-configured model.
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 3e-2)):
        loaded = lowbit.from_pretrained(tmp_path, torch_dtype=dtype, progress=False).to("cuda")
        for name, Wd in dense.items():
            layer = loaded.get_submodule(name)
            assert isinstance(layer, LinearAffine) and layer.packed.is_cuda
            assert (layer.perm is not None) == act_order
            assert torch.equal(layer.dequantize().cpu(), Wd), name
        ref = ref.to(dtype)
        for t in ids:
            with torch.no_grad():
                a = loaded(t.cuda()).logits.float()
                b = ref(t.cuda()).logits.float()
            rel = ((a - b).norm() / b.norm()).item()
            assert rel <= tol, f"{tuple(t.shape)} {dtype}: logits relative error {rel:.3e} > {tol}"


def test_checkpoint_device_map_cuda(tmp_path):
    """from_pretrained(device_map="cuda") of a GPTQ act-order checkpoint: the layers are converted
    and placed on the GPU by the loader itself (no .to afterwards), and compute as above."""
    pytest.importorskip("transformers", reason="the checkpoints are Transformers models")
    import _helpers_formats as H
    import lowbit
    from lowbit.nn import LinearAffine

    model = H.tiny_llama()
    dense = H.write_gptq(model, tmp_path, 4, 64, False, True)
    loaded = lowbit.from_pretrained(
        tmp_path, torch_dtype=torch.float16, device_map="cuda", progress=False
    )
    for name, Wd in dense.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, LinearAffine)
        assert layer.packed.is_cuda and layer.scales.is_cuda and layer.perm.is_cuda
        assert layer.scales.dtype == torch.float32
        assert torch.equal(layer.dequantize().cpu(), Wd), name
    ref = H.dense_model(model, dense).to("cuda", torch.float16)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        a = loaded(ids.cuda()).logits.float()
        b = ref(ids.cuda()).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 3e-2, f"logits relative error {rel:.3e}"
