"""Tiny checkpoints in other libraries' formats, for tests/test_formats_*.py.

Each writer takes a float Transformers model, quantizes its linear layers (not lm_head) into one
format's tensors, and writes a Transformers directory (config.json with quantization_config +
model.safetensors), returning {module name: the format's own dequantized weight, fp32 [N, K]}.

compressed-tensors and HQQ quantize with their own libraries (the oracles). GPTQModel/AutoGPTQ and
AutoAWQ do not install on this CPU-only machine, so their packing is written here from the
published layouts (sources named at each writer; ../shared/formats-affine.md summarises them) and
their dequantization is their published formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def tiny_llama(seed: int = 0, hidden: int = 128, inter: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    return model


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def _write(model, path: Path, tensors: dict, qconfig: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def _float_tensors(model, quantized: list[str]) -> dict:
    skip = tuple(n + "." for n in quantized)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(skip)}


def dense_model(model, dense: dict[str, torch.Tensor]):
    """A float copy of `model` whose quantized layers hold the given dense weights."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, W in dense.items():
            ref.get_submodule(name).weight.copy_(W)
    return ref


# ---- GPTQ ------------------------------------------------------------------------------------
# Layout: AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda.py (pack/forward) and GPTQModel
# gptqmodel/nn_modules/qlinear/__init__.py + gptqmodel/utils/model.py (v1 <-> v2 zero conversion:
# v1 = v2 - 0x11111111 word-wise). qweight [K*bits/32, N] packs inputs, qzeros [G, N*bits/32]
# packs outputs, element e of a word at bit bits*e; scales fp16 [G, N]; g_idx [K].


def pack_words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ints [R, C] -> int32 words packing 32/bits consecutive entries along `dim`, entry
    e of a word at bit bits*e (lowest first)."""
    per = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    R, C = v.shape
    pad = (-C) % per
    v = torch.nn.functional.pad(v, (0, pad)).view(R, -1, per)
    words = (v << (torch.arange(per) * bits)).sum(-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def gptq_quantize(W, bits, group_size, sym, act_order, seed=0, zero_groups=True):
    """Round-to-nearest GPTQ-style quantization (the packing is what matters here, not the
    Hessian update): (q [N, K], scales fp16 [G, N], zeros [G, N], g_idx [K])."""
    N, K = W.shape
    g = K if group_size == -1 else group_size
    G = math.ceil(K / g)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // g).to(torch.int32)  # act-order: groups follow `order`
    qmax = 2**bits - 1
    W = W.clone()
    if zero_groups:
        W[:, g_idx == 0] = W[:, g_idx == 0].abs()  # min >= 0: zero point 0 (v1's borrow trap)
    q = torch.empty(N, K, dtype=torch.int64)
    scales = torch.empty(G, N)
    zeros = torch.empty(G, N, dtype=torch.int64)
    for gi in range(G):
        cols = g_idx == gi
        w = W[:, cols]
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(hi, -lo)
            s = (2 * hi / qmax).clamp(min=1e-8)
            z = torch.full((N,), (qmax + 1) // 2)
        else:
            s = ((hi - lo) / qmax).clamp(min=1e-8)
            z = torch.round(-lo / s).clamp(0, qmax).long()
        s = s.half().float()
        q[:, cols] = (torch.round(w / s[:, None]) + z[:, None]).clamp(0, qmax).long()
        scales[gi], zeros[gi] = s, z
    return q, scales.half(), zeros, g_idx


def gptq_tensors(q, scales, zeros, g_idx, bits, v1=True) -> dict:
    words = pack_words(zeros, bits, dim=1)
    if v1:  # v1 stores zero - 1, subtracted from the whole word (a 0 zero borrows)
        inc = sum(1 << (bits * e) for e in range(32 // bits))
        w = (words.to(torch.int64) - inc) % 2**32
        words = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return {
        "qweight": pack_words(q.t(), bits, dim=0),
        "qzeros": words,
        "scales": scales,
        "g_idx": g_idx,
    }


def gptq_dequant(q, scales, zeros, g_idx) -> torch.Tensor:
    """GPTQ's formula, fp32: W[o, i] = scales[g_idx[i], o] * (q[o, i] - zero[g_idx[i], o])."""
    gi = g_idx.long()
    return scales.float()[gi].t() * (q.float() - zeros.float()[gi].t())


def write_gptq(
    model, path, bits=4, group_size=32, sym=False, act_order=False, v1=True, zero_groups=True
):
    names = linear_names(model)
    tensors, dense = _float_tensors(model, names), {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        q, s, z, g_idx = gptq_quantize(
            lin.weight.detach(), bits, group_size, sym, act_order, i, zero_groups
        )
        for k, v in gptq_tensors(q, s, z, g_idx, bits, v1).items():
            tensors[f"{name}.{k}"] = v
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().half()
        dense[name] = gptq_dequant(q, s, z, g_idx)
    qconfig = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
    }
    _write(model, Path(path), tensors, qconfig)
    return dense


