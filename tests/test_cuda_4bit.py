"""The tiers of the CUDA 4-bit product (gemv_4bit) and Linear4bit's one-op forward on CUDA.

gemv_4bit on CUDA picks one of four tiers in C++ (cuda::plan_gemm_4bit, the table kGemm4Table in
csrc/kernels/cuda/fourbit.cu): the SIMT GEMV (M <= 8), the tensor-core kernel (fp16/bf16, up to
mma_max_m rows, split-K over blocks when the tiles do not fill the GPU), dequantize + cuBLAS
(larger M, and fp32 activations past the GEMV), and the generic kernel (K % 32 != 0 or misaligned
data). LOWBIT_GEMM4_FORCE pins a tier, so every tier is tested on the same shapes; the default
table is tested on both sides of each threshold.

Reference: the weight decoded exactly (ops.dequantize_4bit to fp32 on the CPU) times A in float64.
Tolerances, on the relative Frobenius error ||out - ref|| / ||ref|| (METHOD.md): fp32 activations
1e-5 (fp32 sums in any order; cuBLAS fp32 with TF32 off, torch's default); fp16 2e-3 and bf16
1.2e-2 (the output is rounded to the dtype, ~2^-11 / 2^-8 relative, and the tensor-core and cuBLAS
tiers also round each decoded weight to the dtype, as dequantize_4bit(dtype) + matmul does). Each
element must also lie within a loose bound of the reference (no single wrong element hides in the
norm), and NaN never passes.
"""

import pytest
import torch

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ELEM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}

# The default table's thresholds (kGemm4Table in csrc/kernels/cuda/fourbit.cu): keep in step with
# it, so that the threshold tests below sit on both sides of each boundary.
GEMV_MAX_M = 8
MMA_BM16_MAX_M = 16
MMA_BM32_MAX_M = 48
MMA_MAX_M = 512


def code16(quant_type: str) -> torch.Tensor:
    """The 16 code values by nibble (nibbles 0..15 in bytes 0x01, 0x23, ..., 0xEF, absmax 1)."""
    nibbles = torch.tensor([[0x01], [0x23], [0x45], [0x67], [0x89], [0xAB], [0xCD], [0xEF]])
    return ops.dequantize_4bit(
        nibbles.to(torch.uint8), torch.ones(1), 32, quant_type, [16], torch.float32
    )


def weight(N, K, blocksize=64, quant_type="nf4", nested_blocksize=None):
    """A random 4-bit weight on the CPU: (packed, absmax or codes, nested args, exact fp32 W)."""
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), blocksize, quant_type, torch.uint8)
    nested = []
    scales = absmax
    if nested_blocksize is not None:
        v = torch.linspace(-1, 1, 255, dtype=torch.float64)
        code8 = torch.cat([(v.sign() * v.abs() ** 2.5).float(), torch.zeros(1)]).sort().values
        offset = absmax.mean()
        q, absmax2 = ops.quantize_blockwise(absmax - offset, code8, nested_blocksize)
        nested = [absmax2, code8, float(offset), nested_blocksize]
        scales = ops.dequantize_blockwise(q, absmax2, code8, nested_blocksize, torch.float32)
        scales = scales + offset
        absmax = q
    W = ops.dequantize_4bit(packed, scales, blocksize, quant_type, [N, K], torch.float32)
    return packed, absmax, nested, W


def run(A, packed, absmax, nested, N, K, blocksize=64, quant_type="nf4"):
    dev = A.device
    args = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in nested]
    return ops.gemv_4bit(
        A, packed.to(dev), [N, K], absmax.to(dev), code16(quant_type).to(dev), blocksize, *args
    )


def check(out, A, W):
    ref = A.cpu().double() @ W.double().T
    assert out.dtype == A.dtype and out.shape == ref.shape
    got = out.cpu().double()
    assert not got.isnan().any(), "NaN in the output"
    if ref.numel() == 0:
        return
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL[A.dtype], f"relative error {rel:.3g} >= {REL_TOL[A.dtype]}"
    bound = ELEM_TOL[A.dtype] * (ref.abs() + A.shape[-1] ** 0.5)
    bad = (got - ref).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} elements off, first at {bad.nonzero()[:4].tolist()}"


