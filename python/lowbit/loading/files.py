"""Find and stream the tensors of a checkpoint directory (safetensors; pickle only on request)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.config import FORMAT_VERSION

logger = logging.getLogger("lowbit")

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
METADATA = {"format": "pt", "lowbit_format_version": str(FORMAT_VERSION)}


def checkpoint_files(path: Path, allow_pickle: bool) -> list[Path]:
    if (path / SAFE_INDEX).is_file():
        index = json.loads((path / SAFE_INDEX).read_text())
        return [path / f for f in dict.fromkeys(index["weight_map"].values())]
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    has_bin = (path / BIN_INDEX).is_file() or (path / BIN_SINGLE).is_file()
    if has_bin and not allow_pickle:
        raise FileNotFoundError(
            f"{path} holds only pickled weights ({BIN_SINGLE}); lowbit reads safetensors by "
            "default. Pass allow_pickle=True to read them with torch.load(weights_only=True)."
        )
    if (path / BIN_INDEX).is_file():
        index = json.loads((path / BIN_INDEX).read_text())
        return [path / f for f in dict.fromkeys(index["weight_map"].values())]
    if (path / BIN_SINGLE).is_file():
        return [path / BIN_SINGLE]
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path}")


def iter_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".bin":
        # mmap keeps the pickle's tensors on disk until touched; weights_only refuses code.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        for key in list(state):
            yield key, state.pop(key)
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        # One open per tensor: safe_open memory-maps the whole file and every page read stays
        # resident until the file is closed, so a long-lived handle would grow to the shard size.
        with safe_open(str(file), framework="pt") as f:
            t = f.get_tensor(key)
        yield key, t
        del t


def count_tensors(files: list[Path]) -> int | None:
    from safetensors import safe_open

    n = 0
    for file in files:
        if file.suffix == ".bin":
            return None
        with safe_open(str(file), framework="pt") as f:
            n += len(list(f.keys()))
    return n
