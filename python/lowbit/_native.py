"""Facts about the compiled extension lowbit._C that live outside torch's op registry."""

from __future__ import annotations

import ctypes
import functools

from lowbit import _C


@functools.cache
def _lib() -> ctypes.CDLL:
    return ctypes.CDLL(_C.__file__)


def _name(symbol: str) -> str:
    fn = getattr(_lib(), symbol)
    fn.restype = ctypes.c_char_p
    return fn().decode()


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with: 'generic', 'avx2' or 'avx512' (chosen from
    CPUID once per process; LOWBIT_CPU_ISA forces one)."""
    return _name("lowbit_cpu_isa_name")


def best_cpu_isa() -> str:
    """The widest instruction set this CPU supports, whatever LOWBIT_CPU_ISA says."""
    return _name("lowbit_cpu_best_isa_name")


def cpu_gemv_mode() -> str:
    """'int8' when small-M 4-bit products on the CPU quantize their activations to int8 (the
    default on AVX2 machines: several times faster, ~1-2% more error than NF4 alone), 'fp32' when
    they keep fp32 activations (LOWBIT_CPU_GEMV=fp32, or no SIMD kernels)."""
    return _name("lowbit_cpu_gemv_mode")


def cpu_matmul_dtype() -> str:
    """'bf16' when the CPU's 4-bit and affine products past the int8 tier (M > 32) multiply bf16
    activations by bf16 weight tiles (CPUs with AVX512-BF16 or AMX-BF16 running the avx512
    kernels: ~2x faster prefill), 'fp32' when they use fp32 tiles."""
    return _name("lowbit_cpu_matmul_dtype")


def with_cuda() -> bool:
    """Whether this build of lowbit has its CUDA kernels."""
    return bool(getattr(_C, "with_cuda", 0))
