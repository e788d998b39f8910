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

import ctypes
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


# ---- gemm_4bit: every tier --------------------------------------------------------------------
# Tolerances of tests/test_cuda_4bit.py (relative Frobenius error, and a loose per-element bound).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ELEM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
TIER_NAMES = {0: "gemv", 1: "mma", 2: "dequant_gemm", 3: "generic"}
CC, SMS = 90, 132  # H200


def weight(N, K, blocksize=64, quant_type="nf4", nested_blocksize=None):
    """(packed [N*K/2], scales (fp32 absmax, or code indices), nested args or None, exact fp32 W)."""
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), blocksize, quant_type, torch.uint8)
    packed = packed.reshape(-1)
    if nested_blocksize is None:
        W = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, [N, K], torch.float32)
        return packed, absmax, None, W
    q, nargs, decoded = nested_scales(absmax, nested_blocksize)
    W = ops.dequantize_4bit(packed, decoded, blocksize, quant_type, [N, K], torch.float32)
    return packed, q, nargs, W


def plan(sim, dtype, M, N, K, a_aligned=True, packed_aligned=True, force=""):
    out = (ctypes.c_int * 3)()
    ws = ctypes.c_int64()
    sim.lib.lb_plan_gemm_4bit(
        FT[dtype],
        M,
        N,
        K,
        int(a_aligned),
        int(packed_aligned),
        CC,
        SMS,
        force.encode(),
        out,
        ctypes.byref(ws),
    )
    return (out[0], out[1], out[2], ws.value)


def sim_gemm(sim, p, A, packed, scales, nested, N, K, bs, quant_type="nf4"):
    """out [M, N] = A @ W^T through gemm_4bit with plan p; the dequant tier runs the simulated
    dequantize kernel into a workspace and stands in for cuBLAS with an fp32 CPU matmul."""
    tier, config, split, ws_floats = p
    M, dtype = A.shape[0], A.dtype
    code = code16(quant_type)
    args = scale_args(scales, nested)
    if tier == 2:
        Wd = torch.empty(N * K, dtype=dtype)
        rc = sim.lib.lb_dequantize_4bit_weight(
            ptr(packed), *args, ptr(code), N * K, bs, FT[dtype], ptr(Wd)
        )
        sim.check(rc, "dequantize_4bit_weight (dequant tier)")
        return ((A.float() @ Wd.view(N, K).float().T).to(dtype),)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    ws = torch.full((max(ws_floats, 1),), float("nan"))
    rc = sim.lib.lb_gemm_4bit(
        tier,
        config,
        split,
        ws_floats,
        FT[dtype],
        ptr(A),
        M,
        K,
        ptr(packed),
        *args,
        ptr(code),
        bs,
        ptr(out),
        N,
        ptr(ws) if ws_floats else ptr(None),
    )
    sim.check(rc, f"gemm_4bit ({TIER_NAMES[tier]}, config {config}, split {split})")
    return (out,)


def check(out, A, W, what=""):
    ref = A.double() @ W.double().T
    assert out.dtype == A.dtype and out.shape == ref.shape
    got = out.double()
    assert not got.isnan().any(), f"{what}: NaN in the output"
    if ref.numel() == 0:
        return
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL[A.dtype], f"{what}: relative error {rel:.3g} >= {REL_TOL[A.dtype]}"
    bound = ELEM_TOL[A.dtype] * (ref.abs() + A.shape[-1] ** 0.5)
    bad = (got - ref).abs() > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} off, first at {bad.nonzero()[:4].tolist()}"


def run_tiers(sim, forces, A, packed, scales, nested, W, N, K, bs, quant_type="nf4", **pk):
    """Each forced tier (deduplicated by the plan it gives) under two schedules, checked; returns
    {plan: output}."""
    M = A.shape[0]
    done = {}
    for f in forces:
        p = plan(sim, A.dtype, M, N, K, force=f, **pk)
        if p in done:
            continue
        (out,) = two_schedules(
            sim, lambda p=p: sim_gemm(sim, p, A, packed, scales, nested, N, K, bs, quant_type)
        )
        check(out, A, W, f"force={f!r} plan={TIER_NAMES[p[0]]}{p[1:]}")
        done[p] = out
    return done