def force(monkeypatch, tier):
    if tier is None:
        monkeypatch.delenv("LOWBIT_GEMM4_FORCE", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_GEMM4_FORCE", tier)


# "gemv:W:C": W warps per column group (split-K inside the block), C columns per group (M = 1;
# M > 1 always 2); "mma:C:S": tile configuration C,
# S blocks along K (fp32 partials + an ordered reduction).
TIERS = ["gemv", "gemv:1:1", "gemv:8:4", "gemv:2:2", "mma", "mma:0", "mma:1", "mma:2"]
TIERS += ["mma:0:4", "mma:2:3"]
TIERS += ["dequant", "generic"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "M,N,K,blocksize",
    [
        (1, 201, 512, 64),  # N not a multiple of any tile (8, 128) nor of the gemv's columns
        (3, 130, 96, 64),  # K = 96: blocks of 64 straddle rows; one partial k-tile
        (8, 64, 2048, 32),  # small N; the forced gemv:8:4 / gemv:2:2 split K inside the block
        (16, 257, 1024, 128),
        (37, 136, 320, 256),  # M over 3 tiles of 16 / 2 of 32; K % 64 == 32 (tail chunk)
        (2048, 72, 256, 64),  # M = 2048 (in every tier that takes it)
        (5, 1, 32, 32),  # one column, one 16-byte vector per row: every lane but one idle
    ],
)
def test_tier(monkeypatch, tier, dtype, M, N, K, blocksize):
    """Every tier on shapes that hit its tails; a tier that cannot run a shape (gemv past M = 8,
    the tensor cores on fp32) falls back to the table, which is checked the same way."""
    force(monkeypatch, tier)
    packed, absmax, nested, W = weight(N, K, blocksize)
    A = torch.randn(M, K).to(dtype)
    check(run(A.cuda(), packed, absmax, nested, N, K, blocksize), A, W)


@pytest.mark.parametrize("tier", [None, "gemv", "mma", "mma:2:4", "dequant", "generic"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 5, 16, 100])
def test_tier_nested(monkeypatch, tier, dtype, M):
    """A double quantized absmax, decoded in each tier's kernel: the same output bits as the
    product on the decoded fp32 absmax (same tier, same arithmetic), and right against the
    reference."""
    force(monkeypatch, tier)
    N, K, bs = 150, 1024, 64
    packed, q, nested, W = weight(N, K, bs, nested_blocksize=256)
    A = torch.randn(M, K).to(dtype).cuda()
    out = run(A, packed, q, nested, N, K, bs)
    check(out, A, W)
    scales = ops.dequantize_blockwise(q, nested[0], nested[1], nested[3], torch.float32) + nested[2]
    plain = run(A, packed, scales, [], N, K, bs)
    assert torch.equal(
        out.view(torch.int16 if dtype != torch.float32 else torch.int32),
        plain.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "M",
    sorted(
        {
            1,
            GEMV_MAX_M,
            GEMV_MAX_M + 1,
            16,
            MMA_BM16_MAX_M + 1,
            MMA_BM32_MAX_M,
            MMA_BM32_MAX_M + 1,
            MMA_MAX_M,
            MMA_MAX_M + 1,
            2048,
        }
    ),
)
def test_table_thresholds(monkeypatch, quant_type, dtype, M):
    """The default table on both sides of each of its M thresholds, NF4 and FP4."""
    force(monkeypatch, None)
    N, K = 264, 512
    packed, absmax, nested, W = weight(N, K, 64, quant_type)
    A = torch.randn(M, K).to(dtype)
    check(run(A.cuda(), packed, absmax, nested, N, K, 64, quant_type), A, W)


@pytest.mark.parametrize("N", [64, 1000, 8192])
@pytest.mark.parametrize("K", [256, 4096])
def test_gemv_split_k(monkeypatch, N, K):
    """The table's split-K choices for the GEMV (8 warps per column at small N, none at large N)
    and for the tensor cores (split over blocks at small N) give the right sums."""
    force(monkeypatch, None)
    packed, absmax, nested, W = weight(N, K)
    for M in (1, 4, 16):
        A = torch.randn(M, K).to(torch.bfloat16)
        check(run(A.cuda(), packed, absmax, nested, N, K), A, W)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", range(1, GEMV_MAX_M + 1))
def test_gemv_every_instantiation(monkeypatch, dtype, M):
    """Every SIMT GEMV kernel the launcher can pick at this M: rows MT = 1/2/4/8 with M - MT
    idle rows, warps per column group 1/2/4/8 and (M = 1) columns 1/2/4, i.e. vectors per column
    per step U = 4/2/1. K = 4160 is 130 16-byte vectors per row (not a multiple of 32 * U: idle
    lanes and idle split-K warps in the last step); N = 33 leaves a partial column group."""
    N, K = 33, 4160
    packed, absmax, nested, W = weight(N, K, 64, "fp4")
    A = torch.randn(M, K).to(dtype)
    forces = [f"gemv:{w}:{c}" for w in (1, 2, 4, 8) for c in ((1, 2, 4) if M == 1 else (2,))]
    for f in forces:
        force(monkeypatch, f)
        try:
            check(run(A.cuda(), packed, absmax, nested, N, K, 64, "fp4"), A, W)
        except AssertionError as e:
            raise AssertionError(f"LOWBIT_GEMM4_FORCE={f}: {e}") from e


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_generic_k(dtype, M):
    """K not a multiple of 32 (rows start mid-vector, or mid-byte for odd K): the generic kernel."""
    for K in (100, 37):
        N = 19
        packed, absmax, nested, W = weight(N, K, 32)
        A = torch.randn(M, K).to(dtype)
        check(run(A.cuda(), packed, absmax, nested, N, K, 32), A, W)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_non_contiguous_and_misaligned(dtype, M):
    """A strided A (the op makes it contiguous), a 3-D A, and a misaligned packed weight (the fast
    tiers need 16-byte aligned data: the generic kernel runs), all against the reference."""
    N, K = 96, 256
    packed, absmax, nested, W = weight(N, K)
    A = torch.randn(M, K).to(dtype)
    wide = torch.zeros(M, 2 * K, dtype=dtype, device="cuda")
    wide[:, ::2] = A.cuda()
    check(run(wide[:, ::2], packed, absmax, nested, N, K), A, W)
    out3 = run(A.cuda().view(1, M, K), packed, absmax, nested, N, K)
    assert out3.shape == (1, M, N)
    check(out3[0], A, W)
    flat = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    flat[1:] = packed.cuda().view(-1)
    pm = flat[1:].view(packed.shape)
    assert pm.data_ptr() % 16 != 0
    check(run(A.cuda(), pm, absmax, nested, N, K), A, W)
    # A contiguous A one element past a 16-byte boundary (a storage offset, which .contiguous()
    # keeps): generic kernel up to generic_max_m, dequantize + cuBLAS above it.
    flat_a = torch.empty(M * K + 1, dtype=dtype, device="cuda")
    flat_a[1:] = A.cuda().view(-1)
    am = flat_a[1:].view(M, K)
    assert am.is_contiguous() and am.data_ptr() % 16 != 0
    check(run(am, packed, absmax, nested, N, K), A, W)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_quant_storage(storage, M):
    """A weight packed into another storage dtype (the same bytes, reinterpreted) gives the same
    product in every default tier as the uint8 one."""
    N, K = 136, 512
    packed, absmax, nested, W = weight(N, K)
    stored = packed.view(-1).view(storage).view(-1, 1)
    A = torch.randn(M, K).to(torch.bfloat16)
    out = run(A.cuda(), stored, absmax, nested, N, K)
    check(out, A, W)
    assert torch.equal(out, run(A.cuda(), packed, absmax, nested, N, K))


def test_special_blocks(monkeypatch):
    """A weight block of zeros and a NaN block: zero rows give exact zeros, the NaN block's row
    NaN, in every tier (as the CPU product does)."""
    N, K = 16, 128
    Wf = torch.randn(N, K)
    Wf[3] = 0.0
    Wf[5, 7] = float("nan")
    packed, absmax = ops.quantize_4bit(Wf, 64, "nf4", torch.uint8)
    for tier in ("gemv", "mma", "dequant", "generic"):
        for M in (1, 16):
            A = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            force(monkeypatch, tier)
            out = run(A, packed, absmax, [], N, K).float().cpu()
            assert (out[:, 3] == 0).all(), tier
            assert out[:, 5].isnan().all(), tier
            others = torch.cat([out[:, :5], out[:, 6:]], 1)
            assert not others.isnan().any(), tier


def misaligned_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CUDA tensor with t's values at a data pointer one element past a 16-byte
    boundary (a storage offset), so the vectorised kernels must take their scalar paths."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    flat[1:] = t.reshape(-1).cuda()
    out = flat[1:].view(t.shape)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [32, 64, 512, 1024])
