"""lowbit.nn's embeddings: bitsandbytes' constructor arguments and forward results (compared with
bitsandbytes' CPU backend where it is installed), state_dict round trips, moves, and
quantize_model(quantize_embeddings=True)."""

import copy

import pytest
import torch
from torch import nn

import _helpers_nn
import lowbit
import lowbit.functional as F
from lowbit import reference

try:
    import bitsandbytes as bnb
except ImportError:  # pragma: no cover - CI installs it
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

QUANTIZED = {
    "int8": lowbit.nn.Embedding8bit,
    "nf4": lowbit.nn.EmbeddingNF4,
    "fp4": lowbit.nn.EmbeddingFP4,
}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _source(num, dim, dtype, device="cpu"):
    src = nn.Embedding(num, dim).to(device)
    # float16 holds these exactly: bitsandbytes' Embedding8bit quantizes through float16, lowbit
    # from the weight's own dtype; on these both see the same numbers.
    src.weight.data = src.weight.data.half().to(dtype)
    return src


def _indices(num, shape=(3, 7), device="cpu"):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, num, shape, generator=g).to(device)


def _expected(kind, src, idx):
    """Lookup into the table as lowbit's quantization decodes it, in the table's dtype."""
    w = src.weight.detach()
    if kind == "int8":
        codes, scb, _ = F.int8_vectorwise_quant(w)
        table = reference.int8_weight_dequant(codes, scb)
    else:
        packed, qs = F.quantize_4bit(w, quant_type=kind, blocksize=64)
        table = reference.decode_4bit(packed, qs.absmax, qs.code, 64, w.shape)
    return nn.functional.embedding(idx, table).to(w.dtype)


# ---- float embeddings -------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["Embedding", "StableEmbedding"])
def test_float_embeddings_match_bitsandbytes(name, dtype):
    # Built in fp32, then only the table cast: bitsandbytes 0.50.2's StableEmbedding passes
    # device/dtype to nn.Embedding one position off (dtype= raises, device= freezes the table),
    # and a cast norm makes its forward raise a mixed-dtype error.
    ours = getattr(lowbit.nn, name)(40, 24, padding_idx=2)
    theirs = getattr(bnb.nn, name)(40, 24, padding_idx=2)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys (StableEmbedding: + norm)
    for m in (ours, theirs):
        m.weight.data = m.weight.data.to(dtype)
    idx = _indices(40)
    torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-6, atol=0)
    assert ours(idx).dtype == theirs(idx).dtype == dtype


def test_float_embeddings_init_like_bitsandbytes():
    torch.manual_seed(0)
    emb = lowbit.nn.Embedding(300, 50, padding_idx=4)
    bound = (6 / (300 + 50)) ** 0.5  # Xavier uniform
    assert emb.weight.abs().max() <= bound and emb.weight.std() > bound / 3
    assert torch.all(emb.weight[4] == 0)
    stable = lowbit.nn.StableEmbedding(300, 50)
    assert isinstance(stable.norm, nn.LayerNorm) and stable.norm.normalized_shape == (50,)
    out = stable(_indices(300))
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)


def test_stable_embedding_gradient_reaches_the_table():
    stable = lowbit.nn.StableEmbedding(20, 8)
    stable(_indices(20)).sum().backward()
    assert stable.weight.grad is not None and stable.norm.weight.grad is not None
    half = copy.deepcopy(stable).to(torch.bfloat16)  # norm cast too: still computed in fp32
    out = half(_indices(20))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, stable.to(torch.bfloat16).float()(_indices(20)).to(out.dtype))