# "gemv:W:C": W warps per column group (split-K in the block), C columns (M = 1); "mma:C:S": tile
# configuration C (BM 16 / 32 / 64), S blocks along K.
TIERS = ["", "gemv", "gemv:1:1", "gemv:8:4", "gemv:2:2", "mma", "mma:0", "mma:1", "mma:2"]
TIERS += ["mma:0:4", "mma:2:3", "dequant", "generic"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "M,N,K,blocksize",
    [
        (1, 201, 512, 64),  # N not a multiple of any tile (8, 128) nor of the gemv's columns
        (3, 130, 96, 64),  # K = 96: blocks of 64 straddle rows; one partial k-tile
        (8, 64, 2048, 32),  # small N: the gemv splits K inside the block
        (16, 257, 1024, 128),
        (37, 136, 320, 256),  # M over 3 tiles of 16 / 2 of 32; K % 64 == 32 (tail chunk)
        (130, 72, 256, 64),  # M over 3 tiles of 64 (2048 on the GPU)
        (5, 1, 32, 32),  # one column, one 16-byte vector per row: every lane but one idle
    ],
)
def test_tier(sim, dtype, M, N, K, blocksize):
    """Every tier on shapes that hit its tails; a tier that cannot run a shape (gemv past M = 8,
    the tensor cores on fp32) falls back to the table's choice, checked the same way."""
    torch.manual_seed(M * N + K)
    packed, absmax, nested, W = weight(N, K, blocksize)
    A = torch.randn(M, K).to(dtype)
    run_tiers(sim, TIERS, A, packed, absmax, nested, W, N, K, blocksize)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 5, 16, 40])
def test_tier_nested(sim, dtype, M):
    """A double quantized absmax decoded inside each tier's kernel: the same bits as the product
    on the decoded fp32 absmax (same plan, same arithmetic), and right against the reference."""
    torch.manual_seed(M)
    N, K, bs = 150, 1024, 64
    packed, q, nargs, W = weight(N, K, bs, nested_blocksize=256)
    decoded = R.decode_nested_absmax(q, *nargs)
    A = torch.randn(M, K).to(dtype)
    forces = ["", "gemv", "gemv:8:1", "mma", "mma:2:4", "dequant", "generic"]
    nested_out = run_tiers(sim, forces, A, packed, q, nargs, W, N, K, bs)
    for p, out in nested_out.items():
        (plain,) = sim_gemm(sim, p, A, packed, decoded, None, N, K, bs)
        assert_bits_equal(out, plain, f"nested vs decoded absmax, plan {p}")


GEMV_MAX_M, MMA_BM16_MAX_M, MMA_BM32_MAX_M, MMA_MAX_M = 8, 16, 48, 512  # kGemm4Table


# Both sides of each M threshold in every dtype; the two largest (M = 512, 513) in bf16 only, which
# keeps the simulated suite short (the tier choice there does not depend on the 16-bit dtype).
THRESHOLD_CASES = [
    (dtype, M)
    for dtype in FLOAT_DTYPES
    for M in [1, GEMV_MAX_M, GEMV_MAX_M + 1, MMA_BM16_MAX_M + 1, MMA_BM32_MAX_M]
    + [MMA_BM32_MAX_M + 1]
] + [(torch.bfloat16, MMA_MAX_M), (torch.bfloat16, MMA_MAX_M + 1)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(
    "dtype,M", THRESHOLD_CASES, ids=[f"{str(d)[6:]}-{m}" for d, m in THRESHOLD_CASES]
)
def test_table_thresholds(sim, quant_type, dtype, M):
    """The default table on both sides of each of its M thresholds, NF4 and FP4."""
    torch.manual_seed(M)
    N, K = 264, 512
    packed, absmax, nested, W = weight(N, K, 64, quant_type)
    A = torch.randn(M, K).to(dtype)
    p = plan(sim, dtype, M, N, K)
    expect = (
        "gemv" if M <= GEMV_MAX_M else "mma" if dtype != torch.float32 and M <= MMA_MAX_M else None
    )
    assert TIER_NAMES[p[0]] == (expect or "dequant_gemm"), p
    run_tiers(sim, [""], A, packed, absmax, nested, W, N, K, 64, quant_type)


@pytest.mark.parametrize("N", [64, 1000])
@pytest.mark.parametrize("K", [256, 4096])
def test_gemv_split_k(sim, N, K):
    """The table's split-K choices (GEMV: warps per column at small N; tensor cores: blocks along
    K at small N) give the right sums."""
    torch.manual_seed(N + K)
    packed, absmax, nested, W = weight(N, K)
    for M in (1, 4, 16):
        A = torch.randn(M, K).to(torch.bfloat16)
        run_tiers(sim, [""], A, packed, absmax, nested, W, N, K, 64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", range(1, GEMV_MAX_M + 1))
def test_gemv_every_instantiation(sim, dtype, M):
    """Every SIMT GEMV kernel the launcher can pick at this M: rows MT = 1/2/4/8 with M - MT idle
    rows, warps per column group 1/2/4/8 and (M = 1) columns 1/2/4. K = 4160 is 130 16-byte
    vectors per row (idle lanes and idle split-K warps in the last step); N = 33 leaves a partial
    column group."""
    torch.manual_seed(M)
    N, K = 33, 4160
    packed, absmax, nested, W = weight(N, K, 64, "fp4")
    A = torch.randn(M, K).to(dtype)
    forces = [f"gemv:{w}:{c}" for w in (1, 2, 4, 8) for c in ((1, 2, 4) if M == 1 else (2,))]
    plans = run_tiers(sim, forces, A, packed, absmax, nested, W, N, K, 64, "fp4")
    assert len(plans) == len(forces) and all(p[0] == 0 for p in plans)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 16, 40])
