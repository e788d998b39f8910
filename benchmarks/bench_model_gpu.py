"""Whole-model GPU benchmark: Llama-3-8B- and TinyLlama-1.1B-shaped models, bf16 vs quantized.

    python benchmarks/bench_model_gpu.py [--models tinyllama,llama3-8b] [--decode graph|compile]
        [--variants bf16,lowbit-nf4,lowbit-int8,bnb-nf4,bnb-int8] [--out benchmarks/results/model_gpu.md]

Each model is built from a config (transformers' LlamaForCausalLM, random bf16 weights drawn on
the GPU, no download), then its decoder's linear layers are replaced by the variant's (lm_head and
embeddings stay bf16, as bitsandbytes and transformers' quantizers leave them). Per variant:
  * weight memory: CUDA memory held by the model after quantization (allocator's count);
  * one-token decode with a static KV cache of 512 tokens (256 filled by an eager prefill):
    --decode compile: torch.compile(mode="reduce-overhead") of the step (CUDA graphs through
    inductor; slow to compile on 32 layers); --decode graph (default): the eager step captured
    into one CUDA graph by hand and replayed (the same launch-free replay, no inductor fusion of
    the elementwise parts, seconds to set up). Median of CUDA-event timings of 30 steps;
  * eager prefill of 1 x 2048 tokens (no cache), median of 3.
Ratios are against bf16 in the same process. A variant that fails (no bitsandbytes CUDA library,
a layer that cannot be captured, e.g. LLM.int8() with outliers before its graph-safe path lands)
is reported with the error instead of a number.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
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
    # a toy for running the script itself on the CPU (--device cpu)
    "toy": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rope_theta=10000.0,
    ),
}
VARIANTS = ["bf16", "lowbit-nf4", "lowbit-int8", "bnb-nf4", "bnb-int8"]
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


def decode_ms(model, cfg, device: str, mode: str) -> float:
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

    if device != "cuda":
        t0 = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - t0)
    if mode == "compile":
        fn = torch.compile(step, mode="reduce-overhead")
        for _ in range(3):
            fn()
        return cuda_median_ms(fn, 30)
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
    return cuda_median_ms(g.replay, 30)


def prefill_ms(model, cfg, device: str) -> float:
    ids = torch.randint(0, cfg.vocab_size, (1, PREFILL if device == "cuda" else 64), device=device)

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    run()
    if device != "cuda":
        t0 = time.perf_counter()
        run()
        return 1e3 * (time.perf_counter() - t0)
    return cuda_median_ms(run, 3)


def mem_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _write(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tinyllama,llama3-8b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--decode", choices=["graph", "compile"], default="graph")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/model_gpu.md")
    args = p.parse_args(argv)
    device = args.device
    lines = [
        "## lowbit whole-model benchmark",
        "",
        f"- command: `python benchmarks/bench_model_gpu.py {' '.join(argv or [])}`".rstrip() + "",
        f"- {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__},"
        f" {time.strftime('%Y-%m-%d')}; decode: {args.decode}, static cache {CACHE_LEN} ({FILLED}"
        f" filled), batch 1; prefill 1x{PREFILL} eager; ratios = bf16 ms / variant ms",
        "",
        "| model | variant | weights GiB | 1-token decode ms | vs bf16 | prefill ms | vs bf16 | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in args.models.split(","):
        base_dec = base_pre = None
        for variant in args.variants.split(","):
            t0 = time.perf_counter()
            before = mem_bytes(device)
            model = cfg = None
            note = ""
            dec = pre = None
            gib = float("nan")
            try:
                model, cfg = build(name, device)
                quantize(model, variant)
                gib = (mem_bytes(device) - before) / 2**30
                try:
                    dec = decode_ms(model, cfg, device, args.decode)
                except Exception as e:  # noqa: BLE001  (reported in the table)
                    note += f"decode failed: {type(e).__name__}: {str(e)[:120]} "
                pre = prefill_ms(model, cfg, device)
            except Exception as e:  # noqa: BLE001
                note += f"failed: {type(e).__name__}: {str(e)[:160]}"
            if variant == "bf16":
                base_dec, base_pre = dec, pre

            def ratio(base, x):
                return f"{base / x:.2f}x" if base and x else ""

            lines.append(
                f"| {name} | {variant} | {gib:.2f} | {'' if dec is None else f'{dec:.3f}'} | "
                f"{ratio(base_dec, dec)} | {'' if pre is None else f'{pre:.2f}'} | "
                f"{ratio(base_pre, pre)} | {note.strip()} ({time.perf_counter() - t0:.0f} s) |"
            )
            print(lines[-1], flush=True)
            _write(args.out, lines)  # after every row: a run cut short keeps what it measured
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch._dynamo.reset()
    print("\n".join(lines))
    _write(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
