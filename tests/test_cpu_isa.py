"""Every CPU ISA path (generic, avx2, avx512) this machine supports gives the generic kernels'
answers: codes, absmax, int32 products and dequantized values bit for bit; fused 4-bit products to
fp32 reassociation tolerance. Each ISA runs in a subprocess with LOWBIT_CPU_ISA set (the ISA is
fixed per process); the same seeded inputs are built in every process."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit
from lowbit import functional, reference

ISA_ORDER = ["generic", "avx2", "avx512"]


def _lib():
    return ctypes.CDLL(lowbit._C.__file__)


def _best_isa() -> str:
    fn = _lib().lowbit_cpu_best_isa_name
    fn.restype = ctypes.c_char_p
    return fn().decode()


SUPPORTED = ISA_ORDER[: ISA_ORDER.index(_best_isa()) + 1]
FAST = [isa for isa in SUPPORTED if isa != "generic"]

# Builds every case from a fixed seed and saves {name: outputs}; run once per ISA.
CASES_SCRIPT = textwrap.dedent(
    r"""
    import ctypes, sys, torch, lowbit
    from lowbit import functional as F
    ops = torch.ops.lowbit
    torch.manual_seed(0)
    lib = ctypes.CDLL(lowbit._C.__file__)
    lib.lowbit_cpu_isa_name.restype = ctypes.c_char_p
    out = {"isa": lib.lowbit_cpu_isa_name().decode()}
    DT = [torch.float32, torch.float16, torch.bfloat16]

    def special(a):
        # zero block, NaN, Inf and a tiny subnormal block at the start (blocks >= 64 elements)
        f = a.reshape(-1)
        if f.numel() >= 512:
            f[:64] = 0
            f[64] = float("nan")
            f[200] = float("inf")
            f[256:320] = 1e-40
        return a

    code8 = F.create_dynamic_map(signed=True)
    ALL = sys.argv[2] == "all"  # "gemv": only the 4-bit products, with their inputs
    for shape in ([(1,), (63,), (4097,), (1000, 37), (512, 4096)] if ALL else []):
        for dt in DT:
            a = special(torch.randn(shape) * 3).to(dt)
            for bs in [64, 256, 4096]:
                q, m = ops.quantize_blockwise(a, code8, bs)
                out[f"qb/{shape}/{dt}/{bs}"] = (q, m)
                for odt in DT:
                    out[f"dqb/{shape}/{dt}/{bs}/{odt}"] = ops.dequantize_blockwise(q, m, code8, bs, odt)
            for qt in ["nf4", "fp4"]:
                for bs in [32, 64, 128, 4096]:
                    p, m = ops.quantize_4bit(a, bs, qt, torch.uint8)
                    out[f"q4/{shape}/{dt}/{qt}/{bs}"] = (p, m)
                    for odt in DT:
                        out[f"dq4/{shape}/{dt}/{qt}/{bs}/{odt}"] = ops.dequantize_4bit(p, m, bs, qt, a.shape, odt)

    # Fused 4-bit products: LLM shapes and odd ones (K not a multiple of 64 / 128, odd N, M > 1;
    # K = 192, 448: rows that start inside a block of 128 or 256).
    for (N, K) in [(33, 64), (17, 128), (64, 4096), (40, 11008), (11, 100), (300, 4096),
                   (5, 192), (9, 448)]:
        w = torch.randn(N, K)
        for qt in ["nf4", "fp4"]:
            cb = F.get_4bit_type(qt)
            for bs in [32, 64, 128, 256]:
                p, m = ops.quantize_4bit(w, bs, qt, torch.uint8)
                for M in [1, 3]:
                    for dt in [torch.float32, torch.bfloat16]:
                        x = torch.randn(M, K).to(dt)
                        key = f"gemv4/{N}/{K}/{qt}/{bs}/{M}/{dt}"
                        out[key] = ops.gemv_4bit(x, p, [N, K], m, cb, bs)
                        if not ALL:
                            out[key + "/in"] = (x, p, m)

    # Double quantization decoded inside the kernel (nested blocks of 64 and 256), next to the
    # same product on the absmax decoded beforehand (dequantize_blockwise + offset).
    for (N, K) in [(33, 64), (17, 128), (64, 4096), (40, 11008), (11, 100)]:
        w = torch.randn(N, K)
        cb = F.get_4bit_type("nf4")
        for bs in [32, 64, 128, 256]:
            p, m = ops.quantize_4bit(w, bs, "nf4", torch.uint8)
            off = m.mean()
            for nbs in [64, 256]:
                q, m2 = ops.quantize_blockwise(m - off, code8, nbs)
                dec = ops.dequantize_blockwise(q, m2, code8, nbs, torch.float32) + off
                for M in [1, 3]:
                    for dt in [torch.float32, torch.bfloat16]:
                        x = torch.randn(M, K).to(dt)
                        key = f"gemv4/{N}/{K}/nf4/{bs}/{M}/{dt}"
                        out[f"{key}/nested{nbs}"] = ops.gemv_4bit(
                            x, p, [N, K], q, cb, bs, m2, code8, float(off), nbs)
                        out[f"{key}/unfused{nbs}"] = ops.gemv_4bit(x, p, [N, K], dec, cb, bs)
                        if not ALL:
                            out[f"{key}/unfused{nbs}/in"] = (x, p, dec)

    # LLM.int8(): row quantization (with and without outliers), the int8 GEMM with -128 present,
    # its dequantization, and the fused layer.
    if not ALL:
        torch.save(out, sys.argv[1])
        sys.exit(0)
    for (M, K) in [(1, 7), (1, 4096), (5, 333), (67, 4096), (130, 1024)]:
        for dt in DT:
            a = torch.randn(M, K)
            if K > 10:
                a[0, 3] = 9.0
                a[-1, 5] = -7.5
            a = a.to(dt)
            for th in [0.0, 6.0]:
                out[f"vq/{M}/{K}/{dt}/{th}"] = ops.int8_vectorwise_quant(a, th)
    for (M, N, K) in [(1, 1, 1), (1, 37, 4096), (1, 4096, 4096), (3, 5, 17), (7, 33, 300), (130, 67, 1024), (48, 50, 64)]:
        A = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        A.view(-1)[0] = -128
        B.view(-1)[0] = -128
        C = ops.int8_linear_matmul(A, B)
        out[f"mm8/{M}/{N}/{K}"] = C
        rs, cs = torch.rand(M) * 5, torch.rand(N) * 5
        for dt in DT:
            out[f"mmdq/{M}/{N}/{K}/{dt}"] = ops.int8_mm_dequant(C, rs, cs, dt, torch.randn(N).to(dt))
    # Every tile edge of the SIMD GEMMs (M = 1..9 against 6-row / 8-row tiles, odd N, K = 1, K not
    # a multiple of 16 or 32, large K), weights full of -128 (the sign trick's hazard operand) and
    # activations with and without -128 (with it, the AVX2 kernel takes its widening fallback).
    for M in range(1, 10):
        for (N, K) in [(1, 1), (7, 31), (9, 33), (17, 64), (5, 1000), (3, 4099)]:
            A = torch.randint(-127, 128, (M, K), dtype=torch.int8)
            B = torch.randint(-128, 128, (N, K), dtype=torch.int8)
            B[torch.rand(N, K) < 0.2] = -128
            B.view(-1)[-1] = -128
            out[f"mm8e/{M}/{N}/{K}"] = ops.int8_linear_matmul(A, B)
            out[f"mm8e_in/{M}/{N}/{K}"] = (A.clone(), B)
            A.view(-1)[-1] = -128
            out[f"mm8e128/{M}/{N}/{K}"] = ops.int8_linear_matmul(A, B)
            out[f"mm8e128_in/{M}/{N}/{K}"] = (A, B)
    for (M, N, K) in [(1, 3, 100000), (7, 2, 100000)]:
        A = torch.randint(-127, 128, (M, K), dtype=torch.int8)
        B = torch.full((N, K), -128, dtype=torch.int8)
        B[:, ::3] = torch.randint(-128, 128, (N, (K + 2) // 3), dtype=torch.int8)
        out[f"mm8big/{M}/{N}/{K}"] = ops.int8_linear_matmul(A, B)
        out[f"mm8big_in/{M}/{N}/{K}"] = (A, B)
    for (M, N, K) in [(1, 4096, 4096), (1, 33, 100), (9, 65, 256), (130, 96, 1024)]:
        W = torch.randn(N, K)
        Wq, Ws, _ = ops.int8_vectorwise_quant(W, 0.0)
        for dt in DT:
            x = torch.randn(M, K)
            x[0, 1] = 8.0
            x = x.to(dt)
            out[f"lin8/{M}/{N}/{K}/{dt}"] = ops.int8_linear(x, Wq, Ws, torch.randn(N).to(dt), 6.0)
    torch.save(out, sys.argv[1])
    """
)


def _run_cases(isa: str, path: str, gemv: str = "fp32", cases: str = "all") -> dict:
    env = dict(os.environ, LOWBIT_CPU_ISA=isa, LOWBIT_CPU_GEMV=gemv)
    subprocess.run([sys.executable, "-c", CASES_SCRIPT, path, cases], env=env, check=True)
    return torch.load(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every ISA with fp32 activations in the 4-bit products (the exact kernels)."""
    d = tmp_path_factory.mktemp("isa")
    return {isa: _run_cases(isa, str(d / f"{isa}.pt")) for isa in SUPPORTED}


@pytest.fixture(scope="module")
def q8_results(tmp_path_factory):
    """The 4-bit products of every SIMD ISA with int8 activations (the default there)."""
    d = tmp_path_factory.mktemp("isa_q8")
    return {isa: _run_cases(isa, str(d / f"{isa}.pt"), "int8", "gemv") for isa in FAST}


def _flat(v):
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _flat(x)]
    return [v] if isinstance(v, torch.Tensor) else []


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Float tensors as their bit patterns, so NaNs compare equal (payload and sign included)."""
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("isa", SUPPORTED)
def test_forced_isa_is_active(results, isa):
    assert results[isa]["isa"] == isa


@pytest.mark.skipif(not FAST, reason="this machine has no SIMD path")
@pytest.mark.parametrize("isa", FAST)
def test_exact_ops_match_generic(results, isa):
    gen, got = results["generic"], results[isa]
    checked = 0
    for key, ref in gen.items():
        if key == "isa" or key.startswith("gemv4/"):
            continue
        for r, g in zip(_flat(ref), _flat(got[key]), strict=True):
            assert r.dtype == g.dtype and r.shape == g.shape, key
            assert torch.equal(_bits(r), _bits(g)), f"{isa} differs from generic on {key}"
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("isa", SUPPORTED)
def test_int8_gemm_edges_match_int64_matmul(results, isa):
    # Independent of the generic kernel: the int32 products equal an int64 matmul, -128 included.
    got = results[isa]
    keys = [k for k in got if k.startswith(("mm8e/", "mm8e128/", "mm8big/"))]
    assert len(keys) == 2 * 9 * 6 + 2
    for key in keys:
        name, dims = key.split("/", 1)
        A, B = got[f"{name}_in/{dims}"]
        C = got[key]
        assert C.dtype == torch.int32, key
        assert torch.equal(C.long(), A.long() @ B.long().t()), f"{isa}: {key}"


@pytest.mark.skipif(not FAST, reason="this machine has no SIMD path")
@pytest.mark.parametrize("isa", FAST)
def test_4bit_products_match_generic(results, isa):
    gen, got = results["generic"], results[isa]
    keys = [k for k in gen if k.startswith("gemv4/")]
    assert len(keys) > 100
    for key in keys:
        r, g = gen[key].float(), got[key].float()
        K = int(key.split("/")[2])
        # fp32 sums in another order: error ~ sqrt(K) ulps of the partial sums; bf16 outputs may
        # then round to a neighbouring value.
        bf16 = "bfloat16" in key
        tol = (8e-3 if bf16 else 2e-5 * K**0.5) * r.abs().max().clamp_min(1.0)
        assert (r - g).abs().max() <= tol, f"{isa} differs from generic on {key}"


@pytest.mark.parametrize("isa", SUPPORTED)
def test_nested_4bit_products_equal_unfused(results, isa):
    # On every ISA the per-block decode of a double-quantized absmax inside the kernel gives the
    # scale dequantize_blockwise + offset gives, so the products are equal bit for bit.
    got = results[isa]
    keys = [k for k in got if "/nested" in k]
    assert len(keys) == 5 * 4 * 2 * 2 * 2
    for key in keys:
        other = key.replace("/nested", "/unfused")
        assert torch.equal(_bits(got[key]), _bits(got[other])), f"{isa}: {key}"


@pytest.mark.skipif(not FAST, reason="this machine has no SIMD path")
@pytest.mark.parametrize("isa", FAST)
def test_int8_activation_products_match_their_model(q8_results, isa):
    # Where the int8-activation kernel applies (K % 64 == 0, power-of-two blocks, M <= 32) its
    # integer sums are exact, so it equals reference.gemv_4bit_q8 up to fp32 rounding of the scales
    # and partial sums; elsewhere (K = 100) the fp32 kernel runs and matches the exact reference.
    got = q8_results[isa]
    keys = [k for k in got if k.startswith("gemv4/") and not k.endswith("/in")]
    assert len(keys) > 200
    applied = 0
    for key in keys:
        N, K, qt, bs, M = key.split("/")[1:6]
        N, K, bs, M = int(N), int(K), int(bs), int(M)
        g = got[key].float()
        x, p, m = got[key.replace("/nested", "/unfused") + "/in"]
        cb = functional.get_4bit_type(qt)
        if K % 64 or M > 32:
            r = reference.gemv_4bit(x.float(), p, [N, K], m, cb, bs)
            tol = (8e-3 if "bfloat16" in key else 2e-5 * K**0.5) * r.abs().max().clamp_min(1.0)
        else:
            r = reference.gemv_4bit_q8(x.float(), p, [N, K], m, cb, bs)
            tol = (8e-3 if "bfloat16" in key else 1e-6 * K**0.5) * r.abs().max().clamp_min(1.0)
            applied += 1
        assert (r - g).abs().max() <= tol, f"{isa} int8-activation product differs on {key}"
    assert applied > 150
    nested = [k for k in keys if "/nested" in k]
    assert len(nested) == 5 * 4 * 2 * 2 * 2
    for key in nested:  # the in-kernel decode of a double-quantized absmax changes no bit
        other = key.replace("/nested", "/unfused")
        assert torch.equal(_bits(got[key]), _bits(got[other])), f"{isa}: {key}"


@pytest.mark.parametrize("acts", ["randn", "relu", "randn+1"])
def test_int8_activations_stay_close_to_the_exact_product(acts):
    # The accuracy the int8-activation path trades for speed: its distance to the exact fp32
    # product is a small fraction of NF4's own error, also for activations with a nonzero mean
    # (ReLU/GELU outputs), where a biased code grid would add up coherently over K.
    torch.manual_seed(1)
    N, K = 512, 4096
    w, x = torch.randn(N, K), torch.randn(4, K)
    x = {"randn": x, "relu": torch.relu(x), "randn+1": x + 1}[acts]
    p, m = torch.ops.lowbit.quantize_4bit(w, 64, "nf4", torch.uint8)
    cb = functional.get_4bit_type("nf4")
    exact = reference.gemv_4bit(x, p, [N, K], m, cb, 64)
    q8 = reference.gemv_4bit_q8(x, p, [N, K], m, cb, 64)
    nf4_err = (exact - x @ w.t()).pow(2).mean().sqrt()
    assert (q8 - exact).pow(2).mean().sqrt() < 0.2 * nf4_err


def test_q8_code_grid_is_unbiased():
    # Rounded to nearest, NF4 on the 1/64 grid errs by -0.96 steps in sum; one code is rounded the
    # other way so that the 16 equally likely codes err by less than half a step in sum.
    q, scale = reference.q8_weight_codes(functional.get_4bit_type("nf4"))
    assert q.tolist() == [-64, -44, -34, -25, -18, -12, -6, 0, 5, 10, 16, 22, 28, 36, 46, 64]
    assert abs(float((q - functional.get_4bit_type("nf4") * 64).sum())) < 0.5 and scale == 1 / 64
    q, _ = reference.q8_weight_codes(functional.get_4bit_type("fp4"))
    assert q.abs().max() == 64 and q[3] == 64 and q[11] == -64
    for bad in (float("nan"), float("inf")):
        code = functional.get_4bit_type("nf4").clone()
        code[5] = bad
        assert reference.q8_weight_codes(code) is None
    assert reference.q8_weight_codes(torch.zeros(16)) is None
    assert reference.q8_weight_codes(functional.get_4bit_type("nf4") * 1e-38) is None


def test_gemv_mode_env():
    code = "import lowbit._native as n; print(n.cpu_gemv_mode())"
    for value, want in [("fp32", "fp32"), ("int8", "int8" if FAST else "fp32")]:
        env = dict(os.environ, LOWBIT_CPU_GEMV=value)
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert r.stdout.strip() == want
    env = dict(os.environ, LOWBIT_CPU_GEMV="int4")
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "LOWBIT_CPU_GEMV=int4 is not one of int8, fp32" in r.stderr


def test_generic_path_matches_reference(results):
    # The generic kernels stay the spec's twin: spot-check codes and absmax against reference.py.
    # The inputs are rebuilt here exactly as the subprocess built them (seed 0, same order).
    gen = results["generic"]
    torch.manual_seed(0)
    code8 = functional.create_dynamic_map(signed=True)
    for shape in [(1,), (63,), (4097,), (1000, 37)]:
        for dt in [torch.float32, torch.float16, torch.bfloat16]:
            a = torch.randn(shape) * 3
            f = a.reshape(-1)
            if f.numel() >= 512:
                f[:64] = 0
                f[64] = float("nan")
                f[200] = float("inf")
                f[256:320] = 1e-40
            a = a.to(dt)
            for bs in [64, 256, 4096]:
                q, m = gen[f"qb/{shape}/{dt}/{bs}"]
                rq, rm = reference.quantize_blockwise(a, code8, bs)
                assert torch.equal(q, rq) and torch.equal(m.nan_to_num(-1), rm.nan_to_num(-1))
            for qt in ["nf4", "fp4"]:
                for bs in [32, 64, 128, 4096]:
                    p, m = gen[f"q4/{shape}/{dt}/{qt}/{bs}"]
                    rp, rm = reference.quantize_4bit(a, bs, qt, torch.uint8)
                    assert torch.equal(p, rp) and torch.equal(m.nan_to_num(-1), rm.nan_to_num(-1))
        if shape == (1000, 37):
            break


def _active_isa_with(value: str) -> subprocess.CompletedProcess:
    code = (
        "import ctypes, torch, lowbit; lib = ctypes.CDLL(lowbit._C.__file__); "
        "lib.lowbit_cpu_isa_name.restype = ctypes.c_char_p; "
        "torch.ops.lowbit.quantize_4bit(torch.ones(64), 64, 'nf4', torch.uint8); "
        "print(lib.lowbit_cpu_isa_name().decode())"
    )
    env = dict(os.environ, LOWBIT_CPU_ISA=value)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )


def test_unsupported_isa_falls_back_with_a_warning():
    if "avx512" in SUPPORTED:
        pytest.skip("this machine supports every ISA")
    r = _active_isa_with("avx512")
    assert r.stdout.strip() == SUPPORTED[-1]
    assert "LOWBIT_CPU_ISA=avx512" in r.stderr and "using " + SUPPORTED[-1] in r.stderr


def test_unknown_isa_value_warns_and_autodetects():
    r = _active_isa_with("sse9")
    assert r.stdout.strip() == SUPPORTED[-1]
    assert "not one of" in r.stderr