def test_quantize_dequantize_scalar_paths(quant_type, dtype, blocksize):
    """The scalar quantize and dequantize kernels (taken for misaligned data; quantize also for
    blocks above 512) give the CPU's bits: an odd length with a partial last block, a NaN block and
    a zero block. tests/test_cuda.py covers the vectorised ones."""
    n = 3 * 1024 + 77
    A = torch.randn(n)
    A[:64] = 0.0
    A[1030] = float("nan")
    A = A.to(dtype)
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    packed_c, absmax_c = ops.quantize_4bit(misaligned_like(A), blocksize, quant_type, torch.uint8)
    assert torch.equal(packed_c.cpu(), packed)
    assert torch.equal(absmax_c.cpu().view(torch.int32), absmax.view(torch.int32))
    out = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, [n], dtype)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    # a misaligned packed input, then a misaligned (contiguous) out= destination
    got = ops.dequantize_4bit(
        misaligned_like(packed), absmax.cuda(), blocksize, quant_type, [n], dtype
    )
    assert torch.equal(got.cpu().view(view), out.view(view))
    dst = misaligned_like(torch.zeros(n, dtype=dtype))
    ops.dequantize_4bit.out(
        packed.cuda(), absmax.cuda(), blocksize, quant_type, [n], dtype, out=dst
    )
    assert torch.equal(dst.cpu().view(view), out.view(view))


