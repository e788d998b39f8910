"""The CUDA 4-bit kernels (csrc/kernels/cuda/fourbit*.cu*) run in cudasim, the CPU simulator of
tools/cudasim, against the CPU kernels (torch.ops.lowbit) and lowbit.reference.

quantize_4bit / dequantize_4bit: packed codes, absmax and dequantized values bit-identical to the
CPU kernels (the contract of tests/test_cuda.py), on both the vectorised and the scalar paths.
gemm_4bit: every tier that plan_gemm_4bit can choose (SIMT GEMV M = 1..8 with split-K, the mma
tensor-core kernel with cp.async and split-K over blocks, the generic kernel, and the dequantize
kernel of the dequantize + cuBLAS tier), within the tolerances of tests/test_cuda_4bit.py. Every
case runs under two schedules (threads and blocks forward, then reversed) whose outputs must be
bit-identical.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from lowbit import reference as R
from lowbit._codes import get_4bit_type

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "cudasim"))
import simlib  # noqa: E402

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    simlib.compiler() is None, reason="cudasim needs a C++ compiler (g++) to build the kernels"
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]
FT = simlib.FLOAT_TYPE
ptr = simlib.ptr
assert_bits_equal = simlib.assert_bits_equal
assert_matches = simlib.assert_matches
two_schedules = simlib.two_schedules


@pytest.fixture(scope="session")
def sim():
    return simlib.load()


def code16(quant_type: str) -> torch.Tensor:
    return get_4bit_type(quant_type).float().contiguous()


def special_values(n: int, dtype) -> torch.Tensor:
    A = torch.randn(n)
    if n >= 512:
        A[0:64] = 0.0
        A[64] = float("nan")
        A[200] = float("inf")
        A[320:384] = 1e-40  # subnormal block: 1 / absmax overflows
        A[400] = -0.0
    return A.to(dtype)


# ---- quantize / dequantize ------------------------------------------------------------------------


def sim_quantize(sim, a, bs, quant_type, packed=None):
    n = a.numel()
    if packed is None:
        packed = torch.full(((n + 1) // 2,), 0xAA, dtype=torch.uint8)
    absmax = torch.full((-(-n // bs),), 12345.0)
    code = code16(quant_type)  # kept alive across the call (ptr() holds no reference)
    rc = sim.lib.lb_quantize_4bit(FT[a.dtype], ptr(a), n, bs, ptr(code), ptr(packed), ptr(absmax))
    sim.check(rc, "quantize_4bit")
    return packed.clone(), absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 4096])
@pytest.mark.parametrize("n", [1, 31, 65, 4111])
def test_quantize_4bit(sim, quant_type, dtype, blocksize, n):
    """Blocks up to 512 take the vectorised kernel (aligned input), larger ones the scalar one."""
    torch.manual_seed(n * 7 + blocksize)
    A = special_values(n, dtype)
    packed, absmax = two_schedules(sim, lambda: sim_quantize(sim, A, blocksize, quant_type))
    p_cpu, a_cpu = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    p_ref, a_ref = R.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    assert_matches(packed, p_cpu.reshape(-1), p_ref.reshape(-1), "packed codes")
    assert_matches(absmax, a_cpu, a_ref, "absmax")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("where", ["input", "packed"])
def test_quantize_4bit_misaligned(sim, dtype, where):
    """A misaligned input (or packed output) takes the scalar kernel: same bits."""
    n, bs = 3001, 64
    A = special_values(n, dtype)
    a = simlib.misaligned_copy(A, A.element_size()) if where == "input" else A
    packed = simlib.misaligned_empty((n + 1) // 2, torch.uint8, 1) if where == "packed" else None
    p, am = two_schedules(sim, lambda: sim_quantize(sim, a, bs, "nf4", packed))
    p_cpu, a_cpu = ops.quantize_4bit(A, bs, "nf4", torch.uint8)
    assert_bits_equal(p, p_cpu.reshape(-1), "packed codes")
    assert_bits_equal(am, a_cpu, "absmax")


def sim_dequantize(sim, packed, absmax, n, bs, quant_type, dtype, out=None):
    if out is None:
        out = torch.empty(n, dtype=dtype)
    code = code16(quant_type)
    rc = sim.lib.lb_dequantize_4bit(ptr(packed), ptr(absmax), ptr(code), n, bs, FT[dtype], ptr(out))
    sim.check(rc, "dequantize_4bit")
    return (out.clone(),)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 33, 1000, 4113])
@pytest.mark.parametrize("aligned", [True, False], ids=["vec", "scalar"])
def test_dequantize_4bit(sim, quant_type, dtype, n, aligned):
    torch.manual_seed(n)
    bs = 64
    A = special_values(n, torch.float32)
    packed, absmax = ops.quantize_4bit(A, bs, quant_type, torch.uint8)
    packed = packed.reshape(-1)
    out = None if aligned else simlib.misaligned_empty(n, dtype, 2 if dtype != torch.float32 else 4)
    (got,) = two_schedules(
        sim, lambda: sim_dequantize(sim, packed, absmax, n, bs, quant_type, dtype, out)
    )
    cpu = ops.dequantize_4bit(packed, absmax, bs, quant_type, [n], dtype)
    ref = R.dequantize_4bit(packed, absmax, bs, quant_type, [n], dtype)
    assert_matches(got, cpu, ref, "dequantized values")


def nested_scales(absmax: torch.Tensor, nested_blocksize: int):
    """Double quantization of an fp32 absmax: (code indices, nested args, decoded fp32 absmax)."""
    v = torch.linspace(-1, 1, 255, dtype=torch.float64)
    code8 = torch.cat([(v.sign() * v.abs() ** 2.5).float(), torch.zeros(1)]).sort().values
    offset = float(absmax.mean())
    q, absmax2 = ops.quantize_blockwise(absmax - offset, code8, nested_blocksize)
    decoded = R.decode_nested_absmax(q, absmax2, code8, offset, nested_blocksize)
    return q.contiguous(), (absmax2, code8, offset, nested_blocksize), decoded


def scale_args(absmax, nested):
    """The flat scale arguments of the shim: plain (absmax) or nested (absmax = None)."""
    if nested is None:
        return [ptr(absmax), ptr(None), ptr(None), ptr(None), 0.0, 8]
    q, (absmax2, code8, offset, nbs) = absmax, nested
    return [ptr(None), ptr(q), ptr(absmax2), ptr(code8), offset, int(math.log2(nbs))]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("n", [64, 4111])
def test_dequantize_4bit_weight(sim, dtype, nested, n):
    """The dequantize kernel of the dequantize + cuBLAS tier: code from device memory, nested
    absmax decoded per block in the kernel."""
    torch.manual_seed(n)
    bs = 64
    A = torch.randn(n)
    packed, absmax = ops.quantize_4bit(A, bs, "nf4", torch.uint8)
    packed = packed.reshape(-1)
    code = code16("nf4")
    if nested:
        q, nargs, decoded = nested_scales(absmax, 256)
        args = scale_args(q, nargs)
    else:
        decoded, args = absmax, scale_args(absmax, None)

    def run():
        out = torch.empty(n, dtype=dtype)
        rc = sim.lib.lb_dequantize_4bit_weight(
            ptr(packed), *args, ptr(code), n, bs, FT[dtype], ptr(out)
        )
        sim.check(rc, "dequantize_4bit_weight")
        return (out,)

    (got,) = two_schedules(sim, run)
    cpu = ops.dequantize_4bit(packed, decoded, bs, "nf4", [n], dtype)
    assert_bits_equal(got, cpu, "dequantized weight")


def test_dequantize_4bit_weight_rejects_misaligned(sim):
    """The workspace must be 16-byte aligned: the wrapper returns cudaErrorMisalignedAddress."""
    n, bs = 256, 64
    packed, absmax = ops.quantize_4bit(torch.randn(n), bs, "nf4", torch.uint8)
    out = simlib.misaligned_empty(n, torch.float16, 2)
    code = code16("nf4")
    rc = sim.lib.lb_dequantize_4bit_weight(
        ptr(packed), *scale_args(absmax, None), ptr(code), n, bs, FT[torch.float16], ptr(out)
    )
    assert rc == 716  # cudaErrorMisalignedAddress
