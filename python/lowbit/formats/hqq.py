"""HQQ checkpoints as Transformers' HQQ integration saves them (HQQLinear.state_dict, hqq 0.2.x).

Layout (hqq core/quantize.py Quantizer.quantize/dequantize and HQQLinear.state_dict,
core/bitpack.py, core/utils.py encode_safetensor_type; transformers integrations/hqq.py), per
linear layer with weight W [N, K] and nbits b:
  * axis=1 groups: W viewed row-major as [N*K/g, g], one group per row of that view, so group id
    of flat element i = n*K + k is i // g (g need not divide K; rows may span weight rows);
  * W_q: the [R, C] code matrix (R = N*K/g, C = g) bit-packed by slicing its ROWS: with s slices
    of R/s rows, slice j lives in bits [(s-1-j)*b, (s-j)*b) of each packed element:
      "8bit_u8" uint8 [R, C] (s=1; also nbits 5 and 6), "4bit_u8" uint8 [R/2, C] (s=2),
      "2bit_u8" uint8 [R/4, C] (s=4), "1bit_u8" uint8 [R/8, C] (s=8),
      "3bit_32" int32 [ceil(R/10), C] (s=10, zero-padded rows);
    so the two nibbles of a 4-bit byte are half a matrix apart, not neighbours;
    view_as_float=True stores those bytes viewed as the compute dtype;
  * scale, zero: [R, 1] in the compute dtype; scale is already inverted and zero is fractional;
    W = ((W_q - zero) * scale).reshape(N, K);
  * shape int64 [N, K]; nbits, group_size, axis: int32 scalars; packing, unpack_view_dtype,
    compute_dtype: ASCII in uint8 tensors; flags (view_as_float, quant_scale, quant_zero,
    offload_meta, ...) uint8 0/1.
axis=0 groups run down the columns of W (across output rows): no grouping along K represents them
exactly, so lowbit refuses them (it never dequantizes and requantizes).
"""

from __future__ import annotations

import math

import torch

from lowbit.formats import Reader
from lowbit.formats._common import (
    FLOATS,
    AffineWeight,
    FormatError,
    check_finite_scales,
    check_tensor,
    pack_codes,
    storage_bits,
)

# packing -> (slices per packed element, bits per slice, packed dtype)
PACKINGS = {
    "8bit_u8": (1, 8, torch.uint8),
    "4bit_u8": (2, 4, torch.uint8),
    "2bit_u8": (4, 2, torch.uint8),
    "1bit_u8": (8, 1, torch.uint8),
    "3bit_32": (10, 3, torch.int32),
}
# nbits -> the packing hqq writes for it
NBITS = {
    8: "8bit_u8",
    6: "8bit_u8",
    5: "8bit_u8",
    4: "4bit_u8",
    3: "3bit_32",
    2: "2bit_u8",
    1: "1bit_u8",
}
REQUIRED = ("W_q", "scale", "zero", "shape", "nbits", "axis", "packing")
FLAGS = ("quant_scale", "quant_zero", "offload_meta")


def _ascii(name: str, t: torch.Tensor) -> str:
    check_tensor(name, t, (torch.uint8,))
    if t.numel() > 64:
        raise FormatError(f"{name}: ASCII string too long ({t.numel()} bytes)")
    try:
        return bytes(t.reshape(-1).tolist()).decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"{name}: not an ASCII string") from None


def _int(name: str, t: torch.Tensor) -> int:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise FormatError(f"{name}: expected a scalar tensor")
    if t.is_floating_point():
        v = float(t.item())
        if v != int(v):
            raise FormatError(f"{name}: expected an integer, got {v}")
        return int(v)
    return int(t.item())


def _check_params(p: dict, where: str) -> None:
    nbits = p.get("nbits", 4)
    if nbits not in NBITS:
        raise FormatError(f"{where}.nbits={nbits!r}: lowbit reads HQQ nbits {sorted(NBITS)}")
    if p.get("axis", 1) != 1:
        raise FormatError(
            f"{where}.axis={p.get('axis')!r}: lowbit reads HQQ axis=1 (groups along the input "
            "dimension, Transformers' default); axis=0 groups run across output rows and cannot be "
            "converted exactly"
        )