def test_generic_k(sim, dtype, M):
    """K not a multiple of 32 (rows start mid-vector, or mid-byte for odd K): the generic kernel
    up to generic_max_m = 32, dequantize + cuBLAS above."""
    for K in (100, 37):
        N = 19
        packed, absmax, nested, W = weight(N, K, 32)
        A = torch.randn(M, K).to(dtype)
        p = plan(sim, dtype, M, N, K)
        assert TIER_NAMES[p[0]] == ("generic" if M <= 32 else "dequant_gemm")
        run_tiers(sim, ["", "gemv", "mma"], A, packed, absmax, nested, W, N, K, 32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 16, 40])
@pytest.mark.parametrize("which", ["A", "packed"])
def test_misaligned(sim, dtype, M, which):
    """A (or the packed weight) one element past a 16-byte boundary: the plan sees
    a_aligned16 / packed_aligned16 false and picks the generic kernel (or dequantize + cuBLAS
    above generic_max_m for a misaligned A), which runs on the misaligned pointer."""
    torch.manual_seed(M)
    N, K = 96, 256
    packed, absmax, nested, W = weight(N, K)
    A = torch.randn(M, K).to(dtype)
    if which == "A":
        A = simlib.misaligned_copy(A, A.element_size())
    else:
        packed = simlib.misaligned_copy(packed, 1)
    pk = {"a_aligned": which != "A", "packed_aligned": which != "packed"}
    p = plan(sim, dtype, M, N, K, **pk)
    assert TIER_NAMES[p[0]] == ("dequant_gemm" if which == "A" and M > 32 else "generic"), p
    run_tiers(sim, ["", "gemv", "mma"], A, packed, absmax, nested, W, N, K, 64, **pk)


@pytest.mark.parametrize("tier", ["gemv", "mma"])
def test_misaligned_pointer_faults(sim, tier):
    """A fast tier given a misaligned A (a planning bug) faults in the simulator, as the 16-byte
    loads fault on a GPU: cudaErrorMisalignedAddress, not a silently wrong product."""
    N, K, M = 64, 256, 4
    packed, absmax, nested, W = weight(N, K)
    A = simlib.misaligned_copy(torch.randn(M, K).to(torch.bfloat16), 2)
    p = plan(sim, torch.bfloat16, M, N, K, force=tier)
    assert TIER_NAMES[p[0]] == tier
    with pytest.raises(simlib.SimError, match="error 716"):
        sim_gemm(sim, p, A, packed, absmax, nested, N, K, 64)


def test_special_blocks(sim):
    """A weight row of zeros and a NaN block: exact zeros in the zero row's column, NaN in the
    NaN block's, in every tier (as the CPU product does)."""
    N, K = 16, 128
    Wf = torch.randn(N, K)
    Wf[3] = 0.0
    Wf[5, 7] = float("nan")
    packed, absmax = ops.quantize_4bit(Wf, 64, "nf4", torch.uint8)
    packed = packed.reshape(-1)
    for force in ("gemv", "mma", "dequant", "generic"):
        for M in (1, 16):
            A = torch.randn(M, K, dtype=torch.bfloat16)
            p = plan(sim, A.dtype, M, N, K, force=force)
            (out,) = two_schedules(
                sim, lambda p=p, A=A: sim_gemm(sim, p, A, packed, absmax, None, N, K, 64)
            )
            out = out.float()
            assert (out[:, 3] == 0).all(), force
            assert out[:, 5].isnan().all(), force
            assert not torch.cat([out[:, :5], out[:, 6:]], 1).isnan().any(), force
