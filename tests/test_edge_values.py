"""Edge values and odd layouts: defined, tested results (the NaN/Inf/zero policy of
csrc/include/lowbit/blockscale.h), the same on every device."""

import pytest
import torch

import lowbit.functional as F
from lowbit import reference

ops = torch.ops.lowbit
FINFO = {d: torch.finfo(d) for d in (torch.float32, torch.float16, torch.bfloat16)}


def _round_trips(A, device):
    """(8-bit blockwise, nf4, fp4) dequantized round trips of A, plus their absmax."""
    code = F.create_dynamic_map().to(device)
    q, am = ops.quantize_blockwise(A, code, 64)
    out = [(ops.dequantize_blockwise(q, am, code, 64, A.dtype), am)]
    for qt in ("nf4", "fp4"):
        p, am4 = ops.quantize_4bit(A, 64, qt, torch.uint8)
        out.append((ops.dequantize_4bit(p, am4, 64, qt, list(A.shape), A.dtype), am4))
    return out


def test_all_zero_tensor_comes_back_as_exact_zeros(device, dtype):
    A = torch.zeros(3, 100, dtype=dtype, device=device)
    for back, absmax in _round_trips(A, device):
        assert torch.equal(back, A) and not back.isnan().any()
        assert torch.all(absmax == 0)
    q, stats, _ = ops.int8_vectorwise_quant(A, 6.0)
    assert torch.all(q == 0) and torch.all(stats == 0)


def test_constant_blocks_are_exact(device, dtype):
    A = torch.full((256,), 3.5, dtype=dtype, device=device)
    for back, _ in _round_trips(A, device):
        assert torch.equal(back, A)  # +1.0 is in every code, so absmax * 1 is exact


def test_subnormal_blocks_do_not_overflow(device):
    tiny = torch.tensor([1e-45, -2e-45, 0.0, 3e-45] * 16, device=device)  # fp32 subnormals
    for back, _absmax in _round_trips(tiny, device):
        assert torch.isfinite(back).all()
        assert (back - tiny).abs().max() <= tiny.abs().max()
    ref_q, ref_am = reference.quantize_4bit(tiny, 64, "nf4", torch.uint8)
    assert torch.equal(ops.quantize_4bit(tiny, 64, "nf4", torch.uint8)[0], ref_q)


def test_largest_finite_values(device, dtype):
    big = FINFO[dtype].max
    A = torch.tensor([big, -big, big / 2, 1.0] * 16, dtype=dtype, device=device)
    for back, _absmax in _round_trips(A, device):
        assert torch.isfinite(back).all()
        assert back[0] == big  # the +1 code times absmax
        assert back[1] <= -0.99 * big  # the dynamic map's most negative code is -0.99296875
    q, stats, _ = ops.int8_vectorwise_quant(A.reshape(4, 16), 0.0)
    assert torch.isfinite(stats).all()


def test_int8_path_never_overflows_through_float16(device):
    # Activations at float16's largest value in bf16/fp32: the products exceed float16's range, so
    # any detour through float16 would give Inf. lowbit stays in fp32 until the final rounding.
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(8, 16, device=device))
    for dtype in (torch.bfloat16, torch.float32):
        A = torch.full((4, 16), 65504.0, device=device).to(dtype)
        for threshold in (0.0, 6.0):
            out = ops.int8_linear(A, W, SCB, None, threshold)
            assert torch.isfinite(out).all() and out.abs().max() > 65504


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_poisons_exactly_its_block(device, dtype, bad):
    A = torch.randn(4, 64, device=device).to(dtype)
    A[1, 7] = bad
    for back, absmax in _round_trips(A, device):
        assert absmax.isnan().tolist() == [False, True, False, False]
        assert back[1].isnan().all()
        assert not back[[0, 2, 3]].isnan().any()
    q, stats, _ = ops.int8_vectorwise_quant(A, 0.0)
    assert stats.isnan().tolist() == [False, True, False, False] and torch.all(q[1] == 0)


def test_inf_with_threshold_goes_to_the_float_path(device):
    A = torch.randn(3, 32, device=device)
    A[0, 4] = float("inf")
    q, stats, cols = ops.int8_vectorwise_quant(A, 6.0)
    assert cols.tolist() == [4] and torch.isfinite(stats).all()
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(8, 32, device=device))
    out = ops.int8_linear(A, W, SCB, None, 6.0)
    assert torch.isinf(out[0]).any() and torch.isfinite(out[1:]).all()