class HQQReader(Reader):
    method = "hqq"
    markers = ("W_q",)
    known = frozenset(
        {"W_q", "scale", "zero", "shape", "nbits", "group_size", "axis", "packing", "bias"}
        | {"unpack_view_dtype", "view_as_float", "compute_dtype", "encoded_state_dict"}
        | {"stores_quant_config", "channel_wise", "optimize", "round_zero"}
        | set(FLAGS)
    )

    def __init__(self, qconfig: dict):
        super().__init__(qconfig)
        qc = qconfig.get("quant_config") or {}
        if not isinstance(qc, dict):
            raise FormatError("quantization_config.quant_config: expected an object")
        if "weight_quant_params" in qc:
            layers = {"": qc}
        else:  # dynamic_config: one quant config per layer-name pattern
            layers = {k: v for k, v in qc.items() if isinstance(v, dict)}
        for key, c in layers.items():
            where = "quantization_config.quant_config" + (f".{key}" if key else "")
            for meta in ("scale_quant_params", "zero_quant_params"):
                if c.get(meta):
                    raise FormatError(
                        f"{where}.{meta}: quantized scales/zeros are not supported (hqq itself "
                        "cannot serialize them)"
                    )
            if c.get("offload_meta"):
                raise FormatError(f"{where}.offload_meta=true is not supported")
            _check_params(c.get("weight_quant_params") or {}, where + ".weight_quant_params")
        wp = (qc.get("weight_quant_params") or {}) if "weight_quant_params" in qc else {}
        self.nbits, self.group_size = wp.get("nbits"), wp.get("group_size")

    def summary(self) -> str:
        if self.nbits is None:
            return "hqq (per-layer configs)"
        return f"hqq ({self.nbits}-bit, group size {self.group_size}, axis 1)"

    def missing(self, prefix, stash):
        return [k for k in REQUIRED if k not in stash]

    def convert(self, prefix, stash, in_features, out_features) -> AffineWeight:
        K, N = in_features, out_features
        name = prefix + "."
        for flag in FLAGS:
            if flag in stash and _int(name + flag, stash[flag]):
                raise FormatError(
                    f"{name}{flag}=1: quantized or offloaded HQQ metadata is not supported"
                )
        shape = check_tensor(name + "shape", stash["shape"], (torch.int64, torch.int32), (2,))
        if shape.tolist() != [N, K]:
            raise FormatError(
                f"{name}shape: {shape.tolist()} does not match the layer's [{N}, {K}]"
            )
        nbits = _int(name + "nbits", stash["nbits"])
        axis = _int(name + "axis", stash["axis"])
        _check_params({"nbits": nbits, "axis": axis}, name[:-1])
        packing = _ascii(name + "packing", stash["packing"])
        if packing != NBITS[nbits]:
            raise FormatError(
                f"{name}packing={packing!r}: hqq packs nbits={nbits} as {NBITS[nbits]!r}"
            )
        slices, bits, pdtype = PACKINGS[packing]
        W_q = stash["W_q"]
        if "view_as_float" in stash and _int(name + "view_as_float", stash["view_as_float"]):
            check_tensor(name + "W_q", W_q, FLOATS)
            if W_q.dim() != 2 or (W_q.shape[1] * W_q.element_size()) % pdtype.itemsize:
                raise FormatError(f"{name}W_q: cannot view {list(W_q.shape)} as {pdtype}")
            W_q = W_q.contiguous().view(pdtype)
        check_tensor(name + "W_q", W_q, (pdtype,))
        if W_q.dim() != 2:
            raise FormatError(f"{name}W_q: expected 2-D, got {list(W_q.shape)}")
        scale = check_tensor(name + "scale", stash["scale"], FLOATS)
        zero = check_tensor(name + "zero", stash["zero"], FLOATS)
        check_finite_scales(name + "scale", scale)
        check_finite_scales(name + "zero", zero)
        numel = N * K
        groups = scale.numel()
        if groups < 1 or numel % groups or zero.numel() != groups:
            raise FormatError(
                f"{name}scale/zero: {scale.numel()} / {zero.numel()} values do not split "
                f"{N}x{K} weights into equal groups"
            )
        g = numel // groups  # elements per group (flat, row-major)
        if "group_size" in stash and groups > 1:
            gs = _int(name + "group_size", stash["group_size"])
            if gs != g and not (gs == K and groups == N):
                raise FormatError(
                    f"{name}group_size={gs} does not match {groups} scales for {N}x{K}"
                )
        R, C = (numel // W_q.shape[1], W_q.shape[1]) if W_q.shape[1] else (0, 0)
        if C == 0 or numel % C or math.ceil(R / slices) != W_q.shape[0]:
            raise FormatError(
                f"{name}W_q: shape {list(W_q.shape)} does not hold {N}x{K} {nbits}-bit codes "
                f"packed as {packing}"
            )
        mask = (1 << bits) - 1
        parts = [((W_q >> ((slices - 1 - j) * bits)) & mask).to(torch.uint8) for j in range(slices)]
        codes = torch.cat(parts, dim=0)[:R].reshape(-1)  # row-major flat codes of W
        if int(codes.max()) >= (1 << nbits) if codes.numel() else False:
            raise FormatError(f"{name}W_q: holds codes >= 2**{nbits}")
        # Groups are runs of g flat elements; runs of gcd(g, K) elements never cross a weight row
        # nor a group, so group_size gcd(g, K) with each run's group scale is the same map.
        gg = math.gcd(g, K)
        idx = torch.arange(0, numel, gg) // g
        s = scale.reshape(-1).float()[idx].contiguous()
        z = zero.reshape(-1).float()[idx].contiguous()
        bias = stash.get("bias")
        if bias is not None:
            bias = check_tensor(name + "bias", bias, FLOATS, (N,))
        sbits = storage_bits(nbits)
        return AffineWeight(
            packed=pack_codes(codes.view(N, K), sbits),
            scales=s,
            zeros=z,
            bits=sbits,
            group_size=gg,
            shape=(N, K),
            bias=bias,
            source_bits=nbits,
        )

    def infer_shape(self, stash):
        n, k = stash["shape"].tolist()
        return int(n), int(k)


READER = HQQReader
