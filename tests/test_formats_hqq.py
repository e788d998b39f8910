"""HQQ checkpoints as Transformers' HQQ integration saves them (HQQLinear.state_dict per layer),
quantized by hqq itself (the oracle): HQQLinear.dequantize() must equal lowbit's dequantize() bit
for bit in fp32."""

import pytest
import torch

pytest.importorskip("transformers", reason="the checkpoints are Transformers models")
pytest.importorskip("hqq", reason="hqq (the oracle) is not installed")

import _helpers_formats as H  # noqa: E402
import lowbit  # noqa: E402
from lowbit.formats import FormatError, reader_for  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return H.tiny_llama()


@pytest.mark.parametrize(
    "nbits, group_size",
    [(4, 32), (4, 128), (3, 64), (8, 64), (2, 32), (4, 256)],  # 256 > K=128: groups span rows
)
def test_layers_and_logits(model, tmp_path, nbits, group_size):
    dense = H.write_hqq(model, tmp_path, nbits, group_size)
    loaded = H.load_and_check(tmp_path, dense, model)
    assert loaded.model.layers[0].mlp.up_proj.bits == (8 if nbits == 8 else 4)


def test_bf16_compute_dtype(model, tmp_path):
    """Scales and zeros stored in bf16: converted to fp32 exactly; the oracle is hqq's decode
    evaluated in fp32 from those stored values."""
    H.write_hqq(model, tmp_path, 4, 64, compute_dtype=torch.bfloat16)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    loaded = lowbit.from_pretrained(tmp_path, torch_dtype=torch.float32, progress=False)
    name = "model.layers.1.mlp.down_proj"
    Wq = state[name + ".W_q"]
    codes = torch.cat([Wq >> 4, Wq & 15]).float()  # hqq's 4bit_u8: rows half a matrix apart
    W = ((codes - state[name + ".zero"].float()) * state[name + ".scale"].float()).reshape(
        state[name + ".shape"].tolist()
    )
    assert state[name + ".scale"].dtype == torch.bfloat16
    assert torch.equal(loaded.get_submodule(name).dequantize(), W)


def test_view_as_float(model, tmp_path):
    """view_as_float=True stores the packed bytes viewed as the compute dtype."""
    dense = H.write_hqq(model, tmp_path, 4, 64, view_as_float=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.W_q").dtype == torch.float32
    H.load_and_check(tmp_path, dense, model)


def test_axis0_is_refused_not_requantized(model, tmp_path):
    H.write_hqq(model, tmp_path, 4, 32, axis=0)
    with pytest.raises(FormatError, match="axis=1"):
        lowbit.from_pretrained(tmp_path, progress=False)


def test_axis0_layer_tensors_are_refused(model, tmp_path):
    """A layer's own axis tensor is checked too (config and tensors may disagree)."""
    import json

    H.write_hqq(model, tmp_path, 4, 32, axis=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quant_config"]["weight_quant_params"]["axis"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="axis=0 groups run across output rows"):
        lowbit.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize(
    "params, message",
    [({"nbits": 7}, "nbits"), ({"nbits": 4, "axis": 0}, "axis=1")],
)
def test_unsupported_configs(params, message):
    qc = {"quant_method": "hqq", "quant_config": {"weight_quant_params": params}}
    with pytest.raises(FormatError, match=message):
        reader_for(qc)