# ---- quantized embeddings ---------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("dim", [64, 128, 37])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantized_embeddings_match_bitsandbytes(kind, dim, dtype):
    # dim 64/128: whole blocks per row (both libraries gather rows); 37: rows straddle blocks.
    src = _source(50, dim, dtype)
    ours = QUANTIZED[kind](50, dim, dtype=dtype)
    theirs = getattr(bnb.nn, QUANTIZED[kind].__name__)(50, dim, dtype=dtype)
    ours.load_state_dict(src.state_dict())
    theirs.load_state_dict(src.state_dict())
    ours, theirs = ours.to("cpu"), theirs.to("cpu")  # bitsandbytes quantizes on the move
    for shape in [(3, 7), (11,), (2, 0)]:
        idx = _indices(50, shape)
        a, b = ours(idx), theirs(idx)
        assert a.shape == b.shape == (*shape, dim) and a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    if kind != "int8":
        assert torch.equal(ours.weight.data, theirs.weight.data)  # the same packed codes
        assert torch.equal(ours.weight.quant_state.absmax, theirs.weight.quant_state.absmax)


@pytest.mark.parametrize("kind", list(QUANTIZED))
@pytest.mark.parametrize("dim", [64, 96, 37, 1])
def test_quantized_embeddings_against_the_reference(device, dtype, kind, dim):
    # dim 96 is a multiple of 32 but not of the 64-blocks: bitsandbytes 0.50.2's CPU
    # dequantize_4bit decodes such shapes with wrong block scales, so lowbit is held to its
    # reference here.
    src = _source(30, dim, dtype, device)
    emb = QUANTIZED[kind](30, dim, dtype=dtype, device=device)
    emb.load_state_dict(src.state_dict())
    idx = _indices(30, device=device)
    out = emb(idx)
    assert emb.is_quantized and out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(out, _expected(kind, src, idx), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_quantized_embeddings_state_dict_round_trip(device, kind):
    src = _source(40, 64, torch.bfloat16, device)
    emb = QUANTIZED[kind](40, 64, dtype=torch.bfloat16, device=device)
    emb.load_state_dict(src.state_dict())
    emb.quantize_()
    idx = _indices(40, device=device)
    expected = emb(idx)
    sd = emb.state_dict()
    if kind == "int8":
        assert sorted(sd) == ["SCB", "weight", "weight_format"]
        assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32
    else:
        assert sorted(sd) == [
            "weight",
            "weight.absmax",
            "weight.quant_map",
            f"weight.quant_state.bitsandbytes__{kind}",
        ]
    # into an empty module on meta (what loaders build), and into a materialised one
    fresh = QUANTIZED[kind](40, 64, dtype=torch.bfloat16, device="meta")
    fresh.load_state_dict(sd, strict=True, assign=True)
    assert fresh.is_quantized and torch.equal(fresh(idx), expected)
    other = QUANTIZED[kind](40, 64, dtype=torch.bfloat16, device=device)
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other(idx), expected)
    # a full save / load through a file, and deepcopy
    assert torch.equal(copy.deepcopy(emb)(idx), expected)


def test_embedding4bit_double_quant_and_storage(device):
    src = _source(32, 128, torch.float32, device)
    emb = lowbit.nn.Embedding4bit(
        32, 128, quant_type="nf4", quant_storage=torch.bfloat16, compress_statistics=True
    ).to(device)
    emb.load_state_dict(src.state_dict())
    idx = _indices(32, device=device)
    out = emb(idx)
    assert emb.weight.dtype == torch.bfloat16 and emb.quant_state.nested
    table = F.dequantize_4bit(emb.weight.data, emb.quant_state)
    torch.testing.assert_close(out, nn.functional.embedding(idx, table), rtol=0, atol=0)
    sd = emb.state_dict()
    assert "weight.nested_absmax" in sd
    back = lowbit.nn.Embedding4bit(32, 128, quant_type="nf4", device="meta")
    back.load_state_dict(sd, strict=True, assign=True)
    assert torch.equal(back(idx), out)


