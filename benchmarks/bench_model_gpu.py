"""Whole-model GPU benchmark: Llama-3-8B- and TinyLlama-1.1B-shaped models, bf16 vs quantized.

    python benchmarks/bench_model_gpu.py [--models tinyllama,llama3-8b] [--decode graph|compile]
        [--variants bf16,lowbit-nf4,lowbit-int4,lowbit-int8,bnb-nf4,bnb-int8]
        [--out benchmarks/results/model_gpu.md]

Each model is built from a config (transformers' LlamaForCausalLM, random bf16 weights drawn on
the GPU, no download), then its decoder's linear layers are replaced by the variant's (lm_head and
embeddings stay bf16, as bitsandbytes and transformers' quantizers leave them). lowbit-int4 is the
affine format of GPTQ / AWQ / HQQ / compressed-tensors checkpoints (issue #13): LinearAffine, int4,
group size 128, asymmetric, installed as lowbit.from_pretrained installs a converted checkpoint.
Per variant:
  * weight memory: CUDA memory held by the model after quantization (allocator's count), and the
    decoder's linear weights against their bf16 bytes (the quantization states included);
  * one-token decode with a static KV cache of 512 tokens (256 filled by an eager prefill):
    --decode compile: torch.compile(mode="reduce-overhead") of the step (CUDA graphs through
    inductor; slow to compile on 32 layers); --decode graph (default): the eager step captured
    into one CUDA graph by hand and replayed (the same launch-free replay, no inductor fusion of
    the elementwise parts, seconds to set up). Median of CUDA-event timings of 30 steps;
  * eager prefill of 1 x 2048 tokens (no cache), median of 3.
Ratios are against bf16 in the same process. A variant that fails (no bitsandbytes CUDA library,
a layer that cannot be captured) is reported with the error instead of a number.

`--device cpu --models toy` runs the same code on the CPU (eager decode, wall-clock timer, tensor
bytes for the weight memory): a smoke run whose numbers mean nothing; tests/test_bench_smoke.py
does that with a trivial timer.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

MODELS = {
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    # TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000
    "tinyllama": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        rope_theta=10000.0,
    ),
    # a toy for running the script itself on the CPU (--device cpu); K a multiple of the affine
    # group size (128)
    "toy": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rope_theta=10000.0,
    ),
}
# Default order = run order: a run cut short by its time box (tools/gpu_run.sh gives this script
# 150 s) keeps the rows written so far, so lowbit's variants come before bitsandbytes'.
VARIANTS = ["bf16", "lowbit-nf4", "lowbit-int4", "lowbit-int8", "bnb-nf4", "bnb-int8"]
AFFINE_GROUP = 128
CACHE_LEN, FILLED, PREFILL = 512, 256, 2048


def build(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # real random values (never time on zeros or uninitialised memory)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval(), cfg


def replace_linears(model, make):
    """Swap every nn.Linear inside the decoder layers for make(linear), freeing the original."""
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if type(mod) is torch.nn.Linear:
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], make(mod))
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def affine_from_linear(m, bits: int, group_size: int):
    """m's weight in a LinearAffine, made as lowbit.from_pretrained makes a GPTQ / AWQ / HQQ /
    compressed-tensors layer: an empty LinearAffine of the linear's shape on the meta device
    (loading/affine.py), allocated on the weight's device, and the converted codes installed with
    set_weight (loading/tensors.py). The codes come from quantize_affine (round-to-nearest
    min/max, asymmetric), the format every reader converts to."""
    from lowbit import functional as LF
    from lowbit.nn import LinearAffine

    q = LinearAffine(
        m.in_features,
        m.out_features,
        bias=m.bias is not None,
        bits=bits,
        group_size=group_size,
        device="meta",
        dtype=m.weight.dtype,
    )
    q.requires_grad_(False)
    q.to_empty(device=m.weight.device)
    packed, scales, zeros = LF.quantize_affine(m.weight.data, bits, group_size)
    q.set_weight(packed, scales, zeros, bits, group_size)
    if m.bias is not None:
        q.bias.data.copy_(m.bias.data)
    return q


def quantize(model, variant: str):
    if variant == "bf16":
        return
    if variant == "lowbit-nf4":
        from lowbit.nn import Linear4bit

        replace_linears(
            model,
            lambda m: Linear4bit.from_linear(
                m, quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16
            ),
        )
    elif variant == "lowbit-int4":
        replace_linears(model, lambda m: affine_from_linear(m, 4, AFFINE_GROUP))
    elif variant == "lowbit-int8":
        from lowbit.nn import Linear8bitLt

        replace_linears(model, lambda m: Linear8bitLt.from_linear(m, threshold=6.0))
    elif variant == "bnb-nf4":
        import bitsandbytes as bnb

        def make(m):
            q = bnb.nn.Linear4bit(
                m.in_features,
                m.out_features,
                m.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                m.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            q.weight = q.weight._quantize(m.weight.device)
            return q

        replace_linears(model, make)
    elif variant == "bnb-int8":
        import bitsandbytes as bnb

        def make(m):
            q = bnb.nn.Linear8bitLt(
                m.in_features,
                m.out_features,
                m.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            w = bnb.nn.Int8Params(m.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            q.weight = w.to(m.weight.device)  # Int8Params quantizes on its move to the GPU
            return q

        replace_linears(model, make)
    else:
        raise ValueError(variant)


def cuda_median_ms(fn, n: int) -> float:
    """The CUDA timer: median milliseconds of n calls of fn, CUDA events (no sync in between)."""
    ev = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def wall_median_ms(fn, n: int) -> float:
    """The CPU timer: median wall-clock milliseconds of at most 3 calls (a smoke run's numbers)."""
    times = []
    for _ in range(min(n, 3)):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def cuda_graph_replay(step):
    """step captured into one CUDA graph (after two warm-up calls on a side stream), replayed once;
    returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    return g.replay


def compiled_reduce_overhead(step):
    """torch.compile(mode="reduce-overhead") of step (CUDA graphs through inductor), warmed up."""
    fn = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        fn()
    return fn


def decode_ms(model, cfg, device: str, mode: str, timer, n: int = 30) -> float:
    """One-token decode step with a static cache of CACHE_LEN (FILLED filled): timer(step, n) of the
    step as `mode` runs it (graph: captured by hand; compile: reduce-overhead; eager)."""
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=CACHE_LEN)
    prompt = torch.randint(0, cfg.vocab_size, (1, FILLED), device=device)
    with torch.no_grad():
        model(
            input_ids=prompt,
            past_key_values=cache,
            cache_position=torch.arange(FILLED, device=device),
            use_cache=True,
        )
    ids = torch.randint(0, cfg.vocab_size, (1, 1), device=device)
    pos = torch.tensor([FILLED], device=device)

    def step():
        with torch.no_grad():
            return model(
                input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True
            ).logits

    if mode == "compile":
        fn = compiled_reduce_overhead(step)
    elif mode == "graph":
        fn = cuda_graph_replay(step)
    else:
        step()  # warm-up, as the graph and compile paths have
        fn = step
    return timer(fn, n)


def prefill_ms(model, cfg, device: str, timer, tokens: int) -> float:
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    run()
    return timer(run, 3)


def held_bytes(device: str, model=None) -> int:
    """Bytes held: on CUDA the allocator's count of live tensors (everything, quantization states
    included); elsewhere the bytes of the model's parameters and buffers (0 without a model)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    if model is None:
        return 0
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decoder_linear_bytes(model) -> int:
    """bf16 bytes of the decoder layers' linear weights: what quantize() replaces."""
    return sum(
        m.weight.numel() * 2
        for layer in model.model.layers
        for m in layer.modules()
        if type(m) is torch.nn.Linear
    )


