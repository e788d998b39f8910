"""The CPU int8 GEMM (int8_linear_matmul) and LLM.int8() linear against bf16 torch.matmul, by M.

    python benchmarks/bench_int8_gemm_cpu.py [--threads N] [--cpu-time] [--shapes 4096x4096,...]

Every row times lowbit's int8 x int8 -> int32 product (and the whole int8_linear op) against
torch.matmul of the same shape in bf16 in the same process, interleaved, medians of several
repeats; the machine is shared, so only the ratios mean anything. Where the build has the test
hook lowbit_cpu_int8_gemm_packed_min_m (csrc/kernels/cpu/avx512_int8_gemm.cpp), each M is also
timed with the packed (outer-product) kernel forced on and forced off, so old and new kernels are
compared in one process. --cpu-time reports time.process_time per call instead of wall time
(meaningful with --threads 1: CPU time is immune to waiting for a busy machine).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

import lowbit

ops = torch.ops.lowbit


def hook():
    try:
        fn = ctypes.CDLL(lowbit._C.__file__).lowbit_cpu_int8_gemm_packed_min_m
    except AttributeError:
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64]
    return fn


def timeit(fn, reps: int, clock) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cpu-time", action="store_true")
    p.add_argument("--shapes", default="4096x4096,11008x4096")
    p.add_argument("--ms", default="1,16,32,64,128,512")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    set_min_m = hook()
    default_min_m = set_min_m(-1) if set_min_m else None
    print(
        f"threads={torch.get_num_threads()} clock={'cpu' if args.cpu_time else 'wall'} "
        f"packed kernel from M >= {default_min_m}"
    )
    hdr = "| shape | M | bf16 matmul ms | int8 gemm ms | x bf16 |"
    if set_min_m:
        hdr += " packed ms | dot ms | dot/packed |"
    hdr += " int8_linear ms | x bf16 |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        W = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        Wb = torch.randn(N, K, dtype=torch.bfloat16)
        Ws = torch.rand(N) + 0.5
        for M in map(int, args.ms.split(",")):
            reps = args.reps if M <= 128 else max(3, args.reps // 2)
            A = torch.randint(-127, 128, (M, K), dtype=torch.int8)
            Ab = torch.randn(M, K, dtype=torch.bfloat16)
            t_bf = timeit(lambda: torch.matmul(Ab, Wb.t()), reps, clock)
            t_i8 = timeit(lambda: ops.int8_linear_matmul(A, W), reps, clock)
            row = f"| {N}x{K} | {M} | {1e3 * t_bf:.3f} | {1e3 * t_i8:.3f} | {t_bf / t_i8:.2f} |"
            if set_min_m:
                set_min_m(1)
                t_pk = timeit(lambda: ops.int8_linear_matmul(A, W), reps, clock)
                set_min_m(1 << 62)
                t_dot = timeit(lambda: ops.int8_linear_matmul(A, W), reps, clock)
                set_min_m(default_min_m)
                row += f" {1e3 * t_pk:.3f} | {1e3 * t_dot:.3f} | {t_dot / t_pk:.2f} |"
            t_lin = timeit(lambda: ops.int8_linear(Ab, W, Ws, None, 6.0), reps, clock)
            row += f" {1e3 * t_lin:.3f} | {t_bf / t_lin:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