def test_quantized_embedding_moves_and_casts():
    src = _source(16, 64, torch.float32)
    for cls in (lowbit.nn.Embedding8bit, lowbit.nn.EmbeddingNF4):
        emb = cls(16, 64)
        emb.load_state_dict(src.state_dict())
        emb = emb.to("cpu")
        assert emb.is_quantized
        idx = _indices(16)
        out32 = emb(idx)
        codes = emb.weight.data.clone()
        emb = emb.to(torch.bfloat16)  # the output dtype changes, never the codes
        assert torch.equal(emb.weight.data, codes)
        out16 = emb(idx)
        assert out16.dtype == torch.bfloat16 and torch.equal(out16, out32.to(torch.bfloat16))


def test_quantized_embeddings_load_a_float_state_dict_and_refuse_the_wrong_format():
    src = _source(16, 64, torch.float32)
    emb8 = lowbit.nn.Embedding8bit(16, 64)
    emb8.load_state_dict(src.state_dict(), strict=True)
    emb4 = lowbit.nn.EmbeddingNF4(16, 64)
    emb4.load_state_dict(src.state_dict(), strict=True)
    emb8.quantize_()
    emb4.quantize_()
    with pytest.raises(RuntimeError, match="4-bit"):
        lowbit.nn.Embedding8bit(16, 64).load_state_dict(emb4.state_dict())
    with pytest.raises(RuntimeError, match="8-bit"):
        lowbit.nn.EmbeddingNF4(16, 64).load_state_dict(emb8.state_dict())
    with pytest.raises(RuntimeError, match="shape"):
        lowbit.nn.EmbeddingNF4(16, 32).load_state_dict(emb4.state_dict())


def test_quantized_embeddings_bad_input():
    emb = lowbit.nn.EmbeddingNF4(16, 64)
    with pytest.raises(TypeError, match="input must hold int64 or int32 indices"):
        emb(torch.zeros(3))
    with pytest.raises(TypeError, match="input must be a tensor of indices"):
        lowbit.nn.Embedding8bit(16, 64)([1, 2])
    with pytest.raises(IndexError):
        emb(torch.tensor([16]))
    with pytest.raises(ValueError, match="quant_type must be one of"):
        lowbit.nn.Embedding4bit(16, 64, quant_type="nf5")
    with pytest.raises(TypeError, match="quant_storage must be one of"):
        lowbit.nn.Embedding4bit(16, 64, quant_storage=torch.complex64)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        lowbit.nn.Embedding4bit(16, 64, blocksize=48)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        lowbit.nn.Embedding4bit(16, 64, blocksize=64.0)


# ---- quantize_model(quantize_embeddings=True) -------------------------------------------------

CONFIGS = {
    "nf4": lowbit.LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "int8": lowbit.LowbitConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_model_embeddings_opt_in(name):
    pytest.importorskip("transformers")
    config = CONFIGS[name]
    ids = _helpers_nn.tokens(256)
    model = _helpers_nn.tiny_llama(tie=False, vocab_size=256)
    with torch.no_grad():
        float_logits = model(ids).logits
    default = lowbit.quantize_model(copy.deepcopy(model), config)
    assert type(default.model.embed_tokens) is nn.Embedding  # off by default, as Transformers
    q = lowbit.quantize_model(model, config, quantize_embeddings=True)
    emb = q.model.embed_tokens
    assert isinstance(emb, lowbit.nn.Embedding4bit if name == "nf4" else lowbit.nn.Embedding8bit)
    assert emb.is_quantized and type(q.lm_head) is nn.Linear
    with torch.no_grad():
        logits = q(ids).logits
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), float_logits.flatten(), dim=0)
    assert cos > (0.98 if name == "nf4" else 0.999)
    # the whole model's state dict round-trips, strict, into a model quantized the same way
    other = lowbit.quantize_model(
        _helpers_nn.tiny_llama(tie=False, vocab_size=256, seed=7), config, quantize_embeddings=True
    )
    other.load_state_dict(q.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, logits)