def _write(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run(
    models: list[str],
    variants: list[str],
    *,
    device: str,
    decode: str,
    timer,
    prefill: int,
    out: str,
    command: str,
    device_name: str,
) -> list[str]:
    """Time every (model, variant) and write the table to `out` after each row; returns its lines.
    timer(fn, n) -> median ms of n calls (cuda_median_ms on the GPU)."""
    lines = [
        "## lowbit whole-model benchmark",
        "",
        f"- command: `{command}`",
        f"- {device_name}, torch {torch.__version__},"
        f" {time.strftime('%Y-%m-%d')}; decode: {decode}, static cache {CACHE_LEN} ({FILLED}"
        f" filled), batch 1; prefill 1x{prefill} eager; ratios = bf16 ms / variant ms",
        "",
        "| model | variant | weights GiB | linears vs bf16 | 1-token decode ms | vs bf16 | prefill ms "
        "| vs bf16 | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in models:
        base_dec = base_pre = None
        for variant in variants:
            t0 = time.perf_counter()
            before = held_bytes(device)
            model = cfg = None
            note = ""
            dec = pre = None
            gib = lin = float("nan")
            try:
                model, cfg = build(name, device)
                # the decoder's linear weights after quantization, against bf16 (issue 11's and
                # 13's memory bars): their bf16 bytes plus what quantize() changed
                dense, built = decoder_linear_bytes(model), held_bytes(device, model)
                quantize(model, variant)
                held = held_bytes(device, model)
                gib = (held - before) / 2**30
                lin = (dense + held - built) / dense
                try:
                    dec = decode_ms(model, cfg, device, decode, timer)
                except Exception as e:  # noqa: BLE001  (reported in the table)
                    note += f"decode failed: {type(e).__name__}: {str(e)[:120]} "
                pre = prefill_ms(model, cfg, device, timer, prefill)
            except Exception as e:  # noqa: BLE001
                note += f"failed: {type(e).__name__}: {str(e)[:160]}"
            if variant == "bf16":
                base_dec, base_pre = dec, pre

            def ratio(base, x):
                return f"{base / x:.2f}x" if base and x else ""

            lines.append(
                f"| {name} | {variant} | {gib:.2f} | {lin:.3f}x | {'' if dec is None else f'{dec:.3f}'} | "
                f"{ratio(base_dec, dec)} | {'' if pre is None else f'{pre:.2f}'} | "
                f"{ratio(base_pre, pre)} | {note.strip()} ({time.perf_counter() - t0:.0f} s) |"
            )
            print(lines[-1], flush=True)
            _write(out, lines)  # after every row: a run cut short keeps what it measured
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch._dynamo.reset()
    return lines


def main(argv=None, timer=None) -> int:
    """timer(fn, n) -> median ms; default cuda_median_ms on CUDA, wall_median_ms elsewhere."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tinyllama,llama3-8b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--decode",
        choices=["graph", "compile", "eager"],
        default="graph",
        help="graph and compile need CUDA; off CUDA the decode runs eager",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", type=int, default=None, help=f"tokens (default {PREFILL}; cpu 64)")
    p.add_argument("--out", default="benchmarks/results/model_gpu.md")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    cuda = args.device == "cuda"
    decode = args.decode if cuda else "eager"  # CUDA graphs and reduce-overhead are CUDA's
    lines = run(
        args.models.split(","),
        args.variants.split(","),
        device=args.device,
        decode=decode,
        timer=timer or (cuda_median_ms if cuda else wall_median_ms),
        prefill=args.prefill or (PREFILL if cuda else 64),
        out=args.out,
        command=" ".join(["python benchmarks/bench_model_gpu.py", *argv]),
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
    )
    print("\n".join(lines))
    _write(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