# ---- AWQ (GEMM) ------------------------------------------------------------------------------
# Layout: AutoAWQ awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear) and
# awq/utils/packing_utils.py: qweight [K, N/8] and qzeros [K/g, N/8] pack 8 OUTPUT columns per
# word, nibble f holding column 8j + [0, 2, 4, 6, 1, 3, 5, 7][f]; scales fp16 [K/g, N].

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit [R, N] -> int32 [R, N/8] in AWQ's interleaved order."""
    R, N = values.shape
    v = values.view(R, N // 8, 8)[:, :, AWQ_ORDER]  # nibble f <- column 8j + AWQ_ORDER[f]
    return pack_words(v.reshape(R, N), 4, dim=1)


def write_awq(model, path, group_size=32):
    names = linear_names(model)
    tensors, dense = _float_tensors(model, names), {}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        q, s, z, g_idx = gptq_quantize(lin.weight.detach(), 4, group_size, False, False, i)
        tensors[f"{name}.qweight"] = awq_pack(q.t().contiguous())  # [K, N/8]
        tensors[f"{name}.qzeros"] = awq_pack(z)  # [G, N/8]
        tensors[f"{name}.scales"] = s
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().half()
        # AWQ's dequant: (q - z) * s per group of group_size inputs, transposed to [N, K].
        gi = torch.arange(q.shape[1]) // group_size
        dense[name] = (q.float() - z.float()[gi].t()) * s.float()[gi].t()
    qconfig = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    _write(model, Path(path), tensors, qconfig)
    return dense


# ---- compressed-tensors (the library itself) --------------------------------------------------


def write_compressed_tensors(
    model, path, num_bits=4, strategy="group", group_size=32, symmetric=False, fmt="pack-quantized"
):
    """Quantize with compressed-tensors' own API (apply_quantization_config, calculate_qparams,
    ModelCompressor.compress_model) and save what it produces; the oracle is the compressor's own
    decompress() of the saved tensors."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = copy.deepcopy(model)
    kw = {"group_size": group_size} if strategy == "group" else {}
    args = QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=symmetric, strategy=strategy, **kw
    )
    inputs = None
    if fmt == "int-quantized":  # W8A8 as llm-compressor writes it: dynamic per-token activations
        inputs = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
        )
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=inputs)
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, qcfg)
    names = linear_names(model)
    for name in names:
        lin = model.get_submodule(name)
        W = lin.weight.detach()
        N, K = W.shape
        if strategy == "group":
            grouped = W.reshape(N, K // group_size, group_size)
            lo, hi = grouped.amin(-1), grouped.amax(-1)
        elif strategy == "channel":
            lo, hi = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
        else:
            lo, hi = W.amin().reshape(1), W.amax().reshape(1)
        s, z = calculate_qparams(lo, hi, args)
        lin.weight_scale.data.copy_(s.reshape(lin.weight_scale.shape))
        if hasattr(lin, "weight_zero_point"):
            lin.weight_zero_point.data.copy_(z.reshape(lin.weight_zero_point.shape))
    mc = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    mc.compress_model(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(cfg))
    mc.update_config(str(path))
    return {name: ct_dequant(state, name, fmt, scheme) for name in names}


def ct_dequant(state, name, fmt, scheme) -> torch.Tensor:
    """compressed-tensors' own decompression of one saved layer, fp32."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
    comp = PackedQuantizationCompressor if fmt == "pack-quantized" else IntQuantizationCompressor
    return comp.decompress(local, scheme)["weight"].float()


# ---- HQQ (the library itself, as Transformers' HQQ integration saves it) ----------------------


def write_hqq(
    model, path, nbits=4, group_size=32, axis=1, compute_dtype=torch.float32, view_as_float=False
):
    """HQQLinear per linear layer (hqq 0.2.8), its state_dict() under the layer's name: what
    Transformers' HQQ integration (integrations/hqq.py, quantizers/quantizer_hqq.py) saves, with
    its HqqConfig.to_dict() as quantization_config. Oracle: HQQLinear.dequantize()."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import HqqConfig

    names = linear_names(model)
    tensors, dense = _float_tensors(model, names), {}
    qc = BaseQuantizeConfig(
        nbits=nbits, group_size=group_size, axis=axis, view_as_float=view_as_float
    )
    for name in names:
        lin = model.get_submodule(name)
        h = HQQLinear(lin, qc, compute_dtype=compute_dtype, device="cpu", del_orig=False)
        for k, v in h.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().clone()
        dense[name] = h.dequantize().float()
    qconfig = HqqConfig(
        nbits=nbits, group_size=group_size, axis=axis, view_as_float=view_as_float
    ).to_dict()
    qconfig["quant_method"] = "hqq"
    _write(model, Path(path), tensors, qconfig)
    return dense


def load_and_check(path, dense: dict, model, rtol_logits: float = 3e-2):
    """Load `path` with lowbit; every quantized layer is a LinearAffine whose dequantize() equals
    the format's own dequantization bit for bit (fp32), and the logits match a float model holding
    those dense weights within the CPU kernels' activation precision (int8 activations per
    64-element chunk where the int8 path runs: ~1% relative). Returns the loaded model."""
    import lowbit
    from lowbit.nn import LinearAffine

    loaded = lowbit.from_pretrained(path, torch_dtype=torch.float32, progress=False)
    assert set(dense) == {n for n, m in loaded.named_modules() if isinstance(m, LinearAffine)}
    for name, W in dense.items():
        got = loaded.get_submodule(name).dequantize()
        assert got.dtype == torch.float32 and got.shape == W.shape
        assert torch.equal(got, W), f"{name}: max diff {(got - W).abs().max().item()}"
    ref = dense_model(model, dense)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        a, b = loaded(ids).logits, ref(ids).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= rtol_logits, f"logits relative error {rel:.3e} > {rtol_logits}"
    return loaded
