"""compressed-tensors checkpoints, written by compressed-tensors itself (the oracle): its
compressor's own decompress() of the saved tensors must equal lowbit's dequantize() bit for bit."""

import pytest
import torch

pytest.importorskip("transformers", reason="the checkpoints are Transformers models")
pytest.importorskip("compressed_tensors", reason="compressed-tensors (the oracle) is not installed")

import _helpers_formats as H  # noqa: E402
from lowbit.formats import FormatError, reader_for  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return H.tiny_llama()


@pytest.mark.parametrize(
    "num_bits, strategy, group_size, symmetric, fmt",
    [
        (4, "group", 32, False, "pack-quantized"),
        (4, "group", 128, True, "pack-quantized"),
        (4, "channel", None, False, "pack-quantized"),
        (8, "group", 64, False, "pack-quantized"),
        (8, "channel", None, True, "pack-quantized"),
        (4, "tensor", None, True, "pack-quantized"),
        (8, "channel", None, True, "int-quantized"),  # W8A8: weights read, activations ignored
        (8, "group", 64, False, "int-quantized"),
    ],
)
def test_layers_and_logits(model, tmp_path, num_bits, strategy, group_size, symmetric, fmt):
    dense = H.write_compressed_tensors(
        model, tmp_path, num_bits, strategy, group_size, symmetric, fmt
    )
    loaded = H.load_and_check(tmp_path, dense, model)
    assert loaded.model.layers[0].mlp.up_proj.bits == num_bits


def _config(**weights):
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    w.update(weights)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}},
    }


@pytest.mark.parametrize(
    "qconfig, message",
    [
        (_config(num_bits=3), r"num_bits \[4, 8\]"),
        (_config(type="float", num_bits=8), "type 'int'"),
        (_config(strategy="token"), "strategies"),
        (_config(dynamic=True), "static"),
        ({**_config(), "format": "float-quantized"}, "formats"),
        ({**_config(), "format": "int-quantized"}, r"num_bits \[8\]"),
        ({**_config(), "quantization_status": "frozen"}, "compressed"),
        ({**_config(), "config_groups": {}}, "config_groups"),
    ],
)
def test_unsupported_variants(qconfig, message):
    with pytest.raises(FormatError, match=message):
        reader_for(qconfig)


def test_group_actorder_g_idx():
    """Older llm-compressor "group" act-order checkpoints add weight_g_idx (column -> group, not
    monotonic): the layer gathers its inputs in group order, exactly as GPTQ's g_idx."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from lowbit.nn import LinearAffine

    N, K, g = 16, 64, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    zp = torch.randint(-8, 8, (N, K // g), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, K // g, generator=gen) + 0.1
    g_idx = (torch.arange(K) // g)[torch.randperm(K, generator=gen)].to(torch.int32)
    stash = {
        "weight_packed": pack_to_int32(q, 4),
        "weight_scale": scale,
        "weight_zero_point": pack_to_int32(zp, 4, packed_dim=0),
        "weight_shape": torch.tensor([N, K]),
        "weight_g_idx": g_idx,
    }
    reader = reader_for(_config(symmetric=False, group_size=g))
    w = reader.convert("layer", stash, K, N)
    assert w.perm is not None and w.group_size == g
    layer = LinearAffine(K, N, bias=False, group_size=g)
    layer.set_weight(w.packed, w.scales, w.zeros, w.bits, w.group_size, w.perm)
    gi = g_idx.long()
    want = (q.float() - zp.float()[:, gi]) * scale[:, gi]
    assert torch.equal(layer.dequantize(), want)
