"""CUDA kernels against the CPU kernels on the same inputs.

The CPU kernels define the semantics: codes, scales, dequantized values and int8 products must be
bit-identical on CUDA (same scale policy, nearest-code rule and round-to-nearest-even casts); only
the fp32 dot products of gemv_4bit (and int8_linear's outlier product) may differ in summation
order, so they are compared within a tolerance. Uses torch.ops.lowbit.* only.
"""

import math

import pytest
import torch

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; runs on the lent GPU machine"
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Same shape, dtype and bits (so NaN == NaN and -0 != +0)."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype in INT_VIEW:
        actual, expected = (
            actual.view(INT_VIEW[actual.dtype]),
            expected.view(INT_VIEW[actual.dtype]),
        )
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()
        raise AssertionError(
            f"{bad.shape[0]} of {actual.numel()} differ, first at {bad[:5].tolist()}"
        )


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as t, stored with a stride: every other column of a wider tensor."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values as t, contiguous, at a data pointer one element past a 16-byte boundary (a
    storage offset): the vectorised kernels must notice and take their scalar paths."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    flat[1:] = t.reshape(-1)
    out = flat[1:].view(t.shape)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def capture(fn):
    """fn() captured into a CUDA graph after one warm-up call on a side stream (as torch.cuda.graph
    advises); returns the graph and the outputs of the captured call, which each replay rewrites."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def signed_code() -> torch.Tensor:
    """A sorted 256-entry code with 0 and 1 in it and uneven spacing, like the dynamic map."""
    v = torch.linspace(-1, 1, 255, dtype=torch.float64)
    v = (v.sign() * v.abs() ** 2.5).float()
    return torch.cat([v, torch.tensor([0.0])]).sort().values


def special_values(n: int, dtype) -> torch.Tensor:
    """Random values with whole blocks of zeros, NaN, Inf and tiny subnormals mixed in."""
    A = torch.randn(n)
    if n >= 512:
        A[0:64] = 0.0
        A[64] = float("nan")
        A[200] = float("inf")
        A[320:384] = 1e-40  # a whole block of subnormals: 1 / absmax overflows (divide branch)
        A[400] = -0.0
    return A.to(dtype)


def code16(quant_type: str, device) -> torch.Tensor:
    """The 16 code values by nibble, read back through dequantize_4bit with absmax 1: bytes
    0x01, 0x23, ..., 0xEF hold nibbles 0..15 in high-then-low order."""
    nibbles = torch.tensor(
        [[0x01], [0x23], [0x45], [0x67], [0x89], [0xAB], [0xCD], [0xEF]], dtype=torch.uint8
    )
    code = ops.dequantize_4bit(nibbles, torch.ones(1), 32, quant_type, [16], torch.float32)
    return code.to(device)


# ---- 8-bit blockwise ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("shape", [(0,), (1,), (63,), (1000, 37), (3, 5, 129), (4096, 3)])
def test_quantize_blockwise(dtype, blocksize, shape):
    A = torch.randn(shape).to(dtype)
    code = signed_code()
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    qc, absmaxc = ops.quantize_blockwise(A.cuda(), code.cuda(), blocksize)
    assert qc.device.type == "cuda" and absmaxc.device.type == "cuda"
    assert_bits_equal(qc, q)
    assert_bits_equal(absmaxc, absmax)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_quantize_blockwise_special_values(dtype):
    A = special_values(64 * 20 + 5, dtype)
    code = signed_code()
    q, absmax = ops.quantize_blockwise(A, code, 64)
    qc, absmaxc = ops.quantize_blockwise(A.cuda(), code.cuda(), 64)
    assert_bits_equal(qc, q)
    assert_bits_equal(absmaxc, absmax)


def test_quantize_blockwise_rejects_unsorted_code():
    code = signed_code().flip(0).cuda()
    with pytest.raises(ValueError, match="sorted"):
        ops.quantize_blockwise(torch.randn(64, device="cuda"), code, 64)


def test_quantize_blockwise_in_cuda_graph():
    """No host synchronisation while the stream is being captured (the eager code-order check reads
    a bool back; it is skipped under capture), so the op records into a CUDA graph, and each replay
    quantizes what the input then holds."""
    A = torch.randn(4096 * 3 + 5, device="cuda")
    code = signed_code().cuda()
    g, (q, absmax) = capture(lambda: ops.quantize_blockwise(A, code, 256))
    for _ in range(2):
        A.copy_(torch.randn(A.shape, device="cuda"))
        g.replay()
        eq, em = ops.quantize_blockwise(A, code, 256)
        assert_bits_equal(q, eq)
        assert_bits_equal(absmax, em)


def test_quantize_blockwise_unsorted_code_in_cuda_graph():
    """Under capture the kernel checks the code's order itself: an unsorted code (at capture time, or
    made unsorted before a replay) gives every block absmax NaN and the zero code, visibly bad
    output rather than plausible wrong codes. Eager calls still raise (test above)."""
    A = torch.randn(1000, device="cuda")
    code = signed_code().cuda()
    ops.quantize_blockwise(A, code, 64)  # the kernel is loaded before capturing
    bad = code.flip(0).contiguous()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, absmax = ops.quantize_blockwise(A, bad, 64)
    g.replay()
    torch.cuda.synchronize()
    assert absmax.isnan().all()
    assert (q == q.view(-1)[0]).all()
    g2, (q2, absmax2) = capture(lambda: ops.quantize_blockwise(A, code, 64))
    g2.replay()
    assert not absmax2.isnan().any()
    code[10] = float("nan")  # NaN fails the order test too, as on the CPU
    g2.replay()
    torch.cuda.synchronize()
    assert absmax2.isnan().all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_dequantize_blockwise(dtype, blocksize):
    code = signed_code()
    q, absmax = ops.quantize_blockwise(special_values(777 * 33, torch.float32), code, blocksize)
    out = ops.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    outc = ops.dequantize_blockwise(q.cuda(), absmax.cuda(), code.cuda(), blocksize, dtype)
    assert_bits_equal(outc, out)
    # .out into a non-contiguous destination
    dst = strided(torch.empty(777 * 33 // 3, 3, dtype=dtype, device="cuda"))
    ops.dequantize_blockwise.out(
        q.view(-1, 3).cuda(), absmax.cuda(), code.cuda(), blocksize, dtype, out=dst
    )
    assert_bits_equal(dst, out.view(-1, 3))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_dequantize_nan_bits(dtype):
    """NaN outputs carry the CPU kernels' bits. GPU arithmetic returns one canonical NaN
    (0x7fffffff) whatever the operands; the CPU propagates the NaN operand (a NaN absmax, either
    sign) and gives its default NaN for 0 * Inf. Blocks: NaN, -NaN, Inf (with one zero code), 1."""
    absmax = torch.tensor([float("nan"), -float("nan"), float("inf"), 1.0])
    code = signed_code()
    q8 = torch.randint(0, 256, (256,), dtype=torch.uint8)
    q8[128] = int((code == 0).nonzero()[0, 0])  # code 0 * absmax Inf
    out = ops.dequantize_blockwise(q8, absmax, code, 64, dtype)
    outc = ops.dequantize_blockwise(q8.cuda(), absmax.cuda(), code.cuda(), 64, dtype)
    assert_bits_equal(outc, out)
    packed = torch.randint(0, 256, (128, 1), dtype=torch.uint8)
    packed[64] = 0x77  # elements 128 and 129: NF4 nibble 7 is 0.0, times absmax Inf
    out4 = ops.dequantize_4bit(packed, absmax, 64, "nf4", [256], dtype)
    out4c = ops.dequantize_4bit(packed.cuda(), absmax.cuda(), 64, "nf4", [256], dtype)
    assert_bits_equal(out4c, out4)


# ---- 4-bit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", [(0,), (1,), (31,), (65,), (1000, 37), (3, 5, 129), (4096, 11)])
def test_quantize_4bit(quant_type, dtype, blocksize, shape):
    A = torch.randn(shape).to(dtype)
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    packedc, absmaxc = ops.quantize_4bit(A.cuda(), blocksize, quant_type, torch.uint8)
    assert_bits_equal(packedc, packed)
    assert_bits_equal(absmaxc, absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_quantize_4bit_special_values_and_noncontiguous(quant_type, dtype):
    A = special_values(64 * 41, dtype).view(64, 41)
    packed, absmax = ops.quantize_4bit(A, 64, quant_type, torch.uint8)
    packedc, absmaxc = ops.quantize_4bit(strided(A.cuda()), 64, quant_type, torch.uint8)
    assert_bits_equal(packedc, packed)
    assert_bits_equal(absmaxc, absmax)


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.bfloat16, torch.float32])
def test_quantize_4bit_storage(storage):
    A = torch.randn(64, 64)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", storage)
    packedc, absmaxc = ops.quantize_4bit(A.cuda(), 64, "nf4", storage)
    assert packedc.dtype == storage
    assert_bits_equal(packedc.view(torch.uint8), packed.view(torch.uint8))
    assert_bits_equal(absmaxc, absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1,), (33,), (1000, 37), (64, 64)])
def test_dequantize_4bit(quant_type, dtype, shape):
    A = special_values(math.prod(shape), torch.float32).view(shape)
    packed, absmax = ops.quantize_4bit(A, 64, quant_type, torch.uint8)
    out = ops.dequantize_4bit(packed, absmax, 64, quant_type, list(shape), dtype)
    outc = ops.dequantize_4bit(packed.cuda(), absmax.cuda(), 64, quant_type, list(shape), dtype)
    assert_bits_equal(outc, out)
    if len(shape) == 2:
        dst = strided(torch.empty(shape, dtype=dtype, device="cuda"))
        ops.dequantize_4bit.out(
            packed.cuda(), absmax.cuda(), 64, quant_type, list(shape), dtype, out=dst
        )
        assert_bits_equal(dst, out)


def gemv_reference(A, packed, absmax, quant_type, blocksize, N, K):
    """The product the gemv kernels compute up to fp32 summation order: the 4-bit weight decoded on
    the CPU (bit-exact per element, as the kernels decode it) times A in float64, rounded once to
    A's dtype. Not the CPU gemv_4bit op: for small M on AVX2 machines it quantizes the activations
    to int8 by default (LOWBIT_CPU_GEMV), an error far above the fp32 tolerances here."""
    W = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, [N, K], torch.float32)
    return (A.double() @ W.double().T).to(A.dtype)


GEMV_TOL = {
    torch.float32: (1e-4, 1e-3),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "a_shape,N,K",
    [
        ((1, 4096), 256, 4096),  # M = 1 fast path (K % 32 == 0, aligned)
        ((1, 1, 512), 77, 512),  # fast path, 3-D activations, odd N
        ((1, 100), 33, 100),  # M = 1, K not a multiple of 32: generic path
        ((1, 37), 9, 37),  # odd K: rows start in the middle of a byte
        ((5, 256), 64, 256),  # small batch
        ((3, 7, 96), 40, 96),  # M = 21 over three row tiles
        ((0, 64), 16, 64),  # empty batch
    ],
)
def test_gemv_4bit(quant_type, dtype, a_shape, N, K):
    W = torch.randn(N, K)
    packed, absmax = ops.quantize_4bit(W, 64, quant_type, torch.uint8)
    code = code16(quant_type, "cpu")
    A = torch.randn(a_shape).to(dtype)
    out = gemv_reference(A, packed, absmax, quant_type, 64, N, K)
    outc = ops.gemv_4bit(A.cuda(), packed.cuda(), [N, K], absmax.cuda(), code.cuda(), 64)
    assert outc.dtype == dtype and outc.shape == out.shape
    rtol, atol = GEMV_TOL[dtype]
    torch.testing.assert_close(outc.cpu().float(), out.float(), rtol=rtol, atol=atol * K**0.5)
    if a_shape[0] > 0:
        outs = ops.gemv_4bit(
            strided(A.cuda()), packed.cuda(), [N, K], absmax.cuda(), code.cuda(), 64
        )
        assert_bits_equal(outs, outc.contiguous())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("which", ["A", "packed"])
def test_gemv_4bit_misaligned(dtype, which):
    """A storage offset on the activations or the packed weight breaks the M = 1 fast path's
    16-byte loads: the generic kernel runs instead, with the same product within tolerance."""
    N, K = 48, 256
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), 64, "nf4", torch.uint8)
    code = code16("nf4", "cpu")
    A = torch.randn(1, K).to(dtype)
    out = gemv_reference(A, packed, absmax, "nf4", 64, N, K)
    Ac, pc = A.cuda(), packed.cuda()
    if which == "A":
        Ac = misaligned(Ac)
    else:
        pc = misaligned(pc)
    outc = ops.gemv_4bit(Ac, pc, [N, K], absmax.cuda(), code.cuda(), 64)
    rtol, atol = GEMV_TOL[dtype]
    torch.testing.assert_close(outc.cpu().float(), out.float(), rtol=rtol, atol=atol * K**0.5)


def nested_weight(N, K, blocksize, nested_blocksize, quant_type="nf4"):
    """A double-quantized 4-bit weight on the CPU: (packed, absmax codes, (nested_absmax, nested
    code, offset, nested_blocksize))."""
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), blocksize, quant_type, torch.uint8)
    code8 = signed_code()
    offset = absmax.mean()
    q, absmax2 = ops.quantize_blockwise(absmax - offset, code8, nested_blocksize)
    return packed, q, (absmax2, code8, float(offset), nested_blocksize)


def on_cuda(args):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "a_shape,N,K,blocksize,nested_blocksize",
    [
        ((1, 4096), 256, 4096, 64, 256),  # M = 1 fast path, 16384 blocks over 64 nested blocks
        ((1, 4096), 96, 4096, 32, 64),  # fast path, one block per 16-byte vector
        ((1, 1024), 40, 1024, 4096, 64),  # blocks span 4 rows; one partial nested block
        ((1, 100), 33, 100, 64, 64),  # generic path, last nested block partial
        ((1, 37), 9, 37, 32, 64),  # odd K: rows start mid-byte, blocks mid-row
        ((3, 96), 40, 96, 128, 128),  # M > 1
        ((2, 9, 64), 12, 64, 32, 64),  # M = 18 over three row tiles
    ],
)
def test_gemv_4bit_nested(dtype, a_shape, N, K, blocksize, nested_blocksize):
    # Double quantization: the kernel decodes each block's scale itself (blockscale.h), so the
    # fused product equals, bit for bit, the product on the decoded fp32 absmax (blockwise
    # dequantize + offset), and the CPU product within tolerance.
    packed, q, nested = nested_weight(N, K, blocksize, nested_blocksize)
    code = code16("nf4", "cpu")
    A = torch.randn(a_shape).to(dtype)
    # the per-block scales as the CPU kernels decode them: blockwise dequantize, then + offset
    scales = (
        ops.dequantize_blockwise(q, nested[0], nested[1], nested_blocksize, torch.float32)
        + nested[2]
    )
    out = gemv_reference(A, packed, scales, "nf4", blocksize, N, K)
    Ac, pc, qc, cc = A.cuda(), packed.cuda(), q.cuda(), code.cuda()
    nc = on_cuda(nested)
    outc = ops.gemv_4bit(Ac, pc, [N, K], qc, cc, blocksize, *nc)
    assert outc.dtype == dtype and outc.shape == out.shape
    rtol, atol = GEMV_TOL[dtype]
    torch.testing.assert_close(outc.cpu().float(), out.float(), rtol=rtol, atol=atol * K**0.5)
    absmax2, code8, offset, _ = nc
    decoded = ops.dequantize_blockwise(qc, absmax2, code8, nested_blocksize, torch.float32) + offset
    assert_bits_equal(decoded, scales)
    assert_bits_equal(outc, ops.gemv_4bit(Ac, pc, [N, K], decoded, cc, blocksize))
    # the scalar (generic) kernel when A is misaligned: fused == unfused there too
    Am = misaligned(Ac)
    assert_bits_equal(
        ops.gemv_4bit(Am, pc, [N, K], qc, cc, blocksize, *nc),
        ops.gemv_4bit(Am, pc, [N, K], decoded, cc, blocksize),
    )


def test_gemv_4bit_nested_is_one_kernel():
    """NF4 with a double-quantized absmax at M = 1 is one launch: the scale decode is fused."""
    from torch.profiler import ProfilerActivity, profile

    packed, q, nested = nested_weight(256, 4096, 64, 256)
    args = on_cuda(
        [torch.randn(1, 4096), packed, [256, 4096], q, code16("nf4", "cpu"), 64, *nested]
    )
    ops.gemv_4bit(*args)  # load the kernel first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.gemv_4bit(*args)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no CUDA activity here (CUPTI unavailable?)")
    assert len(kernels) == 1 and "gemv_4bit_fast_kernel" in kernels[0], kernels


@pytest.mark.parametrize("M", [1, 5])
def test_gemv_4bit_nested_in_cuda_graph(M):
    packed, q, nested = nested_weight(64, 256, 64, 64)
    A = torch.randn(M, 256, device="cuda")
    args = on_cuda([packed, [64, 256], q, code16("nf4", "cpu"), 64, *nested])
    g, out = capture(lambda: ops.gemv_4bit(A, *args))
    A.copy_(torch.randn(M, 256, device="cuda"))
    g.replay()
    assert_bits_equal(out, ops.gemv_4bit(A, *args))


def test_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead") records the 8-bit quantizer and the fused NF4 GEMV
    (double quantized) into CUDA graphs: no skipped graph, the same bits as eager."""
    pytest.importorskip("triton")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    packed, q, nested = nested_weight(64, 256, 64, 256)
    w = on_cuda([packed, [64, 256], q, code16("nf4", "cpu"), 64, *nested])
    code8 = signed_code().cuda()

    def f(a, x):
        q8, m8 = ops.quantize_blockwise(x, code8, 256)
        return q8, m8, ops.gemv_4bit(a, *w)

    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, replays
        a = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(3000, device="cuda")
        got = [t.clone() for t in cf(a, x)]
        for g, e in zip(got, f(a, x)):
            assert_bits_equal(g, e)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# ---- LLM.int8() ---------------------------------------------------------------------------------


