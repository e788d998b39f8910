"""GPU benchmark of lowbit.optim (issue 14's GPU bar): AdamW8bit step time and state memory on a
Llama-like set of ~1B fp32 parameters, against torch.optim.AdamW(fused=True) timed in the same run.

    python benchmarks/bench_gpu_optim.py                 # quick (default): < 40 s on an H200
    python benchmarks/bench_gpu_optim.py --full          # more repeats
    python benchmarks/bench_gpu_optim.py --device cpu --tiny --no-bnb   # smoke test of the code

The parameters have TinyLlama-1.1B's shapes (22 layers, hidden 2048, MLP 5632, 4 KV heads of 64,
vocabulary 32000; 201 tensors, 1.10B parameters): large matrices for the 8-bit multi-tensor
launches and 2048-element norm vectors, which keep fp32 states (min_8bit_size 4096, as in
bitsandbytes) and go through the 32-bit op. Gradients are fixed random tensors, set once.

Rows: torch AdamW fused=True (the baseline), torch AdamW foreach=True, lowbit AdamW8bit (the
optimizer class), lowbit's 8-bit op alone over all tensors in one call (no Python optimizer
around it: the kernels' own time), and bitsandbytes' AdamW8bit when it imports with GPU support.
Every row uses lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.

Timing: CUDA events, median over repeats. "step ms" times `--group` steps back to back between two
events and divides (the host runs ahead as in a training loop, so host overhead is hidden when the
GPU is the bottleneck); "1-step ms" brackets a single step after a synchronisation (host overhead
included); "host ms" is the wall time the step() call itself takes on the host. Speed = torch fused
step ms / row's step ms (> 1: faster than the baseline).

Memory: torch.cuda.memory_allocated after the first step (states are created lazily) minus before,
i.e. the persistent optimizer state; "peak +MiB" is the step's transient memory above that
(max_memory_allocated). The bar: AdamW8bit state <= 0.27x torch AdamW's fp32 states and step
speed >= 1.0x torch AdamW(fused=True).

Exit status: 0, or 1 when a lowbit row failed (the table is still written, with the error), or 2
when the device is CUDA and no CUDA device is present.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import statistics
import sys
import time

import torch

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01
SPEED_BAR, MEMORY_BAR = 1.0, 0.27


# ---- the parameter set -------------------------------------------------------------------------


def llama_shapes(
    layers: int, hidden: int, mlp: int, kv_dim: int, vocab: int
) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama decoder (untied embeddings), in module order."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [
            (hidden, hidden),  # q
            (kv_dim, hidden),  # k
            (kv_dim, hidden),  # v
            (hidden, hidden),  # o
            (mlp, hidden),  # gate
            (mlp, hidden),  # up
            (hidden, mlp),  # down
            (hidden,),  # input norm
            (hidden,),  # post-attention norm
        ]
    shapes += [(hidden,), (vocab, hidden)]  # final norm, lm_head
    return shapes


MODELS = {
    # TinyLlama-1.1B: 1.10e9 parameters, 201 tensors
    "tinyllama": dict(layers=22, hidden=2048, mlp=5632, kv_dim=256, vocab=32000),
    # the smoke test: a few thousand parameters, the same structure (norms below min_8bit_size)
    "tiny": dict(layers=2, hidden=64, mlp=160, kv_dim=16, vocab=100),
}


def make_params(shapes, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 parameters with fixed random gradients (set once, reused by every step)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(s, device=device, generator=gen) * 1e-3
        params.append(p)
    return params


def numel(params) -> int:
    return sum(p.numel() for p in params)


# ---- timing and memory -------------------------------------------------------------------------


class Clock:
    """Event-based (CUDA) or wall-clock (CPU) timing of a callable; milliseconds."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, count: int) -> tuple[float, float]:
        """(device ms, host ms) of `count` back-to-back calls of fn, per call."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        host = (time.perf_counter() - t0) * 1e3 / count
        if self.cuda:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / count, host
        return host, host


def median_times(clock: Clock, fn, repeats: int, group: int) -> dict:
    """Medians over `repeats` samples: grouped steps, single steps, and host time per step."""
    grouped, hosts, single = [], [], []
    for _ in range(repeats):
        ms, host = clock.time(fn, group)
        grouped.append(ms)
        hosts.append(host)
    for _ in range(repeats):
        single.append(clock.time(fn, 1)[0])
    return {
        "step_ms": statistics.median(grouped),
        "single_ms": statistics.median(single),
        "host_ms": statistics.median(hosts),
    }


def allocated(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


def state_bytes_of(opt) -> int:
    """Bytes of every tensor in the optimizer's state (distinct storages), device-independent."""
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.device)
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


