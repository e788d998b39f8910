"""Python side of cudasim: build (cached) and load the simulated CUDA kernels, call them on CPU
tensors through ctypes.

    from simlib import load          # with tools/cudasim on sys.path
    sim = load()                     # builds build/cudasim/default/libcudasim-*.so if needed
    sim.configure(schedule=1)        # 0 forward, 1 reverse, 2 seeded shuffle
    rc = sim.lib.lb_quantize_4bit(...)

Every lb_* entry point returns the CUDA error code of the wrapped lowbit::cuda function (0 on
success); sim.check(rc) raises with the simulator's message otherwise.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

FLOAT_TYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2}

_LIBS: dict[bool, Sim] = {}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


class SimError(RuntimeError):
    pass


class Sim:
    def __init__(self, so: Path):
        self.path = so
        lib = ctypes.CDLL(str(so))
        self.lib = lib
        lib.cudasim_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int]
        lib.cudasim_configure.restype = None
        lib.cudasim_last_message.restype = ctypes.c_char_p
        for f in ("cudasim_launches", "cudasim_launch_errors", "cudasim_faults"):
            getattr(lib, f).restype = ctypes.c_longlong
        i64, i32, f32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        sig = {
            "lb_quantize_blockwise": [i32, vp, i64, i64, vp, vp, vp],
            "lb_dequantize_blockwise": [vp, vp, vp, i64, i64, i32, vp],
            "lb_quantize_4bit": [i32, vp, i64, i64, vp, vp, vp],
            "lb_dequantize_4bit": [vp, vp, vp, i64, i64, i32, vp],
            "lb_dequantize_4bit_weight": [vp, vp, vp, vp, vp, f32, i32, vp, i64, i64, i32, vp],
            "lb_plan_gemm_4bit": [i32, i64, i64, i64, i32, i32, i32, i32, ctypes.c_char_p, vp, vp],
            "lb_gemm_4bit": [i32, i32, i32, i64, i32, vp, i64, i64, vp, vp, vp, vp, vp, f32, i32]
            + [vp, i64, vp, i64, vp],
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = None if name == "lb_plan_gemm_4bit" else ctypes.c_int

    def declare(self, signatures: dict[str, list], restype=ctypes.c_int) -> None:
        """Set the ctypes argument types of more lb_* entry points (a kernel family's test file
        declares those of its own shim here, so that families do not share one table)."""
        for name, args in signatures.items():
            fn = getattr(self.lib, name)
            fn.argtypes = args
            fn.restype = restype

    def configure(self, schedule: int | str = 0, seed: int = 1, cc: int = 90) -> None:
        if isinstance(schedule, str):
            schedule = SCHEDULES[schedule]
        self.lib.cudasim_configure(schedule, seed, cc)

    def message(self) -> str:
        return (self.lib.cudasim_last_message() or b"").decode(errors="replace")

    def check(self, rc: int, what: str = "") -> None:
        if rc != 0:
            raise SimError(f"{what} returned CUDA error {rc}: {self.message()}")

    def counters(self) -> dict[str, int]:
        return {
            "launches": self.lib.cudasim_launches(),
            "launch_errors": self.lib.cudasim_launch_errors(),
            "faults": self.lib.cudasim_faults(),
        }


def load(asan: bool = False) -> Sim:
    """Build (if a source changed) and load the simulator library; one per process and variant."""
    if asan in _LIBS:
        return _LIBS[asan]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import build  # tools/cudasim/build.py

    so = build.main(["--asan"] if asan else [])
    sim = Sim(so)
    _LIBS[asan] = sim
    return sim


# ---- test helpers shared by tests/test_cudasim_*.py --------------------------------------------
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype and bits (NaN == NaN with the same payload, -0 != +0)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} of {a.numel()} differ, first at {bad[:5]}")


def assert_matches(actual, cpu, ref, what: str) -> None:
    """Bits of the CPU kernel's output; values of the reference (NaN where it has NaN)."""
    assert_bits_equal(actual, cpu, what + " (vs the CPU kernel)")
    torch.testing.assert_close(actual, ref, rtol=0, atol=0, equal_nan=True, msg=what)


def two_schedules(sim: Sim, fn, schedules=("forward", "reverse")):
    """fn() (returning a tuple of tensors) under each schedule; the outputs must be bit-identical
    (a result that depends on the order the threads run in is a race). Returns the first."""
    outs = []
    for s in schedules:
        sim.configure(s, seed=7)
        outs.append(fn())
    sim.configure("forward")
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert_bits_equal(y, x, f"schedule-dependent output ({schedules[0]} vs {schedules[1]})")
    return outs[0]


def misaligned_empty(n: int, dtype: torch.dtype, offset_bytes: int) -> torch.Tensor:
    """n elements at a data pointer `offset_bytes` past a 64-byte boundary."""
    size = torch.tensor([], dtype=dtype).element_size()
    assert offset_bytes % size == 0
    base = torch.empty(n + 64 // size + offset_bytes // size, dtype=dtype)
    skip = (-base.data_ptr() % 64 + offset_bytes) // size
    out = base[skip : skip + n]
    assert out.data_ptr() % 64 == offset_bytes
    return out


def misaligned_copy(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    out = misaligned_empty(t.numel(), t.dtype, offset_bytes)
    out.copy_(t.reshape(-1))
    return out.view(t.shape)