def test_threshold_edges(device):
    A = torch.ones(4, 8, device=device)
    A[2, 3] = 6.0  # exactly at the threshold: an outlier (|a| >= threshold)
    _, _, cols = ops.int8_vectorwise_quant(A, 6.0)
    assert cols.tolist() == [3]
    _, _, cols = ops.int8_vectorwise_quant(A, 6.0001)
    assert cols.tolist() == []
    every = torch.full((4, 8), 10.0, device=device)
    q, stats, cols = ops.int8_vectorwise_quant(every, 6.0)
    assert cols.tolist() == list(range(8)) and torch.all(q == 0) and torch.all(stats == 0)
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(5, 8, device=device))
    out = ops.int8_linear(every, W, SCB, None, 6.0)  # all through the float path
    torch.testing.assert_close(out, every @ reference.int8_weight_dequant(W, SCB).t())


def test_empty_shapes(device):
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(5, 8, device=device))
    assert ops.int8_linear(torch.empty(0, 8, device=device), W, SCB, None, 6.0).shape == (0, 5)
    q, stats, cols = ops.int8_vectorwise_quant(torch.empty(0, 8, device=device), 6.0)
    assert q.shape == (0, 8) and stats.shape == (0,) and cols.numel() == 0
    q, stats, _ = ops.int8_vectorwise_quant(torch.empty(3, 0, device=device), 0.0)
    assert q.shape == (3, 0) and stats.tolist() == [0.0, 0.0, 0.0]
    C = ops.int8_linear_matmul(
        torch.empty(3, 0, dtype=torch.int8, device=device),
        torch.empty(4, 0, dtype=torch.int8, device=device),
    )
    assert torch.equal(C, torch.zeros(3, 4, dtype=torch.int32, device=device))
    packed, absmax = ops.quantize_4bit(torch.randn(6, 64, device=device), 64, "nf4", torch.uint8)
    code = F.get_4bit_type("nf4", device=device)
    assert ops.gemv_4bit(
        torch.empty(0, 64, device=device), packed, [6, 64], absmax, code, 64
    ).shape == (0, 6)


def test_one_dimensional_and_three_dimensional_activations(device):
    W, SCB, _ = ops.int8_vectorwise_quant(torch.randn(5, 8, device=device))
    x = torch.randn(8, device=device)
    one = ops.int8_linear(x, W, SCB, None, 6.0)
    assert one.shape == (5,)
    torch.testing.assert_close(one, ops.int8_linear(x[None], W, SCB, None, 6.0)[0])
    x3 = torch.randn(2, 3, 8, device=device)
    torch.testing.assert_close(
        ops.int8_linear(x3, W, SCB, None, 6.0),
        ops.int8_linear(x3.reshape(6, 8), W, SCB, None, 6.0).reshape(2, 3, 5),
    )


def test_expanded_and_offset_views(device, dtype):
    base = torch.randn(1, 200, device=device).to(dtype)
    expanded = base.expand(5, 200)  # stride 0 rows
    offset = torch.randn(1100, device=device).to(dtype)[17 : 17 + 5 * 200].view(5, 200)
    code = F.create_dynamic_map().to(device)
    for view in (expanded, offset, offset.t()):
        dense = view.contiguous()
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                ops.quantize_4bit(view, 64, "nf4", torch.uint8),
                ops.quantize_4bit(dense, 64, "nf4", torch.uint8),
            )
        )
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                ops.quantize_blockwise(view, code, 64), ops.quantize_blockwise(dense, code, 64)
            )
        )
        got, want = ops.int8_vectorwise_quant(view, 2.0), ops.int8_vectorwise_quant(dense, 2.0)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    absmax = torch.rand(40, device=device)[::2]  # non-contiguous absmax
    q = torch.randint(0, 255, (20, 64), dtype=torch.uint8, device=device)
    assert torch.equal(
        ops.dequantize_blockwise(q, absmax, code, 64, torch.float32),
        ops.dequantize_blockwise(q, absmax.contiguous(), code, 64, torch.float32),
    )


