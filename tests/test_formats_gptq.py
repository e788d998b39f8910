"""GPTQ and AWQ checkpoints: GPTQModel/AutoGPTQ and AutoAWQ do not install on this CPU-only machine,
so the checkpoints are packed by tests/_helpers_formats.py from the published layouts (AutoGPTQ
qlinear_cuda.py, GPTQModel qlinear/__init__.py + utils/model.py, AutoAWQ gemm.py +
packing_utils.py); the oracle is each format's published dequantization formula."""

import pytest
import torch

pytest.importorskip("transformers", reason="the checkpoints are Transformers models")

import _helpers_formats as H  # noqa: E402
from lowbit.formats import FormatError, reader_for  # noqa: E402
from lowbit.formats.gptq import decode_zero_words  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return H.tiny_llama()


@pytest.mark.parametrize(
    "bits, group_size, sym, act_order, v1",
    [
        (4, 32, False, False, True),
        (4, 32, True, False, True),
        (4, 64, False, True, True),  # desc_act: g_idx a permuted group map -> layer perm
        (4, -1, False, False, True),  # per channel
        (4, 48, False, False, True),  # groups that do not divide K=128/256 (last one partial)
        (8, 32, False, False, True),
        (8, 64, True, True, True),
        (4, 32, False, True, False),  # gptq_v2: zeros stored as they are
    ],
)
def test_gptq_layers_and_logits(model, tmp_path, bits, group_size, sym, act_order, v1):
    dense = H.write_gptq(model, tmp_path, bits, group_size, sym, act_order, v1)
    loaded = H.load_and_check(tmp_path, dense, model)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert (layer.perm is not None) == act_order
    assert layer.bits == bits


def test_gptq_v1_zero_borrow():
    """v1 stores zero - 1 word-wise: a zero of 0 borrows from the next nibble (GPTQModel's
    v2 -> v1 conversion subtracts 0x11111111 from the whole word); decoding adds it back."""
    zeros = torch.tensor([[0, 5, 0, 15, 1, 0, 7, 8]])
    v2 = H.pack_words(zeros, 4, dim=1)
    v1 = H.gptq_tensors(
        torch.zeros(8, 8, dtype=torch.long),
        torch.ones(1, 8).half(),
        zeros,
        torch.zeros(8, dtype=torch.int32),
        4,
    )["qzeros"]
    assert not torch.equal(v1, v2)
    assert torch.equal(decode_zero_words(v1, 4, v1=True), v2)
    sym = torch.full((1, 1), 0x77777777, dtype=torch.int32)  # every zero 8, stored as 7
    assert decode_zero_words(sym, 4, v1=True).item() == 0x88888888 - 2**32


def test_awq_layers_and_logits(model, tmp_path):
    dense = H.write_awq(model, tmp_path, group_size=32)
    H.load_and_check(tmp_path, dense, model)


def test_awq_nibble_order():
    """Word j, nibble f holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][f] (AutoAWQ's interleave)."""
    from lowbit.formats.awq import unpack_awq

    cols = torch.arange(16).remainder(16).view(1, 16)
    word = H.awq_pack(cols)
    nibbles = [(word[0, 0].item() >> (4 * f)) & 15 for f in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(unpack_awq(word, 16), cols.to(torch.uint8))


@pytest.mark.parametrize(
    "qconfig, message",
    [
        ({"quant_method": "gptq", "bits": 3}, "bits [4, 8]"),
        ({"quant_method": "gptq", "bits": 2}, "bits [4, 8]"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'gptq', 'gptq_v2'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "versions ['gemm']"),
        ({"quant_method": "awq", "bits": 8}, "4-bit AWQ only"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point"),
    ],
)
def test_unsupported_variants_name_what_is_supported(qconfig, message):
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        reader_for(qconfig)