def measure(name: str, make_step, device: str, clock: Clock, repeats: int, group: int) -> dict:
    """One row: memory of the first step (the states appear), then the timings.
    make_step() -> (step callable, optimizer or None, bytes of states it owns outside opt.state)."""
    row = {"name": name, "error": None}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = allocated(device)
    try:
        step, opt, extra = make_step()
        step()  # first step: creates the states
        after = allocated(device)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else after
        row["state_bytes"] = (after - before) if device == "cuda" else None
        row["counted_bytes"] = (state_bytes_of(opt) if opt is not None else 0) + extra
        row["peak_extra"] = (peak - after) if device == "cuda" else None
        step()  # warm-up (allocator, bitsandbytes' lazy set-up)
        row.update(median_times(clock, step, repeats, group))
    except Exception as e:  # noqa: BLE001  (the table records it; lowbit failures set the exit code)
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"{name}: FAILED: {row['error']}", file=sys.stderr)
    finally:
        step = opt = None
        gc.collect()
    return row


# ---- the rows -----------------------------------------------------------------------------------


def torch_adamw(params, **kw):
    def make():
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
        return opt.step, opt, 0

    return make


def lowbit_adamw8bit(params):
    def make():
        import lowbit.optim as O

        opt = O.AdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        return opt.step, opt, 0

    return make


