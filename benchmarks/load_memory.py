"""Peak memory of loading a checkpoint: Transformers fp32 vs lowbit.from_pretrained 4-bit / 8-bit.

Generates a Llama-style model with random weights (>= 1.5 GB in fp32) as safetensors in a temp
dir, then loads it in a fresh subprocess per case. Each child measures its own peak RSS growth
(peak RSS, VmHWM / getrusage, after the load minus before it; imports excluded). The bar for lowbit:
growth < size of the loaded model + the largest checkpoint tensor + 300 MB, i.e. streaming never
holds more than one float tensor beside the quantized model.

    python benchmarks/load_memory.py [--layers 8] [--keep DIR]

Prints a table and writes benchmarks/results/load_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
SLACK = 300 * MB
RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.md"


def _maxrss() -> int:
    """Peak RSS of this process in bytes. VmHWM belongs to this process's address space; getrusage's
    ru_maxrss survives fork + exec, so a child would report its parent's peak (the generator's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _state_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    for m in model.modules():  # 4-bit scales live on the parameter, not as buffers
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += sum(t.numel() * t.element_size() for t in qs.as_dict(packed=True).values())
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def child(case: str, path: str) -> None:
    """Runs in the subprocess: load once, print one JSON line."""
    import torch
    import transformers

    import lowbit

    before = _maxrss()
    t0 = time.perf_counter()
    if case == "transformers fp32":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif case == "lowbit 4-bit nf4":
        model = lowbit.from_pretrained(
            path,
            quantization_config=lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        )
    elif case == "lowbit 8-bit":
        model = lowbit.from_pretrained(path, load_in_8bit=True)
    else:
        raise ValueError(case)
    seconds = time.perf_counter() - t0
    peak = _maxrss()
    # Transformers leaves fp32 weights memory-mapped from the file: they become resident only when
    # touched. Read every tensor once to see what the loaded model really occupies.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                t.amax()  # a reduction: reads every byte without allocating a copy
    touched = _maxrss()
    print(
        json.dumps(
            {
                "growth": peak - before,
                "touched": touched - before,
                "seconds": seconds,
                "size": _state_bytes(model),
            }
        )
    )


def generate(path: Path, layers: int) -> tuple[int, int]:
    """Writes the model; returns (checkpoint bytes, largest tensor bytes)."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="20GB")  # one file: the hardest case for mmap RSS
    del model
    largest = total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes = n * 4  # fp32 checkpoint
                largest, total = max(largest, nbytes), total + nbytes
    return total, largest


def run_case(case: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, str(path)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", type=Path, default=None, help="reuse / keep the model in this dir")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-load-memory-")
        path = Path(tmp.name)
    else:
        path = args.keep
        path.mkdir(parents=True, exist_ok=True)
    if not (path / "config.json").is_file():
        print(f"generating a Llama-style model in {path} ...", flush=True)
    total, largest = (
        generate(path, args.layers) if not (path / "config.json").is_file() else (_sizes(path))
    )
    print(f"checkpoint: {total / MB:.0f} MB fp32, largest tensor {largest / MB:.0f} MB", flush=True)

    rows = []
    for case in ("transformers fp32", "lowbit 4-bit nf4", "lowbit 8-bit"):
        r = run_case(case, path)
        bar = r["size"] + largest + SLACK
        ok = r["growth"] < bar
        rows.append((case, r["seconds"], r["growth"], r["touched"], r["size"], bar, ok))
        print(
            f"  {case}: {r['growth'] / MB:.0f} MB peak growth in {r['seconds']:.1f} s", flush=True
        )

    lines = [
        "# Load memory: peak RSS growth while loading a checkpoint",
        "",
        f"Model: Llama-style, {args.layers} layers, hidden 2048, vocab 32000, random weights; "
        f"checkpoint {total / MB:.0f} MB fp32 in one safetensors file; "
        f"largest tensor {largest / MB:.0f} MB.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "Bar (lowbit rows): growth < loaded model size + largest tensor + 300 MB.",
        "",
        "Transformers keeps fp32 weights memory-mapped (resident only once read), so the",
        "'after reading all weights' column is the comparable one for the baseline.",
        "",
        "| case | load s | peak RSS growth MB | after reading all weights MB | loaded model MB "
        "| bar MB | within bar |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for case, secs, growth, touched, size, bar, ok in rows:
        verdict = ("yes" if ok else "NO") if case.startswith("lowbit") else "(baseline)"
        lines.append(
            f"| {case} | {secs:.1f} | {growth / MB:.0f} | {touched / MB:.0f} | {size / MB:.0f} "
            f"| {bar / MB:.0f} | {verdict} |"
        )
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table)
    if tmp is not None:
        tmp.cleanup()
    if not all(ok for case, *_, ok in rows if case.startswith("lowbit")):
        sys.exit(1)


def _sizes(path: Path) -> tuple[int, int]:
    from safetensors import safe_open

    largest = total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                largest, total = max(largest, n * 4), total + n * 4
    return total, largest


if __name__ == "__main__":
    main()