def activations(shape, dtype, outliers=True):
    A = torch.randn(shape)
    if outliers and shape[-1] >= 8 and A.numel() > 0:
        A[..., 3] *= 20.0  # an outlier column
        A.view(-1, shape[-1])[0, 5] = -9.0  # an outlier in one row only
    return A.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", [(1, 1), (1, 4096), (7, 33), (3, 5, 129), (0, 16), (4, 0)])
def test_int8_vectorwise_quant(dtype, threshold, shape):
    A = activations(shape, dtype)
    q, stats, cols = ops.int8_vectorwise_quant(A, threshold)
    qc, statsc, colsc = ops.int8_vectorwise_quant(A.cuda(), threshold)
    assert_bits_equal(qc, q)
    assert_bits_equal(statsc, stats)
    assert (cols is None) == (colsc is None)
    if cols is not None:
        assert_bits_equal(colsc, cols)
    qs, statss, _ = ops.int8_vectorwise_quant(strided(A.cuda()), threshold)
    assert_bits_equal(qs, q)
    assert_bits_equal(statss, stats)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_vectorwise_quant_special_rows(dtype, threshold):
    A = torch.randn(6, 300)
    A[0] = 0.0  # zero row
    A[1, 7] = float("nan")  # NaN poisons the row
    A[2, 9] = float("inf")  # an outlier with a threshold, poison without
    A[3] = 1e-40  # tiny scale: 127 / absmax overflows
    A[4] = 0.0  # absmax 127 (without a threshold): scale 1, exact halves round to even
    A[4, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])
    A = A.to(dtype)
    q, stats, cols = ops.int8_vectorwise_quant(A, threshold)
    qc, statsc, colsc = ops.int8_vectorwise_quant(A.cuda(), threshold)
    assert_bits_equal(qc, q)
    assert_bits_equal(statsc, stats)
    if cols is not None:
        assert_bits_equal(colsc, cols)


