"""bitsandbytes' top-level API in lowbit: matmul_4bit, matmul, MatmulLtState and the code-map
creators, compared with bitsandbytes (its CPU backend) on the same inputs where it is installed,
and held to lowbit's own references everywhere."""

import math

import pytest
import torch

import lowbit
import lowbit.functional as F
from lowbit import _codes, reference
from lowbit._native import cpu_gemv_mode

try:  # the comparisons need bitsandbytes; everything else runs without it
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_F
except ImportError:  # pragma: no cover - CI installs it
    bnb = bnb_F = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

# On an AVX2 CPU lowbit's 4-bit product rounds up to 32 activation rows to int8 (README, "CPU
# speed"); the bar for "the same product" is then the one test_transformers.py uses.
INT8_ACTIVATIONS = cpu_gemv_mode() == "int8"


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(
        a.double().flatten(), b.double().flatten(), dim=0
    ).item()


def _assert_same_4bit_product(ours, theirs, device):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if INT8_ACTIVATIONS and device == "cpu":
        assert _cosine(ours, theirs) > 0.9995
    else:
        scale = theirs.float().abs().max().item() + 1e-6
        tol = 1e-4 if ours.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol * scale)


# ---- matmul_4bit --------------------------------------------------------------------------------

SHAPES_4BIT = [((3, 5, 64), 48), ((1, 64), 96), ((7, 200), 33), ((64,), 64), ((40, 128), 80)]