def lowbit_op_only(params, kernel: str | None = None):
    """The fused 8-bit op over every tensor in one call (8-bit states for all, even the norms):
    what the kernels cost without the optimizer's per-parameter Python work. kernel: the CUDA
    8-bit kernel (LOWBIT_OPTIM8_KERNEL: "block" or the default warp-per-block one)."""

    def make():
        from lowbit._codes import create_dynamic_map

        dev = params[0].device
        q1 = create_dynamic_map(signed=True).to(dev)
        q2 = create_dynamic_map(signed=False).to(dev)
        s1 = [torch.zeros(p.numel(), dtype=torch.uint8, device=dev) for p in params]
        s2 = [torch.zeros(p.numel(), dtype=torch.uint8, device=dev) for p in params]
        a1 = [torch.zeros(-(-p.numel() // 256), device=dev) for p in params]
        a2 = [torch.zeros(-(-p.numel() // 256), device=dev) for p in params]
        ps = [p.data for p in params]
        gs = [p.grad for p in params]
        counter = [0]

        def step():
            counter[0] += 1
            with _env("LOWBIT_OPTIM8_KERNEL", kernel):
                _op_call(counter[0])

        def _op_call(t):
            torch.ops.lowbit.optimizer_update_8bit_blockwise(
                "adam", gs, ps, s1, s2, a1, a2, q1, q2, BETAS[0], BETAS[1], EPS,
                t, LR, WD, 1.0, False, -1,
            )  # fmt: skip

        extra = sum(t.untyped_storage().nbytes() for t in s1 + s2 + a1 + a2)
        return step, None, extra

    return make


class _env:
    """Set (value not None) an environment variable for the duration of a with-block."""

    def __init__(self, key: str, value: str | None):
        self.key, self.value, self.old = key, value, None

    def __enter__(self):
        if self.value is not None:
            self.old = os.environ.get(self.key)
            os.environ[self.key] = self.value

    def __exit__(self, *exc):
        if self.value is not None:
            if self.old is None:
                os.environ.pop(self.key, None)
            else:
                os.environ[self.key] = self.old


def bnb_adamw8bit(params):
    def make():
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        return opt.step, opt, 0

    return make


def run_rows(args) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    shapes = llama_shapes(**MODELS[args.model])
    params = make_params(shapes, args.device)
    clock = Clock(args.device)
    rows_spec = [
        ("torch AdamW fused=True", torch_adamw(params, fused=True)),
        ("torch AdamW foreach=True", torch_adamw(params, foreach=True)),
        ("lowbit AdamW8bit", lowbit_adamw8bit(params)),
        ("lowbit 8-bit op only (one call)", lowbit_op_only(params)),
        ("lowbit 8-bit op only, block kernel", lowbit_op_only(params, "block")),
    ]
    if not args.no_bnb:
        rows_spec.append(("bitsandbytes AdamW8bit", bnb_adamw8bit(params)))
    rows = []
    for name, make in rows_spec:  # each row builds its own states (the last row's are freed)
        rows.append(measure(name, make, args.device, clock, args.repeats, args.group))
    meta = {"numel": numel(params), "tensors": len(params)}
    return rows, meta


# ---- the table ----------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """speed (baseline step ms / row step ms) and state / torch fp32 states, against the first row
    (torch AdamW fused=True) for speed and the torch rows' measured states for memory."""
    base = rows[0]
    base_ms = base.get("step_ms") if base["error"] is None else None
    base_state = None
    for r in rows:
        if r["name"].startswith("torch") and r["error"] is None:
            base_state = r["state_bytes"] if r["state_bytes"] is not None else r["counted_bytes"]
            if base_state:
                break
    for r in rows:
        ok = r["error"] is None
        r["speed"] = base_ms / r["step_ms"] if ok and base_ms else None
        state = None
        if ok:
            state = r["state_bytes"] if r["state_bytes"] is not None else r["counted_bytes"]
        r["state_ratio"] = state / base_state if state is not None and base_state else None


def bar_lines(rows: list[dict]) -> list[str]:
    row = next((r for r in rows if r["name"] == "lowbit AdamW8bit"), None)
    if row is None or row["error"] is not None:
        return ["- bar: lowbit AdamW8bit did not run"]
    lines = []
    if row["speed"] is not None:
        verdict = "met" if row["speed"] >= SPEED_BAR else "MISSED"
        lines.append(
            f"- speed bar (>= {SPEED_BAR:.1f}x torch AdamW fused=True): {row['speed']:.2f}x, {verdict}"
        )
    if row["state_ratio"] is not None:
        verdict = "met" if row["state_ratio"] <= MEMORY_BAR else "MISSED"
        lines.append(
            f"- state memory bar (<= {MEMORY_BAR}x torch AdamW fp32 states): "
            f"{row['state_ratio']:.3f}x, {verdict}"
        )
    return lines


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(rows: list[dict], meta: dict, device_name: str, command: str, args) -> str:
    add_ratios(rows)
    mib = 1 << 20
    lines = [
        f"# lowbit.optim GPU benchmark: {device_name}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command}`",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), device {args.device}",
        f"- parameters: {meta['numel'] / 1e9:.3f}B fp32 in {meta['tensors']} tensors "
        f"({args.model} shapes), fixed gradients; lr {LR}, betas {BETAS}, eps {EPS}, "
        f"weight decay {WD}",
        f"- medians of {args.repeats} samples; step ms = {args.group} back-to-back steps / "
        f"{args.group}; speed = torch fused step ms / row step ms (> 1: faster)",
        "",
        "| optimizer | step ms | speed vs torch fused | 1-step ms | host ms | state MiB "
        "| state / torch fp32 | peak +MiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"] is not None:
            lines.append(f"| {r['name']} | - | - | - | - | - | - | - | {r['error'][:160]} |")
            continue
        state = r["state_bytes"] if r["state_bytes"] is not None else r["counted_bytes"]
        note = ""
        if r["state_bytes"] is not None and r["counted_bytes"]:
            note = f"state tensors: {r['counted_bytes'] / mib:.1f} MiB"
        speed = "-" if r["speed"] is None else f"{r['speed']:.2f}x"
        ratio = "-" if r["state_ratio"] is None else f"{r['state_ratio']:.3f}x"
        peak = None if r["peak_extra"] is None else r["peak_extra"] / mib
        lines.append(
            f"| {r['name']} | {r['step_ms']:.3f} | {speed} | {r['single_ms']:.3f} | "
            f"{r['host_ms']:.3f} | {state / mib:.1f} | {ratio} | {_fmt(peak, '.1f')} | {note} |"
        )
    lines += [""] + bar_lines(rows)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", default=True, help="the default: 5 repeats")
    p.add_argument("--full", action="store_true", help="20 repeats instead of 5")
    p.add_argument("--tiny", action="store_true", help="a tiny parameter set (smoke test)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--group", type=int, default=5, help="back-to-back steps per timed sample")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    p.add_argument("--out", default="benchmarks/results/gpu_optim.md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu_optim: no CUDA device (torch.cuda.is_available() is False); this benchmark "
            "times GPU optimizer steps. Use --device cpu --tiny for a smoke run of its code.",
            file=sys.stderr,
        )
        return 2
    args.model = "tiny" if args.tiny else "tinyllama"
    if args.repeats is None:
        args.repeats = 20 if args.full else 5
    import lowbit  # noqa: F401  (registers the ops)

    command = " ".join(["python", *map(shlex.quote, [sys.argv[0], *(argv or sys.argv[1:])])])
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else "CPU smoke run (no GPU)"
    )
    t0 = time.perf_counter()
    rows, meta = run_rows(args)
    text = render(rows, meta, device_name, command, args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"bench_gpu_optim: {time.perf_counter() - t0:.1f} s, table in {args.out}")
    failed = [r["name"] for r in rows if r["error"] is not None and r["name"].startswith("lowbit")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
