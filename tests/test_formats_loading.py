"""Loading other formats: no format library needed, and bad or truncated checkpoints fail with an
error that names the tensor or field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers", reason="the checkpoints are Transformers models")

import _helpers_formats as H  # noqa: E402
import lowbit  # noqa: E402

BLOCKED = ("compressed_tensors", "hqq", "gptqmodel", "auto_gptq", "awq", "optimum")

# Runs in a fresh interpreter where the BLOCKED packages look uninstalled (the path finder does not
# see them, so `import hqq` raises ModuleNotFoundError and Transformers' availability checks say no);
# loads each checkpoint and checks its logits against the saved expectation.
_CHILD = r"""
import importlib, importlib.machinery, json, sys
BLOCKED = %r
class Hidden(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
for name in BLOCKED:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} still importable")
import torch, lowbit
out = {}
for d in sys.argv[1:]:
    model = lowbit.from_pretrained(d, torch_dtype=torch.float32, progress=False)
    ids = torch.load(d + "/ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
    want = torch.load(d + "/want.pt")
    out[d] = ((logits - want).norm() / want.norm()).item()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"rel": out, "imported": loaded}))
"""


def _writers():
    yield "gptq", lambda m, p: H.write_gptq(m, p, 4, 32, False, True)
    yield "awq", lambda m, p: H.write_awq(m, p, 32)
    try:
        import compressed_tensors  # noqa: F401

        yield "compressed-tensors", lambda m, p: H.write_compressed_tensors(m, p)
    except ImportError:
        pass
    try:
        import hqq  # noqa: F401

        yield "hqq", lambda m, p: H.write_hqq(m, p, 4, 64)
    except ImportError:
        pass


def test_loads_without_any_format_library(tmp_path):
    model = H.tiny_llama()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    dirs = []
    for name, write in _writers():
        d = tmp_path / name
        dense = write(model, d)
        with torch.no_grad():
            want = H.dense_model(model, dense)(ids).logits
        torch.save(ids, d / "ids.pt")
        torch.save(want, d / "want.pt")
        dirs.append(str(d))
    # fp32 activations in the child: the logits must then match to fp32 summation order.
    env = dict(os.environ, LOWBIT_CPU_GEMV="fp32")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD % (BLOCKED,), *dirs],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert set(result["rel"]) == set(dirs)
    for d, rel in result["rel"].items():
        assert rel < 1e-5, (d, rel)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptq")
    H.write_gptq(H.tiny_llama(), d, 4, 32, False, True)
    return d


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint with its tensors passed through edit(dict) -> dict."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = edit(load_file(src / "model.safetensors"))
    save_file(state, str(dst / "model.safetensors"))
    return dst


Q = "model.layers.1.self_attn.q_proj."


def _drop(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _set(key, fn):
    return lambda s: {**s, key: fn(s[key])}


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop(Q + "qzeros"), f"incomplete gptq weight, missing {Q}qzeros"),
        (_set(Q + "qweight", lambda t: t.float()), f"{Q}qweight: dtype must be int32"),
        (
            _set(Q + "scales", lambda t: t[:-1].contiguous()),
            rf"{Q}scales: shape must be \[4, 128\]",
        ),
        (_set(Q + "g_idx", lambda t: t + 4), f"{Q}g_idx: values must lie in"),
        (_set(Q + "g_idx", lambda t: t[:-1].contiguous()), f"{Q}g_idx: shape must be"),
        (_set(Q + "scales", lambda t: t.clone().fill_(float("nan"))), f"{Q}scales: holds NaN"),
        (
            lambda s: {**s, "model.layers.9.mlp.up_proj.qweight": s[Q + "qweight"].clone()},
            "model.layers.9.mlp.up_proj: the checkpoint holds gptq weights",
        ),
    ],
)
def test_bad_tensors_are_named(gptq_dir, tmp_path, edit, message):
    d = _edited(gptq_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        lowbit.from_pretrained(d, progress=False)


def test_truncated_file(gptq_dir, tmp_path):
    d = tmp_path / "cut"
    d.mkdir()
    (d / "config.json").write_text((gptq_dir / "config.json").read_text())
    data = (gptq_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        lowbit.from_pretrained(d, progress=False)


def test_pickle_is_never_read(gptq_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((gptq_dir / "config.json").read_text())
    torch.save(load_file(gptq_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        lowbit.from_pretrained(d, progress=False)


def test_config_without_quantized_tensors(gptq_dir, tmp_path):
    d = _edited(
        gptq_dir, tmp_path / "none", lambda s: {k: v for k, v in s.items() if "proj" not in k}
    )
    with pytest.raises(ValueError, match="no tensor of the checkpoint is in that format"):
        lowbit.from_pretrained(d, progress=False)


def test_already_quantized_cannot_be_requantized(gptq_dir):
    with pytest.raises(ValueError, match=r"already quantized \(gptq\)"):
        lowbit.from_pretrained(gptq_dir, load_in_4bit=True, progress=False)
    # quantize_embeddings used to be ignored silently here (the embeddings stayed float)
    with pytest.raises(ValueError, match=r"already quantized \(gptq\).*quantize_embeddings"):
        lowbit.from_pretrained(gptq_dir, quantize_embeddings=True, progress=False)


def test_unknown_method_names_the_supported_ones(gptq_dir, tmp_path):
    d = _edited(gptq_dir, tmp_path / "x", lambda s: s)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "exl2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="compressed-tensors"):
        lowbit.from_pretrained(d, progress=False)


def test_loaded_model_flags_and_memory(gptq_dir):
    from lowbit.loading.affine import affine_weight_bytes

    model = lowbit.from_pretrained(gptq_dir, progress=False)
    assert model.quantization_method == "gptq" and model.is_loaded_in_4bit
    kept, bf16 = affine_weight_bytes(model)
    # 4-bit codes, fp32 scale + zero per group of 32, and the act-order perm (int64 per input)
    layers = [m for m in model.modules() if isinstance(m, lowbit.nn.LinearAffine)]
    assert kept == sum(
        m.out_features * m.in_features * (0.5 + 8 / 32) + 8 * m.in_features for m in layers
    )
    assert bf16 == sum(2 * m.out_features * m.in_features for m in layers)


def test_save_pretrained_refuses_affine_models(gptq_dir, tmp_path):
    model = lowbit.from_pretrained(gptq_dir, progress=False)
    with pytest.raises(ValueError, match="LinearAffine layers loaded from a gptq checkpoint"):
        lowbit.save_pretrained(model, tmp_path / "out")
    # Transformers' own save_pretrained wrote packed/scales/zeros under a config without
    # quantization_config: a directory that reloaded as a float model with random linear weights.
    with pytest.raises(ValueError, match="LinearAffine layers loaded from a gptq checkpoint"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors", "hqq"])
def test_odd_shapes(tmp_path, fmt):
    """hidden 96 / intermediate 160: group size 64 leaves a partial last group (GPTQ/AWQ), so the
    layer uses groups of gcd(64, K) = 32 holding the source scales; HQQ groups of 64 span rows."""
    model = H.tiny_llama(hidden=96, inter=160)
    if fmt == "gptq":
        dense = H.write_gptq(model, tmp_path, 4, 64, False, True)
    elif fmt == "awq":
        dense = H.write_awq(model, tmp_path, 64)
    elif fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
        dense = H.write_compressed_tensors(model, tmp_path, 4, "group", 32, False)
    else:
        pytest.importorskip("hqq", reason="hqq is not installed")
        dense = H.write_hqq(model, tmp_path, 4, 64)
    loaded = H.load_and_check(tmp_path, dense, model)
    if fmt in ("gptq", "awq"):
        assert loaded.model.layers[0].self_attn.q_proj.group_size == 32
