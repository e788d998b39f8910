"""`lowbit demo`: quantize a real sentence-embedding model three ways and show what it costs.

For fp32, LLM.int8(), NF4 and FP4 it measures weight memory, load+quantize time, forward latency
and accuracy, where accuracy is the cosine similarity between each sentence's mean-pooled
embedding and the fp32 model's: the quantity a retrieval system built on the model relies on.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from lowbit.cli import _model
from lowbit.cli.errors import CliError

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Quantization stores neural network weights with fewer bits.",
    "A man is playing a guitar on a crowded street corner.",
    "The stock market fell sharply after the announcement.",
    "She baked fresh bread every morning before sunrise.",
    "Large language models are expensive to serve on a single GPU.",
    "The train to Berlin was delayed by forty minutes.",
    "Children were building a sandcastle near the waves.",
    "How do I reset my password if I forgot my email address?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Photosynthesis converts light energy into chemical energy.",
    "The committee postponed its decision until next spring.",
    "A dog is running through a field of tall grass.",
    "Int8 matrix multiplication is faster than floating point on many CPUs.",
    "The museum reopened after a year of renovations.",
    "He forgot his umbrella and got soaked in the rain.",
]

# name -> LowbitConfig arguments; None is the fp32 baseline.
VARIANTS = {
    "fp32": None,
    "int8": {"load_in_8bit": True, "llm_int8_threshold": 6.0},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}
WARMUP = 2


def _read_sentences(path: str | None) -> list[str]:
    if path is None:
        return list(SENTENCES)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CliError(f"cannot read --sentences file: {e.strerror}: {path}") from None
    sentences = [s.strip() for s in lines if s.strip()]
    if not sentences:
        raise CliError(f"--sentences file has no sentences: {path}")
    return sentences


def _embed(model, batch):
    """Mean of the last hidden states over real (unpadded) tokens, as sentence-transformers."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _median_ms(fn, repeats: int) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _measure(name, model_dir, batch, one, repeats, reference):
    import torch
    from transformers import AutoModel

    from lowbit.config import LowbitConfig
    from lowbit.loading import quantize_model

    start = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    if VARIANTS[name] is not None:
        quantize_model(model, LowbitConfig(**VARIANTS[name]), progress=False)
    model.eval()
    load_s = time.perf_counter() - start
    linear_b, model_b = _model.memory_bytes(model)

    with torch.inference_mode():
        emb = _embed(model, batch)
        latency_ms = _median_ms(lambda: _embed(model, batch), repeats)
        # One short sentence: a few rows per Linear, the regime of token-by-token generation.
        latency_one_ms = _median_ms(lambda: _embed(model, one), repeats)
    ref = emb if reference is None else reference
    cos = torch.nn.functional.cosine_similarity(emb.float(), ref.float(), dim=-1)
    result = {
        "format": name,
        "linear_mb": linear_b / 2**20,
        "model_mb": model_b / 2**20,
        "load_quantize_s": load_s,
        "latency_ms": latency_ms,
        "latency_one_ms": latency_one_ms,
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
    }
    return result, emb


def _table(results) -> str:
    head = (
        "format",
        "linear MB",
        "model MB",
        "load+quant s",
        "batch ms",
        "1-sentence ms",
        "cos mean",
        "cos min",
    )
    rows = [
        (
            r["format"],
            f"{r['linear_mb']:.2f}",
            f"{r['model_mb']:.2f}",
            f"{r['load_quantize_s']:.2f}",
            f"{r['latency_ms']:.1f}",
            f"{r['latency_one_ms']:.2f}",
            f"{r['cosine_mean']:.5f}",
            f"{r['cosine_min']:.5f}",
        )
        for r in results
    ]
    return render_table(head, rows)


def render_table(head, rows) -> str:
    """Aligned text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def fmt(row):
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def run(args) -> int:
    if args.repeats < 1:
        raise CliError(f"--repeats must be at least 1, got {args.repeats}")
    model_dir = _model.checkpoint_dir(args.model, "--model") if args.model else _model.minilm_dir()
    sentences = _read_sentences(args.sentences)
    _model.quiet_transformers()
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    one = tokenizer(sentences[:1], truncation=True, return_tensors="pt")
    if getattr(args, "formats", None):
        return _run_formats(args, model_dir, batch)

    results, reference = [], None
    for name in VARIANTS:
        result, emb = _measure(name, model_dir, batch, one, args.repeats, reference)
        reference = emb if reference is None else reference
        results.append(result)

    by_name = {r["format"]: r for r in results}
    nf4_beats_fp4 = by_name["nf4"]["cosine_mean"] > by_name["fp4"]["cosine_mean"]
    if args.json:
        out = {
            "model": str(model_dir),
            "sentences": len(sentences),
            "tokens": int(batch["attention_mask"].sum()),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "nf4_beats_fp4": nf4_beats_fp4,
            "results": results,
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"model: {model_dir}\n{len(sentences)} sentences, "
        f"{int(batch['attention_mask'].sum())} tokens, {torch.get_num_threads()} threads; "
        f"latency = median of {args.repeats} forward passes over the whole batch, and over its"
        f" first sentence alone ({int(one['attention_mask'].sum())} tokens)\n"
    )
    print(_table(results))
    print()
    verdict = "more" if nf4_beats_fp4 else "NOT more"
    print(f"NF4 is {verdict} accurate than FP4 on these sentences (mean cosine vs fp32).")
    return 0


def _run_formats(args, model_dir, batch) -> int:
    """--formats: other libraries' int4 checkpoints of the model, loaded and run by lowbit."""
    import torch
    from transformers import AutoModel

    from lowbit.cli import _formats_demo as fd

    formats = fd.parse_formats(args.formats)
    fp32 = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = _embed(fp32, batch)
        fp32_ms = _median_ms(lambda: _embed(fp32, batch), args.repeats)
    rows = [
        fd.measure(f, model_dir, batch, _embed, _median_ms, args.repeats, reference)
        for f in formats
    ]
    tokens = int(batch["attention_mask"].sum())
    if args.json:
        out = {
            "model": str(model_dir),
            "sentences": int(batch["input_ids"].shape[0]),
            "tokens": tokens,
            "threads": torch.get_num_threads(),
            "bits": fd.BITS,
            "group_size": fd.GROUP_SIZE,
            "fp32_latency_ms": fp32_ms,
            "results": rows,
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"model: {model_dir}\n{batch['input_ids'].shape[0]} sentences, {tokens} tokens, "
        f"{torch.get_num_threads()} threads; int{fd.BITS}, group size {fd.GROUP_SIZE}; each format's "
        "checkpoint written as its library writes it, then loaded by lowbit.from_pretrained\n"
        f"fp32 batch latency: {fp32_ms:.1f} ms (median of {args.repeats})\n"
    )
    print(fd.table(rows))
    print()
    for r in rows:
        print(f"{r['format']}: quantized by {r['quantized_by']}")
    print(
        "weights MB / x bf16: the linear layers' codes + fp32 scales and zeros, against the same "
        "weights in bf16; cos: embedding cosine similarity to fp32"
    )
    return 0
