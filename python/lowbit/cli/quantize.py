"""`lowbit quantize SRC DST`: write a quantized copy of a Transformers checkpoint directory.

Loading streams SRC through lowbit.from_pretrained (each weight quantized as it is read) and
lowbit.save_pretrained writes DST, so DST loads with lowbit.from_pretrained and with Transformers
once lowbit is imported. Everything else in SRC (tokenizer, generation config, sentence-
transformers modules) is copied, so DST is a drop-in replacement for SRC.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lowbit.cli import _model
from lowbit.cli.errors import CliError

# Weight files and the model config are written by save_pretrained; never copy stale ones.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _config_from_args(args):
    from lowbit.config import LowbitConfig

    skip = [s.strip() for s in args.skip.split(",") if s.strip()] or None
    if args.threshold < 0:
        raise CliError(f"--threshold must be >= 0, got {args.threshold}")
    if args.bits == 8:
        return LowbitConfig(
            load_in_8bit=True, llm_int8_threshold=args.threshold, llm_int8_skip_modules=skip
        )
    return LowbitConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=args.compute_dtype,
        llm_int8_skip_modules=skip,
    )


def _copy_extras(src: Path, dst: Path) -> list[str]:
    copied = []
    for item in sorted(src.iterdir()):
        if item.name == "config.json" or item.name in _WEIGHT_INDEXES:
            continue
        if item.is_file() and item.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if item.name.startswith("."):
            continue  # .git, .cache, .gitattributes: repository plumbing, not model files
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)
        copied.append(item.name)
    return copied


def run(args) -> int:
    src = _model.checkpoint_dir(args.src, "SRC")
    if not (src / "config.json").is_file():
        raise CliError(f"SRC has no config.json (expected a Transformers model directory): {src}")
    dst = Path(args.dst)
    if dst.resolve() == src.resolve():
        raise CliError("DST must differ from SRC")
    if dst.exists() and not dst.is_dir():
        raise CliError(f"DST exists and is not a directory: {dst}")
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise CliError(f"DST is not empty: {dst} (pass --force to write into it)")
    config = _config_from_args(args)

    _model.quiet_transformers()
    import lowbit

    start = time.perf_counter()
    try:
        model = lowbit.from_pretrained(src, quantization_config=config)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"cannot load {src}: {e}") from None
    loaded = time.perf_counter() - start
    dst.mkdir(parents=True, exist_ok=True)
    lowbit.save_pretrained(model, dst)
    copied = _copy_extras(src, dst)

    layers = _model.linear_modules(model)
    quantized = sum(1 for _, m in layers if _model.is_quantized_linear(m))
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    dst_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(
        f"quantized {quantized} of {len(layers)} linear layers to {config.quantization_method()} "
        f"in {loaded:.1f} s"
    )
    print(f"weights: {src_bytes / 2**20:.2f} MB -> {dst_bytes / 2**20:.2f} MB")
    if copied:
        print(f"copied from SRC: {', '.join(copied)}")
    print(f"wrote {dst}")
    return 0