# Shapes for the elementwise int8 dequant kernels, whose grid-stride loops track (row, column)
# without a division per element: several steps per thread with column wrap-around, one column,
# and rows longer than the whole grid's stride.
ROWCOL_SHAPES = [(37, 65), (300, 7), (3000, 1), (3, 70000)]


@pytest.mark.parametrize("shape", ROWCOL_SHAPES, ids=str)
def test_int8_vectorwise_dequant(shape):
    A = torch.randint(-127, 128, shape, dtype=torch.int8)
    stats = torch.rand(shape[0]) * 10
    stats[0] = float("nan")  # the CPU keeps this NaN's bits (the GPU's own NaN is 0x7fffffff)
    stats[1] = -float("nan")
    stats[2] = float("inf")
    A[2, :3] = 0  # 0 * Inf: the CPU's default NaN
    assert_bits_equal(
        ops.int8_vectorwise_dequant(A.cuda(), stats.cuda()), ops.int8_vectorwise_dequant(A, stats)
    )


@pytest.mark.parametrize("M", [1, 3, 8, 9, 64, 130])
@pytest.mark.parametrize("K", [1, 15, 16, 64, 100, 4096])
@pytest.mark.parametrize("N", [1, 70])
def test_int8_linear_matmul(M, K, N):
    # The full int8 range: -128 (which the quantizer never produces) must multiply as a signed
    # byte in every path (dp4a, the byte loops, the packed words of the tiled kernel).
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    A[0, 0], B[0, -1] = -128, -128
    expected = ops.int8_linear_matmul(A, B)
    assert_bits_equal(ops.int8_linear_matmul(A.cuda(), B.cuda()), expected)
    # misaligned views (offset by one byte) take the unvectorised loads
    Ao = torch.randint(-128, 128, (M * K + 1,), dtype=torch.int8)
    Av = Ao[1:].view(M, K)
    assert_bits_equal(
        ops.int8_linear_matmul(Ao.cuda()[1:].view(M, K), B.cuda()), ops.int8_linear_matmul(Av, B)
    )


