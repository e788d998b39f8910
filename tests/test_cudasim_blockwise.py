"""The CUDA 8-bit blockwise kernels (csrc/kernels/cuda/blockwise.cu) run in cudasim, the CPU
simulator of tools/cudasim (every CUDA thread a fiber, shared memory per block, barriers and warp
shuffles with CUDA's semantics), against lowbit.reference.

Codes, absmax and dequantized values must be bit-identical to the CPU kernels (torch.ops.lowbit,
NaN bits included: the contract of tests/test_cuda.py, which runs the same kernels on a GPU) and
equal in value to lowbit.reference (whose NaN bits are torch's). Every case runs under two schedules
(fibers forward and reversed, blocks too) and the outputs must agree bit for bit: a kernel whose
result depends on the order its threads run in has a race.
"""

import sys
from pathlib import Path

import pytest
import torch

from lowbit import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "cudasim"))
import simlib  # noqa: E402

ops = torch.ops.lowbit

pytestmark = pytest.mark.skipif(
    simlib.compiler() is None, reason="cudasim needs a C++ compiler (g++) to build the kernels"
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


@pytest.fixture(scope="session")
def sim():
    return simlib.load()


assert_bits_equal = simlib.assert_bits_equal
assert_matches = simlib.assert_matches
two_schedules = simlib.two_schedules


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
        A[320:384] = 1e-40
        A[400] = -0.0
    return A.to(dtype)


def sim_quantize(sim, A, code, bs):
    a = A.contiguous().reshape(-1)
    n = a.numel()
    q = torch.full((n,), 0xAA, dtype=torch.uint8)
    absmax = torch.full((-(-n // bs),), 12345.0)
    rc = sim.lib.lb_quantize_blockwise(
        simlib.FLOAT_TYPE[A.dtype],
        simlib.ptr(a),
        n,
        bs,
        simlib.ptr(code),
        simlib.ptr(q),
        simlib.ptr(absmax),
    )
    sim.check(rc, "quantize_blockwise")
    return q, absmax


def sim_dequantize(sim, q, absmax, code, bs, dtype):
    n = q.numel()
    out = torch.empty(n, dtype=dtype)
    rc = sim.lib.lb_dequantize_blockwise(
        simlib.ptr(q),
        simlib.ptr(absmax),
        simlib.ptr(code),
        n,
        bs,
        simlib.FLOAT_TYPE[dtype],
        simlib.ptr(out),
    )
    sim.check(rc, "dequantize_blockwise")
    return (out,)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("n", [1, 63, 4097, 9000])
def test_quantize_blockwise(sim, dtype, blocksize, n):
    torch.manual_seed(n + blocksize)
    A = special_values(n, dtype)
    code = signed_code()
    q, absmax = two_schedules(sim, lambda: sim_quantize(sim, A, code, blocksize))
    q_cpu, absmax_cpu = ops.quantize_blockwise(A, code, blocksize)
    q_ref, absmax_ref = R.quantize_blockwise(A, code, blocksize)
    assert_matches(q, q_cpu.reshape(-1), q_ref.reshape(-1), "codes")
    assert_matches(absmax, absmax_cpu, absmax_ref, "absmax")


def test_quantize_blockwise_unsorted_code(sim):
    """An unsorted code makes every block non-finite: absmax NaN, every code the zero code."""
    A = torch.randn(1000)
    code = signed_code()
    code[10], code[11] = code[11].item(), code[10].item()
    q, absmax = two_schedules(sim, lambda: sim_quantize(sim, A, code, 256))
    assert absmax.isnan().all()
    assert (q == int(code.abs().argmin())).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("n", [1, 1000, 5003])
def test_dequantize_blockwise(sim, dtype, blocksize, n):
    torch.manual_seed(n)
    code = signed_code()
    A = special_values(n, torch.float32)
    q, absmax = R.quantize_blockwise(A, code, blocksize)
    (out,) = two_schedules(
        sim, lambda: sim_dequantize(sim, q.reshape(-1), absmax, code, blocksize, dtype)
    )
    cpu = ops.dequantize_blockwise(q, absmax, code, blocksize, dtype).reshape(-1)
    ref = R.dequantize_blockwise(q, absmax, code, blocksize, dtype).reshape(-1)
    assert_matches(out, cpu, ref, "dequantized values")


def test_shuffle_schedule(sim):
    """The seeded shuffle schedule (every barrier releases its threads in a random order) gives
    the same bits as forward."""
    A = special_values(3000, torch.bfloat16)
    code = signed_code()
    two_schedules(sim, lambda: sim_quantize(sim, A, code, 64), ("forward", "shuffle"))
