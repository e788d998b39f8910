"""Hostile and damaged checkpoints: lowbit never trusts a file it did not write. Every failure is
a clear exception, and the files on disk are never modified by a failed (or successful) load."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from _helpers_nn import tiny_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved_nf4(tmp_path_factory):
    path = tmp_path_factory.mktemp("nf4")
    model = lowbit.quantize_model(
        tiny_llama(),
        lowbit.LowbitConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
    )
    lowbit.save_pretrained(model, path)
    return path


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _digests(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def _rewrite(path, change):
    """Apply change(tensors) to model.safetensors, keeping the file's metadata."""
    from safetensors import safe_open

    f = path / "model.safetensors"
    with safe_open(f, "pt") as h:
        metadata = h.metadata()
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata=metadata)


def _state_key(tensors):
    return next(k for k in tensors if k.endswith("quant_state.bitsandbytes__nf4"))


def _set_json(tensors, **fields):
    key = _state_key(tensors)
    d = json.loads(bytes(tensors[key].tolist()).decode())
    d.update(fields)
    tensors[key] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)


CORRUPTIONS = {
    "dtype name not in the whitelist": (
        lambda t: _set_json(t, dtype="__import__('os').system"),
        "dtype must be one of",
    ),
    "blocksize outside the allowed set": (
        lambda t: _set_json(t, blocksize=48),
        "blocksize must be one of",
    ),
    "negative shape": (lambda t: _set_json(t, shape=[-4, 16]), "shape entries must be positive"),
    "int64-overflowing shape": (
        lambda t: _set_json(t, shape=[2**40, 2**40]),
        "too many elements|must hold",
    ),
    "absmax length": (
        lambda t: t.__setitem__(
            next(k for k in t if k.endswith(".weight.absmax")), torch.zeros(3, dtype=torch.uint8)
        ),
        "absmax must hold",
    ),
    "quant_map length": (
        lambda t: t.__setitem__(
            next(k for k in t if k.endswith(".weight.quant_map")), torch.zeros(15)
        ),
        "quant_map must hold 16",
    ),
    "nested quant_map dtype": (
        lambda t: t.__setitem__(
            next(k for k in t if k.endswith("nested_quant_map")),
            torch.zeros(256, dtype=torch.float16),
        ),
        "nested_quant_map must be torch.float32",
    ),
    "JSON not UTF-8": (
        lambda t: t.__setitem__(_state_key(t), torch.tensor([0xFF, 0xFE, 0x7B], dtype=torch.uint8)),
        "not valid UTF-8 JSON",
    ),
    "JSON too large": (
        lambda t: t.__setitem__(_state_key(t), torch.full((70000,), 32, dtype=torch.uint8)),
        "exceeds",
    ),
    "JSON not an object": (
        lambda t: t.__setitem__(_state_key(t), torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
        "JSON object",
    ),
    "unknown quant-state key": (lambda t: _set_json(t, evil=1), "unknown keys"),
    "missing aux key": (
        lambda t: t.pop(next(k for k in t if k.endswith(".weight.absmax"))),
        "absmax",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_quant_state_is_refused_and_files_stay_untouched(saved_nf4, tmp_path, name):
    change, message = CORRUPTIONS[name]
    path = _copy_dir(saved_nf4, tmp_path / "ckpt")
    _rewrite(path, change)
    before = _digests(path)
    with pytest.raises((ValueError, KeyError, RuntimeError), match=message):
        lowbit.from_pretrained(path)
    assert _digests(path) == before


def test_truncated_shard_is_a_clear_error(saved_nf4, tmp_path):
    path = _copy_dir(saved_nf4, tmp_path / "ckpt")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    before = _digests(path)
    with pytest.raises(Exception, match="(?i)safetensor|truncat|incomplete|invalid|size") as info:
        lowbit.from_pretrained(path)
    assert not isinstance(info.value, (SystemError, MemoryError))
    assert _digests(path) == before


def test_unknown_format_version_names_the_supported_one(saved_nf4, tmp_path):
    path = _copy_dir(saved_nf4, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"format_version 7.*format_version 1"):
        lowbit.from_pretrained(path)


def test_successful_load_leaves_files_untouched(saved_nf4):
    before = _digests(saved_nf4)
    model = lowbit.from_pretrained(saved_nf4)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert _digests(saved_nf4) == before