# K = 96 / 160: multiples of 32 but not of the 64-blocks, where bitsandbytes 0.50.2's CPU 4-bit
# kernels decode with the wrong block scales (forward and gradient); lowbit is held to the exact
# product there, not compared with bitsandbytes.
@pytest.mark.parametrize("a_shape,n", SHAPES_4BIT + [((5, 96), 40), ((2, 160), 24)], ids=str)
@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-dq"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_4bit_matches_the_exact_product(device, dtype, a_shape, n, kind, with_bias):
    K = a_shape[-1]
    W = torch.randn(n, K, device=device).to(dtype)
    packed, qs = F.quantize_4bit(
        W, quant_type=kind[:3], compress_statistics=kind.endswith("dq"), blocksize=64
    )
    A = torch.randn(a_shape, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    out = lowbit.matmul_4bit(A, packed.t(), qs, bias=bias)
    exact = A.float() @ F.dequantize_4bit(packed, qs).float().t()
    if bias is not None:
        exact = exact + bias.float()
    assert out.shape == (*a_shape[:-1], n) and out.dtype == dtype
    _assert_same_4bit_product(out, exact.to(dtype), device)


@needs_bnb
@pytest.mark.parametrize("a_shape,n", SHAPES_4BIT, ids=str)
@pytest.mark.parametrize("kind", ["nf4", "fp4-dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_4bit_matches_bitsandbytes(a_shape, n, kind, dtype):
    K = a_shape[-1]
    W = torch.randn(n, K).to(dtype)
    packed, qs = bnb_F.quantize_4bit(
        W, quant_type=kind[:3], compress_statistics=kind.endswith("dq"), blocksize=64
    )
    ours_qs = F.QuantState.from_dict(qs.as_dict(packed=True), "cpu")  # bitsandbytes' own codes
    A = torch.randn(a_shape).to(dtype)
    bias = torch.randn(n).to(dtype)
    A1, A2 = A.clone().requires_grad_(), A.clone().requires_grad_()
    b1, b2 = bias.clone().requires_grad_(), bias.clone().requires_grad_(A.dim() > 1)
    ours = lowbit.matmul_4bit(A1, packed.t(), ours_qs, bias=b1)
    theirs = bnb.matmul_4bit(A2, packed.t(), qs, bias=b2)
    _assert_same_4bit_product(ours.detach(), theirs.detach(), "cpu")
    g = torch.randn_like(ours)
    ga1, gb1 = torch.autograd.grad(ours, (A1, b1), g)
    # bitsandbytes 0.50.2 sums the bias gradient over dim 0 only: for a 1-D A that is a scalar
    # and its backward raises, so its bias gradient is compared for batched A only.
    wrt = (A2, b2) if A.dim() > 1 else (A2,)
    theirs_grads = torch.autograd.grad(theirs, wrt, g)
    ga2 = theirs_grads[0]
    gb2 = theirs_grads[1] if A.dim() > 1 else g.float()
    # Gradients go through the decoded weight in both libraries: the same up to summation order.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = ga2.float().abs().max().item()
    torch.testing.assert_close(ga1.float(), ga2.float(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(gb1.float(), gb2.float(), rtol=tol, atol=tol * gb2.abs().max())


def test_matmul_4bit_gradients(device):
    W = torch.randn(24, 64, device=device)
    packed, qs = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A = torch.randn(2, 3, 64, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    out = lowbit.matmul_4bit(A, packed.t(), qs, bias=bias)
    g = torch.randn_like(out)
    out.backward(g)
    W_deq = F.dequantize_4bit(packed, qs)
    torch.testing.assert_close(A.grad, g @ W_deq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_matmul_4bit_out_and_layouts(device):
    W = torch.randn(32, 64, device=device)
    packed, qs = F.quantize_4bit(W, quant_type="fp4")
    A = torch.randn(4, 64, device=device)
    ref = lowbit.matmul_4bit(A, packed, qs)  # the packed tensor itself, or any view of its bytes
    assert torch.equal(lowbit.matmul_4bit(A, packed.t(), qs), ref)
    assert torch.equal(lowbit.matmul_4bit(A, packed.view(-1), qs), ref)
    out = torch.full((4, 32), float("nan"), device=device)
    assert lowbit.matmul_4bit(A, packed.t(), qs, out=out) is out
    assert torch.equal(out, ref)
    empty = lowbit.matmul_4bit(torch.zeros(0, 64, device=device), packed.t(), qs)
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("rows", [1, 5, 40, 300])
def test_matmul_4bit_is_linear4bit_forward(device, rows):
    """matmul_4bit and Linear4bit run one forward (nn.modules._linear_4bit), bit for bit, at every batch
    size: matmul_4bit used to keep its own copy of the dispatch, which on CUDA still dequantized
    and called F.linear for many rows after Linear4bit moved to the tiered gemv_4bit op."""
    torch.manual_seed(0)
    layer = lowbit.nn.Linear4bit(128, 48, quant_type="nf4", compress_statistics=True)
    layer = layer.to(device)
    A = torch.randn(rows, 128, device=device)
    w = layer.weight
    got = lowbit.matmul_4bit(A, w.t(), w.quant_state, bias=layer.bias)
    assert torch.equal(got, layer(A))


def test_matmul_4bit_weight_quantized_transposed_warns_like_bitsandbytes():
    W = torch.randn(64, 48)  # a [K, N] weight: bitsandbytes deprecates, still computes A @ W
    packed, qs = F.quantize_4bit(W, quant_type="nf4")
    A = torch.randn(3, 64)
    with pytest.warns(DeprecationWarning, match="quantized from a \\[K, N\\]"):
        out = lowbit.matmul_4bit(A, packed.t(), qs)
    torch.testing.assert_close(out, A @ F.dequantize_4bit(packed, qs), rtol=1e-5, atol=1e-5)


def test_matmul_4bit_bad_input():
    W = torch.randn(32, 64)
    packed, qs = F.quantize_4bit(W, quant_type="nf4")
    A = torch.randn(2, 64)
    with pytest.raises(ValueError, match="quant_state is required"):
        lowbit.matmul_4bit(A, packed, None)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        lowbit.matmul_4bit(A, packed, {"shape": (32, 64)})
    with pytest.raises(TypeError, match="A must be a floating-point tensor"):
        lowbit.matmul_4bit(A.to(torch.int32), packed, qs)
    with pytest.raises(TypeError, match="B must be a torch.Tensor"):
        lowbit.matmul_4bit(A, packed.numpy(), qs)
    with pytest.raises(TypeError, match="B must be the packed 4-bit weight"):
        lowbit.matmul_4bit(A, W, qs)
    with pytest.raises(ValueError, match="B must hold the 1024 packed bytes"):
        lowbit.matmul_4bit(A, packed[:-1], qs)
    with pytest.raises(ValueError, match="A's last dimension \\(63\\)"):
        lowbit.matmul_4bit(torch.randn(2, 63), packed, qs)
    with pytest.raises(ValueError, match="bias must have shape \\[32\\]"):
        lowbit.matmul_4bit(A, packed, qs, bias=torch.randn(31))
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        lowbit.matmul_4bit(A, packed, qs, bias=torch.ones(32, dtype=torch.int64))
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape \\[2, 32\\]"):
        lowbit.matmul_4bit(A, packed, qs, out=torch.empty(2, 31))


# ---- matmul (LLM.int8()) --------------------------------------------------------------------------


def _fp16_exact(*shape, scale=1.0):
    """Random values that float16 holds exactly: bitsandbytes quantizes through float16, lowbit
    from the input's own dtype, and on these both see the same numbers."""
    return (torch.randn(*shape) * scale).half().float()


@needs_bnb
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("a_shape", [(4, 64), (2, 3, 64), (1, 200)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matmul_int8_matches_bitsandbytes(threshold, a_shape, dtype):
    K = a_shape[-1]
    W = _fp16_exact(48, K).to(dtype)
    A = _fp16_exact(*a_shape, scale=3.0).to(dtype)  # |a| >= 6 happens: outlier columns
    bias = _fp16_exact(48).to(dtype)
    ours_state = lowbit.MatmulLtState()
    theirs_state = bnb.MatmulLtState()
    theirs_state.is_training = (
        False  # bitsandbytes' LLM.int8() path (its CPU training path differs)
    )
    A1, A2 = A.clone().requires_grad_(), A.clone().requires_grad_()
    b1, b2 = bias.clone().requires_grad_(), bias.clone().requires_grad_()
    ours = lowbit.matmul(A1, W, state=ours_state, threshold=threshold, bias=b1)
    theirs = bnb.matmul(A2, W, state=theirs_state, threshold=threshold, bias=b2)
    assert ours.shape == theirs.shape == (*a_shape[:-1], 48) and ours.dtype == theirs.dtype
    # The weight is quantized into the state as bitsandbytes does: the same row scales, the same
    # codes except at exact .5 ties of w * 127 / absmax, which the two libraries' fp32 scaling
    # rounds a hair apart (one code step, a few in 10^5 elements).
    assert torch.equal(ours_state.SCB, theirs_state.SCB)
    code_diff = (ours_state.CB.int() - theirs_state.CB.int()).abs()
    assert code_diff.max() <= 1 and code_diff.float().mean() < 1e-3
    assert ours_state.threshold == theirs_state.threshold == threshold
    scale = theirs.float().abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol * scale)
    g = torch.randn_like(ours)
    ga1, gb1 = torch.autograd.grad(ours, (A1, b1), g)
    ga2 = torch.autograd.grad(theirs, A2, g)[0]
    # dA = grad @ (CB * SCB / 127) in both; the rare tie codes above move it by one code step.
    gscale = ga2.float().abs().max().item()
    gtol = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ga1.float(), ga2.float(), rtol=gtol, atol=gtol * gscale)
    W_deq = reference.int8_weight_dequant(ours_state.CB, ours_state.SCB)
    exact = (g.float() @ W_deq).to(dtype)
    torch.testing.assert_close(ga1, exact, rtol=gtol, atol=gtol * gscale)
    torch.testing.assert_close(gb1, g.reshape(-1, 48).sum(0), rtol=gtol, atol=gtol)


@needs_bnb
def test_matmul_int8_prequantized_weight_like_linear8bitlt():
    # bitsandbytes' Linear8bitLt calls matmul(x, weight_codes, state=state) with CB/SCB set.
    W = _fp16_exact(32, 64)
    CB, SCB, _ = F.int8_vectorwise_quant(W)
    A = _fp16_exact(5, 64)
    ours_state = lowbit.MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False)
    theirs_state = bnb.MatmulLtState()
    theirs_state.CB, theirs_state.SCB = CB, SCB
    theirs_state.has_fp16_weights, theirs_state.is_training = False, False
    ours = lowbit.matmul(A, CB, state=ours_state)
    theirs = bnb.matmul(A, CB, state=theirs_state)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * scale)
    assert ours_state.CB is CB  # codes from the state are used as they are


@needs_bnb
def test_matmul_int8_float_weight_gradient_matches_bitsandbytes_training():
    # has_fp16_weights=True (the default state) with a trainable weight: bitsandbytes' CPU
    # training path returns the exact float gradient grad^T @ A, and so does lowbit.
    W = _fp16_exact(16, 32)
    A = _fp16_exact(6, 32)
    W1, W2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    ours = lowbit.matmul(A, W1)
    theirs = bnb.matmul(A, W2)
    g = torch.randn_like(ours)
    (gw1,) = torch.autograd.grad(ours, W1, g)
    (gw2,) = torch.autograd.grad(theirs, W2, g)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-5)
    # The forward is LLM.int8() in lowbit (the same on every device); bitsandbytes' CPU training
    # path multiplies by the dequantized weight: the LLM.int8() error bar separates them.
    assert _cosine(ours, theirs) > 0.9995


def test_matmul_int8_against_the_reference(device, dtype):
    W = torch.randn(40, 96, device=device).to(dtype)
    A = (torch.randn(7, 96, device=device) * 3).to(dtype)
    state = lowbit.MatmulLtState(has_fp16_weights=False)
    out = lowbit.matmul(A, W, state=state, threshold=6.0)
    expected = reference.int8_linear(A, state.CB, state.SCB, None, 6.0)
    torch.testing.assert_close(out, expected.to(dtype), rtol=1e-2, atol=1e-2)
    # quantized once: a second call reuses the state's codes
    codes = state.CB
    lowbit.matmul(A, W, state=state)
    assert state.CB is codes and state.threshold == 6.0


def test_matmul_int8_requantizes_while_training_like_bitsandbytes():
    W = torch.randn(8, 16)
    state = lowbit.MatmulLtState()  # has_fp16_weights=True, is_training=True
    lowbit.matmul(torch.randn(2, 16), W, state=state)
    first = state.CB
    lowbit.matmul(torch.randn(2, 16), W * 2, state=state)
    assert state.CB is not first and torch.equal(state.SCB, F.int8_vectorwise_quant(W * 2)[1])


def test_matmul_int8_out_and_empty():
    W = torch.randn(8, 16)
    A = torch.randn(3, 16)
    out = torch.empty(3, 8)
    res = lowbit.matmul(A, W, out=out)
    assert res is out and torch.equal(out, lowbit.matmul(A, W))
    assert lowbit.matmul(torch.zeros(0, 16), W).shape == (0, 8)


def test_matmul_int8_bad_input():
    W = torch.randn(8, 16)
    A = torch.randn(3, 16)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        lowbit.matmul(A, W, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        lowbit.matmul(A, W, threshold=math.inf)
    with pytest.raises(TypeError, match="threshold must be a number"):
        lowbit.matmul(A, W, threshold="6")
    with pytest.raises(TypeError, match="state must be a MatmulLtState"):
        lowbit.matmul(A, W, state={})
    with pytest.raises(TypeError, match="A must be a floating-point tensor"):
        lowbit.matmul(A.long(), W)
    with pytest.raises(TypeError, match="B must be a float weight or int8 codes"):
        lowbit.matmul(A, W.to(torch.int32))
    with pytest.raises(ValueError, match="B holds int8 codes but state.SCB"):
        lowbit.matmul(A, W.to(torch.int8))
    with pytest.raises(ValueError, match="B must be a 2-D"):
        lowbit.matmul(A, W[None])
    with pytest.raises(ValueError, match="A's last dimension must equal B's K = 16"):
        lowbit.matmul(torch.randn(3, 15), W)
    with pytest.raises(ValueError, match="bias must have shape \\[8\\]"):
        lowbit.matmul(A, W, bias=torch.randn(9))
    with pytest.raises(ValueError, match="state.SCB must hold one scale per row"):
        lowbit.matmul(A, W.to(torch.int8), state=lowbit.MatmulLtState(SCB=torch.ones(7)))


def test_matmul_lt_state_fields_match_bitsandbytes():
    state = lowbit.MatmulLtState()
    assert (state.threshold, state.has_fp16_weights, state.is_training) == (0.0, True, True)
    state.CB = torch.ones(1, dtype=torch.int8)
    state.reset_grads()
    assert state.CB is None and state.SCB is None
    if bnb is not None:
        theirs = bnb.MatmulLtState()
        for name in ("CB", "SCB", "threshold", "has_fp16_weights", "is_training", "idx", "subB"):
            assert getattr(state, name) == getattr(theirs, name), name


# ---- code maps --------------------------------------------------------------------------------


def _bit_identical(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.int32), b.view(torch.int32))
    )


@needs_bnb
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("total_bits", range(1, 9))
@pytest.mark.parametrize("add_zero", [True, False])
def test_create_linear_map_matches_bitsandbytes(signed, total_bits, add_zero):
    ours = F.create_linear_map(signed, total_bits, add_zero)
    assert _bit_identical(ours, bnb_F.create_linear_map(signed, total_bits, add_zero))


@needs_bnb
@pytest.mark.parametrize("offset", [0.9677083, 0.99, 0.95, 0.75])
@pytest.mark.parametrize("use_extra_value", [True, False])
def test_create_normal_map_matches_bitsandbytes(offset, use_extra_value):
    pytest.importorskip("scipy", reason="bitsandbytes' create_normal_map needs scipy")
    ours = F.create_normal_map(offset, use_extra_value)
    assert _bit_identical(ours, bnb_F.create_normal_map(offset, use_extra_value))


def _fp8_args():
    for signed in (True, False):
        for total in range(2, 9):
            for e in range(1, total + 1):
                p = total - e - int(signed)
                if p >= 0:
                    yield signed, e, p, total


@needs_bnb
@pytest.mark.parametrize("signed,e,p,total", list(_fp8_args()))
def test_create_fp8_map_matches_bitsandbytes(signed, e, p, total):
    assert _bit_identical(
        F.create_fp8_map(signed, e, p, total), bnb_F.create_fp8_map(signed, e, p, total)
    )


def test_code_maps_agree_with_the_format_tables():
    # The default normal map IS NF4 (sorted, zero-padded). create_fp8_map(True, 2, 1, 4) is FP4
    # but for the smallest magnitude (0.25/12 there, 0.0625/12 in the FP4 code quantization uses).
    nf4 = F.create_normal_map()
    assert nf4.shape == (256,)
    assert torch.equal(torch.unique(nf4), torch.tensor(_codes.NF4_CODE))
    fp4_map = torch.unique(F.create_fp8_map(True, 2, 1, 4))
    fp4 = torch.unique(torch.tensor(_codes.FP4_CODE))
    differ = fp4_map != fp4
    assert differ.sum() == 2 and torch.equal(fp4_map[differ].abs(), torch.full((2,), 0.25 / 12))
    lin = F.create_linear_map(signed=True)
    assert lin.shape == (256,) and lin[0] == -1 and lin[-1] == 1
    assert torch.all(lin[1:] >= lin[:-1]) and (lin == 0).any()
    assert torch.equal(F.create_linear_map(signed=False, add_zero=False), torch.linspace(0, 1, 256))


def test_code_maps_bad_input():
    with pytest.raises(ValueError, match="total_bits must be an int in 1..8"):
        F.create_linear_map(total_bits=9)
    with pytest.raises(ValueError, match="offset must be in \\(0.5, 1\\)"):
        F.create_normal_map(offset=1.0)
    with pytest.raises(TypeError, match="offset must be a number"):
        F.create_normal_map(offset="0.9")
    with pytest.raises(ValueError, match="must equal total_bits"):
        F.create_fp8_map(True, 4, 4, 8)
    with pytest.raises(ValueError, match="exponent_bits must be an int >= 1"):
        F.create_fp8_map(True, 0, 7, 8)


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8"])
def test_linear_state_dict_keys_match_bitsandbytes(kind):
    lin = torch.nn.Linear(64, 32)
    if kind == "int8":
        ours = lowbit.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        theirs = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    else:
        args = {"quant_type": kind[:3], "compress_statistics": kind.endswith("dq")}
        ours = lowbit.nn.Linear4bit(64, 32, **args)
        theirs = bnb.nn.Linear4bit(64, 32, **args)
    ours.load_state_dict(lin.state_dict())
    theirs.load_state_dict(lin.state_dict())
    a, b = ours.to("cpu").state_dict(), theirs.to("cpu").state_dict()
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k


def test_products_and_embeddings_compile_fullgraph():
    W = torch.randn(48, 64)
    packed, qs = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A = torch.randn(3, 64)
    f4 = torch.compile(lambda a: lowbit.matmul_4bit(a, packed.t(), qs), fullgraph=True)
    assert torch.equal(f4(A), lowbit.matmul_4bit(A, packed.t(), qs))
    state = lowbit.MatmulLtState(has_fp16_weights=False)
    lowbit.matmul(A, W, state=state)
    f8 = torch.compile(
        lambda a: lowbit.matmul(a, state.CB, state=state, threshold=6.0), fullgraph=True
    )
    assert torch.equal(f8(A), lowbit.matmul(A, state.CB, state=state, threshold=6.0))
    idx = torch.randint(0, 50, (2, 5))
    for emb in (lowbit.nn.EmbeddingNF4(50, 64), lowbit.nn.Embedding8bit(50, 64)):
        emb.quantize_()
        assert torch.equal(torch.compile(emb, fullgraph=True)(idx), emb(idx))
