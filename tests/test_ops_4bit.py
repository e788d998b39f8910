"""4-bit NF4 / FP4: code tables, nibble order, kernels against reference.py, round-trip error,
double quantization and the fused dequantize + product."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit.functional as F
from conftest import non_contiguous
from lowbit import reference

ops = torch.ops.lowbit
QUANT_TYPES = ["nf4", "fp4"]
SHAPES = [(1,), (2,), (31,), (64,), (65,), (1000, 37), (3, 5, 129), (1, 4096), (4096, 11)]

NF4_DESIGN = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]  # fmt: skip
FP4_DESIGN = [
    v / 12 for v in [0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]
]


def test_code_tables_are_the_designed_ones():
    assert F.get_4bit_type("nf4").tolist() == torch.tensor(NF4_DESIGN).tolist()
    assert F.get_4bit_type("fp4").tolist() == torch.tensor(FP4_DESIGN).tolist()
    with pytest.raises(ValueError, match="typename"):
        F.get_4bit_type("nf5")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_every_code_round_trips_through_its_nibble(quant_type):
    # A block holding exactly the 16 code values (absmax 1) must quantize to nibbles 0..15
    # (except FP4's -0 which is +0's equal) in HIGH-then-LOW nibble order.
    code = F.get_4bit_type(quant_type)
    packed, absmax = ops.quantize_4bit(code.repeat(2), 32, quant_type, torch.uint8)
    assert absmax.tolist() == [1.0]
    nibbles = reference.unpack_nibbles(packed, 32)[:16]
    expected = list(range(16))
    if quant_type == "fp4":
        expected[8] = 0  # -0.0 ties with +0.0: the lower code wins
    assert nibbles.tolist() == expected
    assert packed[0, 0].item() == (expected[0] << 4) | expected[1]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_matches_reference(device, dtype, quant_type, shape, blocksize):
    A = torch.randn(shape, device=device).to(dtype)
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    rpacked, rabsmax = reference.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    n = A.numel()
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(absmax, rabsmax)
    assert torch.equal(packed, rpacked)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(1,), (33,), (1000, 37), (64, 64)])
def test_dequantize_matches_reference(device, dtype, quant_type, shape):
    A = torch.randn(shape, device=device)
    packed, absmax = ops.quantize_4bit(A, 64, quant_type, torch.uint8)
    out = ops.dequantize_4bit(packed, absmax, 64, quant_type, list(shape), dtype)
    ref = reference.dequantize_4bit(packed, absmax, 64, quant_type, shape, dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, ref)


@pytest.mark.parametrize("quant_type,bar", [("nf4", 0.0734), ("fp4", 0.0974)])
def test_round_trip_error(quant_type, bar):
    # bitsandbytes' own bars: mean absolute error on randn(1024, 1024) at blocksize 64.
    A = torch.randn(1024, 1024)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
    assert (F.dequantize_4bit(packed, state) - A).abs().mean().item() < bar


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant(quant_type):
    A = torch.randn(1024, 1024)
    packed, state = F.quantize_4bit(
        A, blocksize=64, quant_type=quant_type, compress_statistics=True
    )
    plain, plain_state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, plain)  # only the statistics are compressed
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert state.offset.item() == pytest.approx(plain_state.absmax.mean().item())
    # absmax decoded from 8 bits stays close to the fp32 one
    decoded = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    torch.testing.assert_close(decoded, plain_state.absmax, rtol=0.01, atol=1e-3)
    bar = 0.0734 if quant_type == "nf4" else 0.0974
    assert (F.dequantize_4bit(packed, state) - A).abs().mean().item() < bar


@pytest.mark.parametrize(
    "storage", [torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32, torch.int32]
)
def test_quant_storage_reinterprets_the_same_bytes(device, storage):
    A = torch.randn(64, 64, device=device)
    ref, ref_absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", storage)
    assert packed.dtype == storage and packed.dim() == 2 and packed.shape[1] == 1
    assert torch.equal(packed.view(torch.uint8).reshape(-1, 1), ref)
    out = ops.dequantize_4bit(packed, absmax, 64, "nf4", [64, 64], torch.float32)
    assert torch.equal(
        out, ops.dequantize_4bit(ref, ref_absmax, 64, "nf4", [64, 64], torch.float32)
    )


def test_quant_storage_that_cannot_hold_the_bytes_is_refused():
    with pytest.raises(ValueError, match="whole torch.float32"):
        ops.quantize_4bit(torch.randn(6), 64, "nf4", torch.float32)  # 3 bytes


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize(
    "M,N,K",
    [
        (1, 64, 64),
        (1, 33, 65),
        (3, 100, 129),
        (16, 256, 512),
        (1, 1, 1),
        (32, 70, 256),  # the most rows the CPU's int8-activation kernel takes
        (33, 70, 256),  # CPU: BLAS on dequantized weight tiles
        (9, 33, 100),  # CPU: K % blocksize != 0, the fused fp32 kernel
        (40, 9000, 128),  # CPU: several BLAS tiles
    ],
)
def test_gemv_matches_reference(device, dtype, quant_type, M, N, K):
    W = torch.randn(N, K, device=device)
    packed, absmax = ops.quantize_4bit(W, 64, quant_type, torch.uint8)
    code = F.get_4bit_type(quant_type, device=device)
    A = torch.randn(M, K, device=device).to(dtype)
    out = ops.gemv_4bit(A, packed, [N, K], absmax, code, 64)
    ref = reference.gemv_4bit_expected(A, packed, [N, K], absmax, code, 64)
    assert out.shape == (M, N) and out.dtype == dtype
    # fp32 accumulation in another order, then one rounding to dtype
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * K**0.5)


def test_gemv_leading_dims_and_non_contiguous(device):
    W = torch.randn(48, 80, device=device)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    code = F.get_4bit_type("nf4", device=device)
    A = torch.randn(2, 3, 80, device=device)
    out = ops.gemv_4bit(A, packed, [48, 80], absmax, code, 64)
    assert out.shape == (2, 3, 48)
    assert torch.equal(ops.gemv_4bit(non_contiguous(A), packed, [48, 80], absmax, code, 64), out)


def test_functional_gemv_decodes_nested_absmax():
    W = torch.randn(64, 256)
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A = torch.randn(1, 256)
    absmax = F.decode_absmax(state)
    expected = reference.gemv_4bit_expected(A, packed, [64, 256], absmax, state.code, 64)
    torch.testing.assert_close(F.gemv_4bit(A, packed, state=state), expected, rtol=1e-4, atol=1e-4)
    if not reference.cpu_gemv_takes_int8(1, 256, 64):
        torch.testing.assert_close(expected, A @ F.dequantize_4bit(packed, state).t())


def _nested(W, blocksize, quant_type, nested_blocksize):
    """W quantized to 4 bits with a double-quantized absmax: (packed, code4, uint8 absmax codes,
    nested_absmax, nested_code, offset as a float, the fp32 absmax decoded the unfused way)."""
    packed, absmax = ops.quantize_4bit(W, blocksize, quant_type, torch.uint8)
    code8 = F.create_dynamic_map().to(W.device)
    offset = absmax.mean()
    q, absmax2 = ops.quantize_blockwise(absmax - offset, code8, nested_blocksize)
    # the unfused path: dequantize_blockwise to fp32, then + offset (functional.decode_absmax)
    decoded = ops.dequantize_blockwise(q, absmax2, code8, nested_blocksize, torch.float32) + offset
    code4 = F.get_4bit_type(quant_type, device=W.device)
    return packed, code4, q, absmax2, code8, float(offset), decoded


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize(
    "M,N,K,blocksize,nested_blocksize",
    [
        (1, 64, 64, 64, 256),  # one nested block, partial
        (1, 33, 65, 32, 64),  # odd K: rows start mid-byte; several nested blocks
        (3, 100, 129, 32, 64),  # M > 1, last nested block partial
        (1, 300, 4096, 64, 256),  # 19200 blocks over 75 nested blocks (the QLoRA layout)
        (1, 40, 1024, 128, 4096),
        (2, 17, 256, 256, 128),
        (1, 9, 448, 128, 64),  # rows start inside a block (K % blocksize != 0)
        (3, 5, 192, 256, 64),
        (40, 9000, 128, 64, 256),  # CPU: BLAS tiles, scales decoded per tile
        (36, 40, 256, 32, 64),
        (1, 1, 1, 64, 256),
    ],
)
def test_gemv_nested_equals_unfused(
    device, dtype, quant_type, M, N, K, blocksize, nested_blocksize
):
    W = torch.randn(N, K, device=device)
    packed, code4, q, absmax2, code8, offset, decoded = _nested(
        W, blocksize, quant_type, nested_blocksize
    )
    ref_absmax = reference.decode_nested_absmax(q, absmax2, code8, offset, nested_blocksize)
    assert torch.equal(decoded, ref_absmax)  # the spec's scale is the unfused one, bit for bit
    A = torch.randn(M, K, device=device).to(dtype)
    fused = ops.gemv_4bit(
        A, packed, [N, K], q, code4, blocksize, absmax2, code8, offset, nested_blocksize
    )
    unfused = ops.gemv_4bit(A, packed, [N, K], decoded, code4, blocksize)
    assert fused.shape == (M, N) and fused.dtype == dtype
    # the same per-block scales feed the same kernel: equal bit for bit, every dtype and path
    assert torch.equal(fused, unfused)
    ref = reference.gemv_4bit_expected(
        A, packed, [N, K], q, code4, blocksize, absmax2, code8, offset, nested_blocksize
    )
    unfused_ref = reference.gemv_4bit_expected(A, packed, [N, K], decoded, code4, blocksize)
    assert torch.equal(ref, unfused_ref)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol * K**0.5)


def test_gemv_nested_generic_kernel_is_bit_exact_with_fp32_activations():
    # The generic kernel's row decode (code * scale, then eight fixed partial sums) against the
    # same kernel on the unfused absmax, in a subprocess with LOWBIT_CPU_ISA=generic.
    script = textwrap.dedent(
        """
        import torch, lowbit.functional as F
        torch.manual_seed(0)
        for shape in [(1, 64, 64), (1, 33, 65), (4, 300, 512)]:
            M, N, K = shape
            W = torch.randn(N, K)
            packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
            A = torch.randn(M, K)
            fused = F.gemv_4bit(A, packed, state=state)
            unfused = torch.ops.lowbit.gemv_4bit(A, packed, [N, K], F.decode_absmax(state),
                                                 state.code, 64)
            assert torch.equal(fused, unfused), shape
        print("ok")
        """
    )
    env = dict(os.environ, LOWBIT_CPU_ISA="generic")
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "ok"


def test_functional_gemv_nested_is_the_unfused_product():
    W = torch.randn(96, 320)
    packed, state = F.quantize_4bit(W, quant_type="fp4", compress_statistics=True)
    for A in (torch.randn(1, 320), torch.randn(1, 320).bfloat16(), torch.randn(2, 3, 320)):
        unfused = ops.gemv_4bit(A, packed, [96, 320], F.decode_absmax(state), state.code, 64)
        assert torch.equal(F.gemv_4bit(A, packed, state=state), unfused)


def test_gemv_nested_backward_equals_unfused(device):
    W = torch.randn(48, 192, device=device)
    packed, code4, q, absmax2, code8, offset, decoded = _nested(W, 64, "nf4", 64)
    A = torch.randn(2, 192, device=device, requires_grad=True)
    g = torch.randn(2, 48, device=device)
    ops.gemv_4bit(A, packed, [48, 192], q, code4, 64, absmax2, code8, offset, 64).backward(g)
    fused_grad, A.grad = A.grad, None
    ops.gemv_4bit(A, packed, [48, 192], decoded, code4, 64).backward(g)
    assert torch.equal(fused_grad, A.grad)


def test_gemv_nested_bad_arguments():
    W = torch.randn(64, 128)
    packed, code4, q, absmax2, code8, offset, decoded = _nested(W, 64, "nf4", 64)
    assert q.numel() == 128 and absmax2.numel() == 2
    A = torch.randn(1, 128)

    def call(absmax=q, *nested):
        return ops.gemv_4bit(A, packed, [64, 128], absmax, code4, 64, *nested)

    good = (absmax2, code8, offset, 64)
    with pytest.raises(TypeError, match=r"absmax must be torch.uint8 \(one code per block\)"):
        call(decoded, *good)
    with pytest.raises(TypeError, match="absmax is torch.uint8, i.e. double quantized"):
        call(q)
    with pytest.raises(ValueError, match=r"absmax must hold ceil\(8192 / 64\) = 128 values"):
        call(q[:-1], absmax2[:1], code8, offset, 64)
    with pytest.raises(TypeError, match="nested_absmax must be torch.float32, got torch.float16"):
        call(q, absmax2.half(), code8, offset, 64)
    with pytest.raises(
        ValueError, match=r"nested_absmax must hold ceil\(128 / 64\) = 2 values .* got 3"
    ):
        call(q, torch.ones(3), code8, offset, 64)
    with pytest.raises(ValueError, match=r"nested_absmax must hold ceil\(128 / 256\) = 1"):
        call(q, absmax2, code8, offset, 256)
    with pytest.raises(TypeError, match="nested_code must be torch.float32"):
        call(q, absmax2, code8.double(), offset, 64)
    with pytest.raises(ValueError, match="nested_code must hold 256 values, got 16"):
        call(q, absmax2, code4, offset, 64)
    with pytest.raises(ValueError, match="nested_code .* is required with nested_absmax"):
        ops.gemv_4bit(A, packed, [64, 128], q, code4, 64, absmax2)
    for bad in (32, 100, 8192):
        with pytest.raises(ValueError, match=r"nested_blocksize must be a power of two in \[64, "):
            call(q, absmax2, code8, offset, bad)
    with pytest.raises(ValueError, match="only used with nested_absmax"):
        ops.gemv_4bit(A, packed, [64, 128], decoded, code4, 64, None, code8)
    with pytest.raises(ValueError, match="only used with nested_absmax"):
        ops.gemv_4bit(A, packed, [64, 128], decoded, code4, 64, nested_offset=0.5)
    with pytest.raises(ValueError, match="nested_absmax is on meta but A is on cpu"):
        call(q, absmax2.to("meta"), code8, offset, 64)
    with pytest.raises(ValueError, match="nested_code is on meta but A is on cpu"):
        call(q, absmax2, code8.to("meta"), offset, 64)
    assert torch.equal(call(q, *good), ops.gemv_4bit(A, packed, [64, 128], decoded, code4, 64))


def test_non_contiguous_input_gives_contiguous_answer(device, dtype):
    A = torch.randn(300, 70, device=device).to(dtype)
    for got, want in zip(
        ops.quantize_4bit(non_contiguous(A), 64, "nf4", torch.uint8),
        ops.quantize_4bit(A, 64, "nf4", torch.uint8),
    ):
        assert torch.equal(got, want)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    strided = non_contiguous(packed.view(-1, 1).expand(-1, 1))
    assert torch.equal(
        ops.dequantize_4bit(strided, absmax, 64, "nf4", [300, 70], torch.float32),
        ops.dequantize_4bit(packed, absmax, 64, "nf4", [300, 70], torch.float32),
    )


def test_empty(device):
    packed, absmax = ops.quantize_4bit(torch.empty(0, device=device), 64, "nf4", torch.uint8)
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    assert ops.dequantize_4bit(packed, absmax, 64, "nf4", [0, 8], torch.float16).shape == (0, 8)


def test_dequantize_out_variant(device):
    A = torch.randn(40, 30, device=device)
    packed, absmax = ops.quantize_4bit(A, 64, "fp4", torch.uint8)
    out = torch.empty(40, 30, dtype=torch.bfloat16, device=device)
    ops.dequantize_4bit.out(packed, absmax, 64, "fp4", [40, 30], torch.bfloat16, out=out)
    assert torch.equal(
        out, ops.dequantize_4bit(packed, absmax, 64, "fp4", [40, 30], torch.bfloat16)
    )


def test_quant_state_serialisation_round_trip():
    A = torch.randn(100, 64, dtype=torch.bfloat16)
    for nested in (False, True):
        packed, state = F.quantize_4bit(A, quant_type="nf4", compress_statistics=nested)
        d = state.as_dict(packed=True)
        assert "quant_state.bitsandbytes__nf4" in d
        back = F.QuantState.from_dict({"weight." + k: v for k, v in d.items()}, "cpu")
        assert back == state
        assert torch.equal(F.dequantize_4bit(packed, back), F.dequantize_4bit(packed, state))