def test_int8_row_with_a_tiny_scale_keeps_its_zeros(device):
    # absmax 1e-38: 127 / absmax overflows fp32, so the row divides first; 0 stays 0 (not
    # 0 * Inf = NaN -> -127) and the largest element still gets code 127.
    A = torch.tensor([[1e-38, 0.0, -5e-39, 2.5e-39]], device=device)
    q, stats, _ = ops.int8_vectorwise_quant(A, 0.0)
    assert q.tolist() == [[127, 0, -64, 32]] and stats.tolist() == [pytest.approx(1e-38)]
    assert torch.equal(q, reference.int8_vectorwise_quant(A, 0.0)[0])


def test_gemv_edge_activations_on_the_cpu():
    # The CPU's int8-activation 4-bit product (M <= 32, K % 64 == 0) hands NaN/Inf and tiny
    # activations to the exact fp32 kernel, so they keep their meaning: NaN/Inf rows give NaN/Inf
    # outputs, a 1e-39 row a tiny nonzero output, an all-zero row exact zeros.
    N, K = 24, 256
    W = torch.randn(N, K)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    code = F.get_4bit_type("nf4")
    x = torch.randn(4, K)
    x[1] = 0.0
    out = ops.gemv_4bit(x, packed, [N, K], absmax, code, 64)
    assert torch.equal(out[1], torch.zeros(N))
    torch.testing.assert_close(
        out, reference.gemv_4bit_expected(x, packed, [N, K], absmax, code, 64), rtol=1e-4, atol=1e-3
    )
    exact = reference.gemv_4bit(x, packed, [N, K], absmax, code, 64)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 7] = bad
        out = ops.gemv_4bit(y, packed, [N, K], absmax, code, 64)
        assert not out[2].isfinite().any()
        # the other rows: the exact kernel's answer (the whole call fell back to it)
        keep = [0, 1, 3]
        torch.testing.assert_close(out[keep], exact[keep], rtol=1e-4, atol=1e-4)
    tiny = torch.full((1, K), 1e-39)
    out = ops.gemv_4bit(tiny, packed, [N, K], absmax, code, 64)
    ref = reference.gemv_4bit(tiny.double(), packed, [N, K], absmax.double(), code.double(), 64)
    assert (out != 0).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=0)


def test_gemv_nan_weight_block_poisons_its_rows_on_every_path():
    # A NaN/Inf weight block quantizes to absmax NaN: every product that reads it is NaN, on the
    # int8-activation path (M = 1..32) and on BLAS tiles (M > 32) alike.
    N, K = 8, 128
    W = torch.randn(N, K)
    W[3, 70] = float("nan")
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    code = F.get_4bit_type("nf4")
    for M in (1, 5, 40):
        out = ops.gemv_4bit(torch.randn(M, K), packed, [N, K], absmax, code, 64)
        assert out[:, 3].isnan().all()
        assert out[:, [0, 1, 2, 4, 5, 6, 7]].isfinite().all()


@pytest.mark.parametrize(
    "case", ["nan code", "tiny code", "zero code", "huge weights", "huge activations"]
)
def test_gemv_inputs_the_int8_path_cannot_hold_get_the_exact_kernel(case):
    # Codes it cannot put on its integer grid, and magnitudes whose fp32 scale products could
    # overflow, go to the exact fp32 kernel: never a NaN or a wrong finite number in their place.
    N, K = 4, 128
    torch.manual_seed(0)
    W, x = torch.randn(N, K), torch.randn(1, K)
    code = F.get_4bit_type("nf4").clone()
    if case == "huge weights":
        W = W * 1e35
    if case == "huge activations":
        x = x * 1e35
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    if case == "nan code":
        code[5] = float("nan")
    elif case == "tiny code":
        code = code * 1e-37
    elif case == "zero code":
        code = torch.zeros(16)
    out = ops.gemv_4bit(x, packed, [N, K], absmax, code, 64)
    exact = reference.gemv_4bit(x.double(), packed, [N, K], absmax.double(), code.double(), 64)
    assert torch.equal(out.isnan(), exact.isnan())
    expected = reference.gemv_4bit_expected(x, packed, [N, K], absmax, code, 64)
    assert torch.equal(expected.isnan(), exact.isnan())
    finite = exact.isfinite()
    # huge weights with moderate activations stay on the int8 path (nothing overflows there)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=0)
    if case != "huge weights":
        torch.testing.assert_close(out.double()[finite], exact[finite], rtol=1e-4, atol=0)