def test_quantize_model_keeps_tied_and_skipped_embeddings_float():
    pytest.importorskip("transformers")
    tied = lowbit.quantize_model(
        _helpers_nn.tiny_llama(tie=True), CONFIGS["nf4"], quantize_embeddings=True
    )
    assert type(tied.model.embed_tokens) is nn.Embedding  # its weight is lm_head's too
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    skipped = lowbit.quantize_model(
        _helpers_nn.tiny_llama(tie=False),
        CONFIGS["int8"],
        skip_modules=["embed_tokens"],
        quantize_embeddings=True,
    )
    assert type(skipped.model.embed_tokens) is nn.Embedding
    with pytest.raises(TypeError, match="quantize_embeddings must be a bool"):
        lowbit.quantize_model(_helpers_nn.tiny_llama(), CONFIGS["nf4"], quantize_embeddings="yes")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantized_embeddings_through_save_and_from_pretrained(name, tmp_path):
    pytest.importorskip("transformers")
    config = CONFIGS[name]
    ids = _helpers_nn.tokens(256)
    model = _helpers_nn.tiny_llama(tie=False, vocab_size=256)
    model.save_pretrained(tmp_path / "float")
    q = lowbit.quantize_model(model, config, quantize_embeddings=True)
    with torch.no_grad():
        expected = q(ids).logits
    lowbit.save_pretrained(q, tmp_path / "q")
    kinds = (lowbit.nn.Embedding4bit, lowbit.nn.Embedding8bit)
    # a checkpoint holding quantized embeddings loads them quantized, as stored
    back = lowbit.from_pretrained(tmp_path / "q")
    assert isinstance(back.model.embed_tokens, kinds) and back.model.embed_tokens.is_quantized
    # a float checkpoint quantizes them on load when asked, to the same codes as quantize_model
    fresh = lowbit.from_pretrained(
        tmp_path / "float", quantization_config=config, quantize_embeddings=True
    )
    assert isinstance(fresh.model.embed_tokens, kinds)
    plain = lowbit.from_pretrained(tmp_path / "float", quantization_config=config)
    assert type(plain.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected)
        assert torch.equal(fresh(ids).logits, expected)
    # a quantized checkpoint with float embeddings quantizes them on load when asked (the flag
    # used to be ignored there: the tables stayed float)
    linear_only = lowbit.quantize_model(_helpers_nn.tiny_llama(tie=False, vocab_size=256), config)
    assert type(linear_only.model.embed_tokens) is nn.Embedding
    lowbit.save_pretrained(linear_only, tmp_path / "linear_only")
    later = lowbit.from_pretrained(tmp_path / "linear_only", quantize_embeddings=True)
    assert isinstance(later.model.embed_tokens, kinds) and later.model.embed_tokens.is_quantized
    with torch.no_grad():
        assert torch.equal(later(ids).logits, expected)
    with pytest.raises(TypeError, match="quantize_embeddings must be a bool"):
        lowbit.from_pretrained(tmp_path / "float", load_in_4bit=True, quantize_embeddings=1)


def test_float_embeddings_keep_32bit_optimizer_states():
    # As bitsandbytes: lowbit.nn.Embedding / StableEmbedding register a 32-bit override with the
    # optimizer manager, so an 8-bit optimizer keeps their states in fp32 and others in uint8.
    import gc
    import weakref

    import lowbit.optim

    for cls in (lowbit.nn.Embedding, lowbit.nn.StableEmbedding):
        emb = cls(300, 64)
        plain = torch.nn.Embedding(300, 64)
        opt = lowbit.optim.Adam8bit(
            list(emb.parameters()) + list(plain.parameters()), min_8bit_size=1
        )
        (emb(torch.tensor([1, 2])).sum() + plain(torch.tensor([1, 2])).sum()).backward()
        opt.step()
        assert opt.state[emb.weight]["state1"].dtype == torch.float32
        assert opt.state[plain.weight]["state1"].dtype == torch.uint8
        # The manager holds the module weakly: a deleted embedding is freed.
        ref = weakref.ref(emb)
        del emb, opt
        gc.collect()
        assert ref() is None
