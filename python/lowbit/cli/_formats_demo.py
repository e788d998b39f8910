"""`lowbit demo --formats hqq,compressed-tensors`: the model quantized by another library, run by lowbit.

For each format the float model is quantized to int4 (group size 128 along K) and written as that
library writes its checkpoints: by the library itself when it is installed (hqq: HQQLinear with
its half-quadratic optimizer, as Transformers' HQQ integration saves it; compressed-tensors: its
min/max observer and pack-quantized compressor), otherwise by lowbit's own round-to-nearest
quantize_affine written out in that format's layout. lowbit.from_pretrained then loads the
directory (no format library involved) and the sentence embeddings are compared to fp32.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ("hqq", "compressed-tensors", "compressed-tensors-gptq")
BITS, GROUP_SIZE = 4, 128


def _save_dir(model, out: Path, tensors: dict, qconfig: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _rest(model, names) -> dict:
    skip = tuple(n + "." for n in names)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(skip)}


def _lowbit_codes(W: torch.Tensor):
    """lowbit's min/max quantizer: unsigned codes [N, K], scale and zero [N, K/g] (fp32)."""
    from lowbit import functional as F
    from lowbit import reference as R

    N, K = W.shape
    packed, scales, zeros = F.quantize_affine(W.float(), bits=BITS, group_size=GROUP_SIZE)
    codes = R.unpack_nibbles(packed, N * K).to(torch.uint8).view(N, K)
    return codes, scales.view(N, -1), zeros.view(N, -1)