# ---- Linear4bit on CUDA -------------------------------------------------------------------------


def linear4bit(K, N, quant_type="nf4"):
    """A double quantized Linear4bit with a bias on CUDA, its exact fp32 weight and bias."""
    from lowbit.nn import Linear4bit

    lin = torch.nn.Linear(K, N)
    m = Linear4bit.from_linear(lin, quant_type=quant_type, compress_statistics=True).to("cuda")
    return m, m.dequantize(torch.float32).cpu(), lin.bias.detach().float()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("M", [1, 9, 16, 2048])
def test_linear4bit_one_op(quant_type, dtype, M):
    """One lowbit op per forward at any M (the tier is picked in C++), right against the
    reference with the bias."""
    from torch.profiler import ProfilerActivity, profile

    m, W, b = linear4bit(512, 264, quant_type)
    x = torch.randn(M, 512).to(dtype)
    ref = (x.double() @ W.double().T + b.double()).to(dtype)
    xc = x.cuda()
    m(xc)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = m(xc)
    names = [e.name for e in prof.events() if e.name.startswith("lowbit::")]
    assert names == ["lowbit::gemv_4bit"], names
    assert y.dtype == dtype and y.shape == (M, 264)
    got, exact = y.cpu().double(), x.double() @ W.double().T + b.double()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < REL_TOL[dtype], rel
    torch.testing.assert_close(y.cpu().float(), ref.float(), rtol=2e-2, atol=0.1)


@pytest.mark.parametrize(
    "M,K",
    [(1, 256), (16, 256), (2048, 256), (16, 4096)],  # (16, 4096): the mma tier splits K
)
def test_linear4bit_cuda_graph(M, K):
    """Linear4bit's forward records into a CUDA graph at every tier (no host sync; the workspaces
    come from the caching allocator's graph pool, the split-K partials too) and each replay
    computes on the new input."""
    m, W, b = linear4bit(K, 136)
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = m(x)
    for _ in range(2):
        x.copy_(torch.randn(M, K, dtype=torch.bfloat16, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        # The same kernels on the same data (cuBLAS may pick another algorithm outside capture,
        # hence not bit equality for the M = 2048 tier).
        torch.testing.assert_close(y, m(x), rtol=1e-2, atol=1e-2)
        exact = x.cpu().double() @ W.double().T + b.double()
        rel = ((y.cpu().double() - exact).norm() / exact.norm()).item()
        assert rel < REL_TOL[torch.bfloat16], rel


def test_linear4bit_compile_fullgraph():
    """torch.compile(fullgraph=True) of Linear4bit on CUDA at several M: no graph break, eager
    results."""
    pytest.importorskip("triton")
    m, W, b = linear4bit(256, 136)
    cm = torch.compile(m, fullgraph=True)
    for M in (1, 16, 300):
        x = torch.randn(M, 256, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(cm(x), m(x), rtol=1e-2, atol=1e-2)