def test_int8_linear_matmul_extremes_and_out():
    # The largest magnitudes: -127 * -127 summed over K must stay exact in int32.
    K = 8192
    A = torch.full((65, K), -127, dtype=torch.int8)
    B = torch.full((3, K), -127, dtype=torch.int8)
    out = torch.empty(65, 6, dtype=torch.int32, device="cuda")[:, ::2]
    ops.int8_linear_matmul.out(A.cuda(), B.cuda(), out=out)
    assert out.eq(127 * 127 * K).all()
    A3 = torch.randint(-127, 128, (2, 3, 0), dtype=torch.int8)
    B0 = torch.randint(-127, 128, (5, 0), dtype=torch.int8)
    assert_bits_equal(
        ops.int8_linear_matmul(A3.cuda(), B0.cuda()), torch.zeros(2, 3, 5, dtype=torch.int32)
    )


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES + [None], ids=DTYPE_IDS + ["default"])
@pytest.mark.parametrize("bias_dtype", FLOAT_DTYPES + [None], ids=DTYPE_IDS + ["nobias"])
def test_int8_mm_dequant(out_dtype, bias_dtype):
    C = torch.randint(-(2**24), 2**24, (2, 17, 45), dtype=torch.int32)
    row = torch.rand(34) * 5
    col = torch.rand(45) * 5
    bias = None if bias_dtype is None else torch.randn(45).to(bias_dtype)
    out = ops.int8_mm_dequant(C, row, col, out_dtype, bias)
    outc = ops.int8_mm_dequant(
        C.cuda(), row.cuda(), col.cuda(), out_dtype, None if bias is None else bias.cuda()
    )
    assert_bits_equal(outc, out)