def _pack_int32(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned [R, C] -> int32 [R, C*bits/32], entry c of a word at bit bits*c (lowest first)."""
    per = 32 // bits
    v = fields.to(torch.int64).view(fields.shape[0], -1, per)
    words = (v << (torch.arange(per) * bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def write_hqq(model, out: Path, model_dir=None) -> str:
    names = _linears(model)
    tensors = _rest(model, names)
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError:
        HQQLinear = None  # noqa: N806
    for name in names:
        lin = model.get_submodule(name)
        if HQQLinear is not None:
            qc = BaseQuantizeConfig(nbits=BITS, group_size=GROUP_SIZE, axis=1)
            h = HQQLinear(lin, qc, compute_dtype=torch.float32, device="cpu", del_orig=False)
            state = {k: v.detach().clone() for k, v in h.state_dict().items()}
        else:
            # hqq's layout: W as [R = N*K/g, g] rows, "4bit_u8" = row r in the high nibble and
            # row r + R/2 in the low nibble of byte [r, :]; scale/zero [R, 1].
            codes, s, z = _lowbit_codes(lin.weight.detach())
            rows = codes.reshape(-1, GROUP_SIZE)
            half = rows.shape[0] // 2
            ascii_ = lambda text: torch.tensor(list(text.encode()), dtype=torch.uint8)  # noqa: E731
            state = {
                "W_q": (rows[:half] << 4) | rows[half:],
                "scale": s.reshape(-1, 1),
                "zero": z.reshape(-1, 1),
                "shape": torch.tensor(list(lin.weight.shape)),
                "nbits": torch.tensor(BITS, dtype=torch.int32),
                "group_size": torch.tensor(GROUP_SIZE, dtype=torch.int32),
                "axis": torch.tensor(1, dtype=torch.int32),
                "packing": ascii_("4bit_u8"),
                "view_as_float": torch.tensor(0, dtype=torch.uint8),
            }
            if lin.bias is not None:
                state["bias"] = lin.bias.detach().clone()
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
    qconfig = {
        "quant_method": "hqq",
        "quant_config": {
            "weight_quant_params": {"nbits": BITS, "group_size": GROUP_SIZE, "axis": 1},
            "scale_quant_params": None,
            "zero_quant_params": None,
            "offload_meta": False,
        },
        "skip_modules": [],
    }
    _save_dir(model, out, tensors, qconfig)
    if HQQLinear is None:
        return "lowbit quantize_affine (hqq not installed), hqq layout"
    import hqq

    return f"hqq {getattr(hqq, '__version__', '')} HQQLinear (optimize=True)".replace("  ", " ")


def write_compressed_tensors(model, out: Path, model_dir=None, quantized=None) -> str:
    """pack-quantized int4 g128 asym. `quantized` ({layer: (codes, scales, zeros)}, e.g. from
    GPTQ) fixes the codes; otherwise they come from the min/max quantizer."""
    names = _linears(model)
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        compressed_tensors = None
    if compressed_tensors is not None:
        return _ct_library(model, out, names, quantized)
    tensors = _rest(model, names)
    for name in names:
        lin = model.get_submodule(name)
        codes, s, z = (quantized or {}).get(name) or _lowbit_codes(lin.weight.detach())
        # pack-quantized: stored value = signed q + 8 = lowbit's unsigned code; the zero point
        # (signed z = zero - 8) is stored + 8 as well, packed along the output dimension.
        tensors[f"{name}.weight_packed"] = _pack_int32(codes, 4)
        tensors[f"{name}.weight_scale"] = s
        tensors[f"{name}.weight_zero_point"] = _pack_int32(z.round().to(torch.uint8).t(), 4).t()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(lin.weight.shape))
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().clone()
    w = {"num_bits": BITS, "type": "int", "symmetric": False, "strategy": "group"}
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {**w, "group_size": GROUP_SIZE}}
        },
        "ignore": [],
    }
    _save_dir(model, out, tensors, qconfig)
    how = "GPTQ codes" if quantized else "lowbit quantize_affine"
    return f"{how} (compressed-tensors not installed), pack-quantized layout"


def write_compressed_tensors_gptq(model, out: Path, model_dir=None) -> str:
    """GPTQ-calibrated codes (lowbit.cli._gptq, 32 calibration sentences disjoint from the
    evaluation ones) in a compressed-tensors pack-quantized checkpoint, as llm-compressor makes
    them: compressed by compressed-tensors itself when installed."""
    from transformers import AutoTokenizer

    from lowbit.cli import _gptq

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cal = tokenizer(_gptq.CALIBRATION, padding=True, truncation=True, return_tensors="pt")
    names = _linears(model)
    H = _gptq.hessians(model, cal, names)
    quantized = {}
    for name in names:
        codes, s, z = _gptq.gptq(model.get_submodule(name).weight, H[name], GROUP_SIZE, BITS)
        quantized[name] = (codes.to(torch.uint8), s, z)
    how = write_compressed_tensors(model, out, model_dir, quantized)
    return f"GPTQ ({len(_gptq.CALIBRATION)} calibration sentences) + {how}"


def _ct_library(model, out: Path, names, quantized=None) -> str:
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    args = QuantizationArgs(
        num_bits=BITS, type="int", symmetric=False, strategy="group", group_size=GROUP_SIZE
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}))
    for name in names:  # the min/max observer's statistics, as llm-compressor's RTN would
        lin = model.get_submodule(name)
        W = lin.weight.detach()
        if quantized is not None:
            # GPTQ: the weight becomes its dequantized self, so the compressor's own rounding
            # (W / scale + zero_point) lands exactly on the GPTQ codes, as in llm-compressor.
            codes, s, z = quantized[name]
            g = GROUP_SIZE
            W = (codes.float() - z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)
            lin.weight.data.copy_(W)
            lin.weight_scale.data.copy_(s)
            lin.weight_zero_point.data.copy_((z - 2 ** (BITS - 1)).to(torch.int8))
            continue
        grouped = W.reshape(W.shape[0], -1, GROUP_SIZE)
        s, z = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        lin.weight_scale.data.copy_(s)
        lin.weight_zero_point.data.copy_(z)
    mc = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    mc.compress_model(model)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg))
    mc.update_config(str(out))
    how = "given codes" if quantized is not None else "min/max"
    return f"compressed-tensors {compressed_tensors.__version__} ({how}, pack-quantized)"


WRITERS = {
    "hqq": write_hqq,
    "compressed-tensors": write_compressed_tensors,
    "compressed-tensors-gptq": write_compressed_tensors_gptq,
}


def parse_formats(text: str) -> list[str]:
    from lowbit.cli.errors import CliError

    names = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in WRITERS]
    if not names or bad:
        raise CliError(
            f"--formats: unknown format(s) {bad or text!r}; choose from {', '.join(FORMATS)}"
        )
    return list(dict.fromkeys(names))


def measure(fmt: str, model_dir: Path, batch, embed, median_ms, repeats, reference) -> dict:
    """Quantize with `fmt`'s writer into a temporary directory, load it with lowbit, measure."""
    from transformers import AutoModel

    import lowbit
    from lowbit.loading.affine import affine_weight_bytes

    float_model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix=f"lowbit-{fmt}-") as tmp:
        start = time.perf_counter()
        how = WRITERS[fmt](float_model, Path(tmp), model_dir)
        write_s = time.perf_counter() - start
        del float_model
        start = time.perf_counter()
        model = lowbit.from_pretrained(tmp, torch_dtype=torch.float32, progress=False)
        load_s = time.perf_counter() - start
    kept, bf16 = affine_weight_bytes(model)
    with torch.inference_mode():
        emb = embed(model, batch)
        latency_ms = median_ms(lambda: embed(model, batch), repeats)
    cos = torch.nn.functional.cosine_similarity(emb.float(), reference.float(), dim=-1)
    return {
        "format": fmt,
        "quantized_by": how,
        "linear_weight_mb": kept / 2**20,
        "bf16_weight_mb": bf16 / 2**20,
        "ratio_vs_bf16": kept / bf16,
        "write_s": write_s,
        "load_s": load_s,
        "latency_ms": latency_ms,
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
    }


def table(rows) -> str:
    head = (
        "format",
        "weights MB",
        "x bf16",
        "write s",
        "load s",
        "batch ms",
        "cos mean",
        "cos min",
    )
    body = [
        (
            r["format"],
            f"{r['linear_weight_mb']:.2f}",
            f"{r['ratio_vs_bf16']:.3f}",
            f"{r['write_s']:.2f}",
            f"{r['load_s']:.2f}",
            f"{r['latency_ms']:.1f}",
            f"{r['cosine_mean']:.5f}",
            f"{r['cosine_min']:.5f}",
        )
        for r in rows
    ]
    from lowbit.cli.demo import render_table

    return render_table(head, body)