@pytest.mark.parametrize("shape", ROWCOL_SHAPES, ids=str)
def test_int8_mm_dequant_shapes(shape):
    rows, N = shape
    C = torch.randint(-(2**24), 2**24, shape, dtype=torch.int32)
    row, col, bias = torch.rand(rows) * 5, torch.rand(N) * 5, torch.randn(N).to(torch.bfloat16)
    out = ops.int8_mm_dequant(C, row, col, torch.float16, bias)
    outc = ops.int8_mm_dequant(C.cuda(), row.cuda(), col.cuda(), torch.float16, bias.cuda())
    assert_bits_equal(outc, out)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize(
    "a_shape,N", [((1, 64), 48), ((4, 7, 96), 33), ((130, 128), 200), ((0, 16), 8)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear(dtype, threshold, a_shape, N, with_bias):
    K = a_shape[-1]
    A = activations(a_shape, dtype)
    W = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    W_scale = torch.rand(N) + 0.5
    bias = torch.randn(N).to(dtype) if with_bias else None
    out = ops.int8_linear(A, W, W_scale, bias, threshold)
    outc = ops.int8_linear(
        A.cuda(), W.cuda(), W_scale.cuda(), None if bias is None else bias.cuda(), threshold
    )
    assert outc.dtype == dtype and outc.shape == out.shape
    if threshold == 0.0:
        assert_bits_equal(outc, out)  # integer GEMM + the same dequant: no sum-order freedom
    else:
        rtol, atol = GEMV_TOL[dtype]
        torch.testing.assert_close(outc.cpu().float(), out.float(), rtol=rtol, atol=atol)


# ---- streams, devices, large tensors, opcheck ---------------------------------------------------


def test_non_default_stream():
    """Every op launches on the current stream: work queued on a side stream, then read from it."""
    A = torch.randn(513, 67)
    code = signed_code()
    expected = {
        "q8": ops.quantize_blockwise(A, code, 256),
        "q4": ops.quantize_4bit(A, 64, "nf4", torch.uint8),
        "i8": ops.int8_vectorwise_quant(A, 6.0),
    }
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(
            10_000_000
        )  # keep the side stream busy: a launch on the wrong stream races
        Ac = A.to("cuda", non_blocking=True)
        q8 = ops.quantize_blockwise(Ac, code.cuda(), 256)
        deq8 = ops.dequantize_blockwise(q8[0], q8[1], code.cuda(), 256, torch.bfloat16)
        q4 = ops.quantize_4bit(Ac, 64, "nf4", torch.uint8)
        deq4 = ops.dequantize_4bit(q4[0], q4[1], 64, "nf4", [513, 67], torch.float16)
        i8 = ops.int8_vectorwise_quant(Ac, 6.0)
        mm = ops.int8_linear_matmul(i8[0], i8[0][:10])
    s.synchronize()
    assert_bits_equal(q8[0], expected["q8"][0])
    assert_bits_equal(deq8, ops.dequantize_blockwise(*expected["q8"], code, 256, torch.bfloat16))
    assert_bits_equal(q4[0], expected["q4"][0])
    assert_bits_equal(
        deq4, ops.dequantize_4bit(*expected["q4"], 64, "nf4", [513, 67], torch.float16)
    )
    assert_bits_equal(i8[0], expected["i8"][0])
    assert_bits_equal(mm, ops.int8_linear_matmul(expected["i8"][0], expected["i8"][0][:10]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """The device guard: inputs on cuda:1 while cuda:0 is current."""
    A = torch.randn(300, 65)
    packed, absmax = ops.quantize_4bit(A, 64, "fp4", torch.uint8)
    wp, wq, wn = nested_weight(32, 256, 64, 64)
    wargs = [wp, [32, 256], wq, code16("nf4", "cpu"), 64, *wn]
    x = torch.randn(1, 256)
    with torch.cuda.device(0):
        pc, ac = ops.quantize_4bit(A.to("cuda:1"), 64, "fp4", torch.uint8)
        assert pc.device == torch.device("cuda:1")
        out = ops.dequantize_4bit(pc, ac, 64, "fp4", [300, 65], torch.float32)
        y = ops.gemv_4bit(
            x.to("cuda:1"), *[t.to("cuda:1") if torch.is_tensor(t) else t for t in wargs]
        )
        assert y.device == torch.device("cuda:1")
    assert_bits_equal(pc, packed)
    assert_bits_equal(out, ops.dequantize_4bit(packed, absmax, 64, "fp4", [300, 65], torch.float32))
    scales = ops.dequantize_blockwise(wq, wn[0], wn[1], 64, torch.float32) + wn[2]
    expected = gemv_reference(x, wp, scales, "nf4", 64, 32, 256)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-3 * 16)


def test_mixed_devices_raise():
    with pytest.raises(ValueError, match="device"):
        ops.quantize_blockwise(torch.randn(64, device="cuda"), signed_code(), 64)
    with pytest.raises(ValueError, match="device"):
        ops.int8_linear_matmul(
            torch.zeros(2, 4, dtype=torch.int8, device="cuda"), torch.zeros(3, 4, dtype=torch.int8)
        )


def test_past_int32_indexing():
    """More than 2^31 elements: the index math is int64 end to end (dequantize_4bit, bf16 out)."""
    n = 2**31 + 66
    free, _ = torch.cuda.mem_get_info()
    if free < (n // 2 + 2 * n + n // 64 * 4) * 1.2:
        pytest.skip("not enough free GPU memory for a 2^31-element tensor")
    bs = 64
    nblocks = -(-n // bs)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(nblocks, device="cuda") + 0.5
    out = ops.dequantize_4bit(packed, absmax, bs, "nf4", [n], torch.bfloat16)
    # The last 3 blocks (the last one partial), decoded alone on the CPU.
    first = (nblocks - 3) * bs
    tail_n = n - first
    expected = ops.dequantize_4bit(
        packed[first // 2 :].cpu(), absmax[nblocks - 3 :].cpu(), bs, "nf4", [tail_n], torch.bfloat16
    )
    assert_bits_equal(out[first:], expected)
    del out
    # ... and quantization of a 2^31+-element tensor writes its last block.
    A = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    A[-5:] = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25], dtype=torch.bfloat16)
    del packed
    packed, absmax = ops.quantize_4bit(A, bs, "nf4", torch.uint8)
    ep, ea = ops.quantize_4bit(A[first:].cpu(), bs, "nf4", torch.uint8)
    assert_bits_equal(packed[first // 2 :], ep)
    assert_bits_equal(absmax[nblocks - 3 :], ea)


def _opcheck_cases():
    code8 = signed_code().cuda()
    A = torch.randn(33, 64, device="cuda", dtype=torch.bfloat16)
    q8, m8 = ops.quantize_blockwise(A, code8, 64)
    p4, m4 = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    code4 = code16("nf4", "cuda")
    qm4, nm4 = ops.quantize_blockwise(m4 - 0.5, code8, 64)  # a double-quantized absmax
    qi, si, _ = ops.int8_vectorwise_quant(A, 0.0)
    Wi = torch.randint(-127, 128, (16, 64), dtype=torch.int8, device="cuda")
    Ci = ops.int8_linear_matmul(qi, Wi)
    return [
        (ops.quantize_blockwise.default, (A, code8, 64)),
        (ops.dequantize_blockwise.default, (q8, m8, code8, 64, torch.float16)),
        (ops.quantize_4bit.default, (A, 64, "nf4", torch.uint8)),
        (ops.dequantize_4bit.default, (p4, m4, 64, "nf4", [33, 64], torch.bfloat16)),
        (ops.gemv_4bit.default, (A[:1], p4, [33, 64], m4, code4, 64)),
        (ops.gemv_4bit.default, (A[:1], p4, [33, 64], qm4, code4, 64, nm4, code8, 0.5, 64)),
        (ops.int8_vectorwise_quant.default, (A, 6.0)),
        (ops.int8_vectorwise_dequant.default, (qi, si)),
        (ops.int8_linear_matmul.default, (qi, Wi)),
        (
            ops.int8_mm_dequant.default,
            (Ci, si, torch.rand(16, device="cuda"), torch.bfloat16, None),
        ),
        (ops.int8_linear.default, (A, Wi, torch.rand(16, device="cuda"), None, 6.0)),
    ]


@pytest.mark.parametrize("index", range(11))
def test_opcheck_cuda(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)
